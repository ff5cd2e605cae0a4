"""The OpenAI-compatible HTTP surface (`/v1`): every call is the same syscall as over gRPC. A request is
authenticated and admitted by the same gate (the agent's token as `Authorization: Bearer`, its request rate,
its capabilities), counted in flight for the drain, run by the same use case and traced the same way;
this module only translates (`openai_wire.py`) and maps errors to OpenAI's shape and HTTP statuses."""
from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from kernos.proto.v1 import llm_pb2 as pb
from kernos.storage.status import StatusError

from ...llm.types import TextDelta
from ...syscalls.generate import Accepted, Reply, ToolCallDeltas, ToolRun
from ..grpc.interceptor import record_trace, token_from_metadata
from ..grpc.llm import generation, reply_message
from . import openai_wire as wire
from .limits import BodyTimeout

log = logging.getLogger("kernos.http")

# StatusError code -> (HTTP status, OpenAI error type): the statuses OpenAI's clients map to their exceptions.
STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "OUT_OF_RANGE": (400, "invalid_request_error"),
          "UNAUTHENTICATED": (401, "authentication_error"), "PERMISSION_DENIED": (403, "permission_error"),
          "NOT_FOUND": (404, "not_found_error"), "ALREADY_EXISTS": (409, "conflict_error"),
          "FAILED_PRECONDITION": (409, "conflict_error"), "ABORTED": (409, "conflict_error"),
          "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable"),
          "DEADLINE_EXCEEDED": (504, "timeout"), "INTERNAL": (500, "internal_error")}
GENERATE = "/kernos.v1.LLM/Generate"


