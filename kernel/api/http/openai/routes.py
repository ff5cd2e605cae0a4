"""The OpenAI-compatible HTTP surface (`/v1`) and `/metrics`: every call is a syscall through the one edge
(the agent's token as `Authorization: Bearer`, its request rate, its capabilities, counted in flight for the
drain, traced), run by the same use case as over gRPC. This module only routes; `wire.py` translates and
`stream.py` writes a streamed reply as server-sent events."""
from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import syscall

from ....syscalls.generation import Generation, Reply, reply_view, request_view
from ...edge import Edge, Passage, bearer
from ..errors import parse
from . import responses, wire
from .stream import sse

# (method, path) -> the syscall the route is
ROUTES = {("GET", "/v1/models"): "llm.list_models", ("GET", "/v1/models/{model_id:path}"): "llm.list_models",
          ("POST", "/v1/chat/completions"): "llm.generate", ("POST", "/v1/completions"): "llm.generate",
          ("POST", "/v1/embeddings"): "memory.embed", ("GET", "/metrics"): "kernel.stats",
          ("POST", "/v1/responses"): "llm.generate", ("GET", "/v1/responses/{response_id}"): "llm.get_response",
          ("DELETE", "/v1/responses/{response_id}"): "llm.delete_response",
          ("GET", "/v1/responses/{response_id}/input_items"): "llm.get_response"}


def token(request: Request) -> str | None:
    return bearer(request.headers.get("authorization", ""))


def program(request: Request, g: Generation) -> Generation:
    """The agent program a call names in the body (`program_id`, through a client's extra_body), else in the
    X-Kernos-Program header (a client that sets default headers names it once for every call)."""
    g.program_id = g.program_id or request.headers.get("x-kernos-program", "")
    return g


async def complete(passage: Passage, g: Generation, events) -> Reply:
    """One generation (`events`, the use case's for `g`) run whole on an admitted passage: counted in flight for
    the drain, and traced."""
    reply, passage.request_view = None, request_view(g)
    try:
        with passage.track():
            async for ev in events:
                if isinstance(ev, Reply):
                    reply = ev
        passage.ok()
        return reply
    except BaseException as e:
        error = passage.failed(e)
        if error is None:
            raise
        raise error from (None if error is e else e)
    finally:
        passage.trace(passage.request_view, reply_view(reply))


async def accepted(passage: Passage, g: Generation, events):
    """(the first event, the in-flight tracker) of a generation about to be streamed: counted in flight from
    here; an error before the engine accepts it is a proper HTTP status, traced."""
    passage.request_view = request_view(g)
    tracker = passage.track()
    tracker.__enter__()
    try:
        return await events.__anext__(), tracker
    except StatusError as e:
        tracker.__exit__(None, None, None)
        passage.failed(e)
        passage.trace(passage.request_view)
        raise