def error(status: int, kind: str, message: str, param: str | None = None, code: str | None = None,
          retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def status_error(e: StatusError) -> JSONResponse:
    status, kind = STATUS.get(e.code, (500, "internal_error"))
    if e.code == "RESOURCE_EXHAUSTED" and e.retry_after_s is None:    # too large, not too often
        status, kind = 413, "request_too_large"
    if isinstance(e, BodyTimeout):                                     # the client's, not the kernel's slowness
        status, kind = 408, "timeout"
    return error(status, kind, e.message, code=e.code.lower(), retry_after=e.retry_after_s)


def build(kernel) -> FastAPI:
    app = FastAPI(title="Kernos", docs_url=None, redoc_url=None, openapi_url=None)
    gate, generate, traces, lifecycle = kernel.gate, kernel.generate, kernel.traces, kernel.lifecycle

    @app.exception_handler(StatusError)
    async def _status(request, e: StatusError):
        return status_error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"] if x != "body")
        return error(400, "invalid_request_error", f"{param or 'body'}: {first['msg']}", param=param or None)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error [%s] in %s", ref, request.url.path, exc_info=e)
        return error(500, "internal_error", f"internal kernel error (reference {ref} in the kernel log)")

    def principal_of(request: Request, method: str, message=None):
        token = token_from_metadata([("authorization", request.headers.get("authorization", ""))])
        principal = gate.authenticate(token)
        if principal is None:
            raise StatusError("UNAUTHENTICATED", "missing, unknown or revoked token: send 'Authorization: Bearer "
                                                 "<agent token>' (Register over gRPC, or kernos token create --agent)")
        gate.admit(principal, method, message)
        return principal

    def parse(model, body: bytes):
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            raise StatusError("INVALID_ARGUMENT", f"{param or 'body'}: {first['msg']}") from None

    def served() -> set[str]:
        return set(kernel.llm.models)

    @app.get("/v1/models")
    async def models(request: Request):
        principal = principal_of(request, "/kernos.v1.LLM/ListModels")
        return {"object": "list", "data": _models(kernel, principal)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        principal = principal_of(request, "/kernos.v1.LLM/ListModels")
        for m in _models(kernel, principal):
            if m["id"] == model_id:
                return m
        raise StatusError("NOT_FOUND", f"no model '{model_id[:128]}' this agent may use")

    async def run(request: Request, message: pb.GenerateRequest, stream: bool, shape, include_usage: bool):
        principal = principal_of(request, GENERATE, message)
        t0 = time.monotonic()
        g = generation(message)
        events = generate.run(principal, g)
        if not stream:
            return shape(await complete(kernel, principal, message, events, t0))
        tracker = lifecycle.track()
        tracker.__enter__()
        try:
            first = await events.__anext__()                 # errors before acceptance: a proper HTTP status
        except StatusError as e:
            tracker.__exit__(None, None, None)
            record_trace(traces, principal.agent_id, GENERATE, e.code, message, None, t0)
            raise
        return StreamingResponse(_sse(first, events, message, principal, t0, tracker, include_usage, shape),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(first, events, message, principal, t0, tracker, include_usage, shape):
        chat = shape is wire.chat_reply
        rid, created, status, reply = first.request_id, int(time.time()), "INTERNAL", None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": created, "model": message.model,
                "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choices, **extra):
            return "data: " + json.dumps({**head, "choices": choices, **extra}) + "\n\n"

        try:
            if chat:
                for i in range(max(1, message.n)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for ev in events:
                if isinstance(ev, TextDelta):
                    delta = {"content": ev.text} if chat else None
                    yield chunk([{"index": ev.index, "delta": delta, "finish_reason": None}] if chat else
                                [{"index": ev.index, "text": ev.text, "finish_reason": None, "logprobs": None}])
                elif isinstance(ev, ToolCallDeltas) and chat:
                    calls = [{"index": d["index"], **({"id": d["id"], "type": "function"} if d["id"] else {}),
                              "function": {k: d[k] for k in ("name", "arguments") if d[k] or k == "arguments"}}
                             for d in ev.deltas]
                    yield chunk([{"index": ev.choice, "delta": {"tool_calls": calls}, "finish_reason": None}])
                elif isinstance(ev, (Accepted, ToolRun)):
                    continue
                elif isinstance(ev, Reply):
                    reply = ev
                    for c in ev.choices:
                        done = {"index": c.index, "finish_reason": wire.finish_reason(c.finish)}
                        yield chunk([{**done, "delta": {}, "logprobs": wire.logprobs(c)}] if chat else
                                    [{**done, "text": "", "logprobs": None}])
                    if include_usage:
                        yield chunk([], usage=wire.usage(ev))
            status = "OK"
            yield "data: [DONE]\n\n"
        except StatusError as e:
            status = e.code
            body = json.loads(status_error(e).body)
            yield "data: " + json.dumps(body) + "\n\n"
        finally:
            tracker.__exit__(None, None, None)
            record_trace(traces, principal.agent_id, GENERATE, status, message,
                         reply_message(reply) if reply is not None else None, t0)

    async def generation_route(request: Request, shape_in, translate, shape_out):
        """Chat and completions alike: parse OpenAI's body, translate it, run it (streamed or whole)."""
        r = parse(shape_in, await request.body())
        try:
            message = translate(r, served())
        except TypeError as e:
            raise StatusError("INVALID_ARGUMENT", str(e)) from None
        include = bool(r.stream_options and r.stream_options.include_usage)
        return await run(request, message, r.stream, shape_out, include)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation_route(request, wire.ChatRequest, wire.chat_request, wire.chat_reply)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation_route(request, wire.CompletionRequest, wire.completion_request,
                                      wire.completion_reply)

    @app.get("/metrics")
    async def metrics(request: Request):
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if not kernel.config.server.metrics_public:
            principal = principal_of(request, "/kernos.v1.Kernel/Stats")
            if not principal.operator:
                raise StatusError("PERMISSION_DENIED", "metrics are for operators (or set server.metrics_public)")
        return Response(generate_latest(kernel.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        r = parse(wire.EmbeddingRequest, await request.body())
        principal = principal_of(request, "/kernos.v1.Memory/Embed")
        texts = [r.input] if isinstance(r.input, str) else list(r.input)
        with lifecycle.track():
            vectors = await kernel.memory.embed(principal, texts)
        tokens = sum(len(t.split()) for t in texts)
        if r.encoding_format == "base64":
            import base64
            import struct

            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return {"object": "list", "model": r.model or "all-MiniLM-L6-v2",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    if kernel.config.server.aios_compat:
        from .aios import mount as mount_aios

        mount_aios(app, kernel)
    app.state.mcp = None
    if kernel.config.server.mcp:
        from .mcp_server import mount as mount_mcp

        app.state.mcp = mount_mcp(app, kernel)
    app.state.history = None
    if kernel.config.server.console:
        from .console.routes import mount

        app.state.history = mount(app, kernel)
    return app


async def complete(kernel, principal, message: pb.GenerateRequest, events=None, t0: float | None = None) -> Reply:
    """One generation run whole, as over gRPC: counted in flight for the drain and traced. The caller has passed
    the gate."""
    t0 = time.monotonic() if t0 is None else t0
    events = events if events is not None else kernel.generate.run(principal, generation(message))
    reply, status = None, "INTERNAL"
    try:
        with kernel.lifecycle.track():
            async for ev in events:
                if isinstance(ev, Reply):
                    reply = ev
        status = "OK"
    except StatusError as e:
        status = e.code
        raise
    finally:
        record_trace(kernel.traces, principal.agent_id, GENERATE, status, message,
                     reply_message(reply) if reply is not None else None, t0)
    return reply


def _models(kernel, principal) -> list[dict]:
    """Each served model, and each of its adapters the caller may use, as MODEL:ADAPTER."""
    allowed = kernel.access_control.decide_named
    created = int(kernel.lifecycle.started)
    out = []
    for m in kernel.llm.models.values():
        if not allowed(principal, "model", m.name)[0]:
            continue
        out.append({"id": m.name, "object": "model", "created": created, "owned_by": "kernos"})
        out += [{"id": f"{m.name}:{a}", "object": "model", "created": created, "parent": m.name,
                 "owned_by": a.split(":")[0] if ":" in a else "kernos"}
                for a in m.adapters if allowed(principal, "model", f"{m.name}/{a}")[0]]
    return out