def mount(app: FastAPI, edge: Edge, generate, respond, memory, models, metrics, metrics_public: bool) -> None:
    def usable(principal) -> list[dict]:
        """Each usable model, and each of its adapters, as MODEL:ADAPTER."""
        created = int(edge.lifecycle.started)
        out = []
        for m in models.usable(principal):
            out.append({"id": m.name, "object": "model", "created": created, "owned_by": "kernos"})
            out += [{"id": f"{m.name}:{a}", "object": "model", "created": created, "parent": m.name,
                     "owned_by": a.split(":")[0] if ":" in a else "kernos"} for a in m.adapters]
        return out

    @app.get("/v1/models")
    async def list_models(request: Request):
        passage = edge.enter(syscall("llm.list_models"), token(request))
        return {"object": "list", "data": usable(passage.principal)}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        passage = edge.enter(syscall("llm.list_models"), token(request))
        for m in usable(passage.principal):
            if m["id"] == model_id:
                return m
        raise StatusError("NOT_FOUND", f"no model '{model_id[:128]}' this agent may use")

    async def generation_route(request: Request, shape_in, translate, shape_out):
        """Chat and completions alike: parse OpenAI's body, translate it, run it (streamed or whole)."""
        body = await request.body()
        r = parse(shape_in, body)
        passage = edge.enter(syscall("llm.generate"), token(request))     # the caller first, then its fields
        try:
            gs = translate(r, models.names(), len(body))
        except TypeError as e:
            raise StatusError("INVALID_ARGUMENT", str(e)) from None
        for x in gs if isinstance(gs, list) else [gs]:
            program(request, x)
        g = gs[0] if isinstance(gs, list) else gs
        if not r.stream:
            if not isinstance(gs, list):
                return shape_out(await complete(passage, g, generate.run(passage.principal, g)), r)
            # several prompts: a generation syscall each, side by side
            passages = [passage] + [edge.enter(syscall("llm.generate"), principal=passage.principal) for _ in gs[1:]]
            replies = await asyncio.gather(*(complete(p, x, generate.run(p.principal, x))
                                             for p, x in zip(passages, gs)))
            return shape_out(list(replies), r)
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        events = generate.run(passage.principal, g)
        first, tracker = await accepted(passage, g, events)
        echo = g.prompt if getattr(r, "echo", False) else ""
        return StreamingResponse(sse(first, events, g, passage, tracker, include_usage, shape_out is wire.chat_reply,
                                     echo),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation_route(request, wire.ChatRequest, wire.chat_request, wire.chat_reply)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation_route(request, wire.CompletionRequest, wire.completion_request,
                                      wire.completion_reply)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        body = await request.body()
        r = parse(responses.ResponsesRequest, body)
        passage = edge.enter(syscall("llm.generate"), token(request))
        items = responses.input_items(r)
        try:
            r.refuse_unknown()
            messages = respond.conversation(passage.principal, r.previous_response_id or "", items,
                                            r.instructions or "")
            g = program(request, responses.generation(r, messages, models.names(), len(body)))
        except StatusError as e:
            passage.failed(e)
            passage.trace({"previous_response_id": r.previous_response_id or "", "model": r.model})
            raise
        rid, created = responses.new_id()
        events = respond.run(passage.principal, g, r.truncation == "auto")
        if not r.stream:
            reply = await complete(passage, g, events)
            final = responses.response(rid, created, r, responses.status_of(reply), reply)
            if r.store:
                respond.save(passage.principal, final, items)
            return final
        _, tracker = await accepted(passage, g, events)
        stream = responses.EventStream(rid, created, r)
        return StreamingResponse(responses.sse(stream, events, passage, tracker,
                                               lambda final: respond.save(passage.principal, final, items)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        passage = edge.enter(syscall("llm.get_response"), token(request))
        return respond.get(passage.principal, response_id)[0]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        passage = edge.enter(syscall("llm.delete_response"), token(request))
        respond.delete(passage.principal, response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_items(response_id: str, request: Request, order: str = "desc", limit: int = 20,
                             after: str = ""):
        passage = edge.enter(syscall("llm.get_response"), token(request))
        _, items = respond.get(passage.principal, response_id)
        return responses.listed_items(response_id, items, order, limit, after)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        r = parse(wire.EmbeddingRequest, await request.body())
        passage = edge.enter(syscall("memory.embed"), token(request))
        texts = [r.input] if isinstance(r.input, str) else list(r.input)
        try:
            with passage.track():
                vectors = await memory.embed(passage.principal, texts)
            passage.ok()
        except StatusError as e:
            passage.failed(e)
            raise
        finally:
            passage.trace({"texts": {"count": len(texts)}, "model": r.model or ""})
        tokens = sum(len(t.split()) for t in texts)
        if r.encoding_format == "base64":
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return {"object": "list", "model": r.model or "all-MiniLM-L6-v2",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/metrics")
    async def prometheus(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if not metrics_public:
            passage = edge.enter(syscall("kernel.stats"), token(request))
            if not passage.principal.operator:
                raise StatusError("PERMISSION_DENIED", "metrics are for operators (or set server.metrics_public)")
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
