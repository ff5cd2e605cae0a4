"""AIOS compatibility (`server.aios_compat`): agents written with AIOS's SDK (Cerebrum) run unchanged against
Kernos. They send every syscall as `POST /query` and read `result["response"][...]`; at start they call
`/status` and `/core/llms/list`. Each query is mapped onto Kernos's own syscalls, each through the one edge (the
same admission, quotas, audit, scheduling and trace kinds as gRPC): `llm` onto generate (the five action types),
`memory` onto long-term memory, `storage` onto versioned files, `tool` onto the tool syscall.

AIOS has no authentication: any caller names itself any agent. Here each name is its own Kernos agent
(`security/bridge.py`), isolated from every other name, in the group `[aios] group` with the capabilities
`[aios] capabilities`; the routes answer loopback callers only unless `[aios] allow_remote`, and require a
shared bearer token when `[aios] token` is set. In a cluster, a query reaches its agent's home node
(`api/http/forward.py`), which checks the address the caller came from as if it had come straight to it. A bad
body gets a 400 that names the field (AIOS answers 500), a kernel error its HTTP status with the AIOS-shaped body,
never a dead kernel."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import syscall

from ....syscalls.file_ops import FileOperations, param
from ....syscalls.generation import Generation
from ....syscalls.memory_analysis import MemoryAnalysis
from ...edge import Edge, bounded, http_status
from ..forward import forwarded_for
from ..openai import wire as openai_wire
from ..openai.routes import complete
from . import wire as w

log = logging.getLogger("kernos.aios")
_PASSAGES: ContextVar = ContextVar("kernos_aios_passages")
# query_type (and operation) -> the syscall it is; an LLM query is llm.generate (and, for call_tool and
# operate_file, the tool calls and storage operations the model picks, each admitted as its own syscall)
QUERIES = {"llm": "llm.generate", "memory.add_memory": "memory.add", "memory.add_agentic_memory": "memory.add",
          "memory.get_memory": "memory.get", "memory.update_memory": "memory.update",
          "memory.remove_memory": "memory.delete", "memory.retrieve_memory": "memory.search",
          "memory.retrieve_memory_raw": "memory.search", "storage.write": "storage.write",
          "storage.create_file": "storage.write", "storage.rollback": "storage.rollback",
          "storage.share": "access.grant", "storage.retrieve": "storage.search", "tool": "tools.call"}
# (method, path) -> the syscalls the route makes (the status routes answer what is served, for AIOS's start)
ROUTES = {("GET", "/status"): (), ("GET", "/core/status"): (), ("GET", "/core/llms/list"): (),
          ("POST", "/query"): tuple(sorted(set(QUERIES.values())))}

def _bad(e: ValidationError, prefix: str) -> StatusError:
    first = e.errors()[0]
    where = ".".join(str(x) for x in (prefix, *first["loc"]) if x != "")
    return StatusError("INVALID_ARGUMENT", f"{where or 'body'}: {first['msg']}")


def _text(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


def mount(app: FastAPI, edge: Edge, generate, memories, files, tools, access, models, bridge, cfg,
          cluster=None) -> None:
    """AIOS's routes over the edge and the use cases they call; `bridge` gives each AIOS name its agent; `cluster`
    (a cluster's node) tells requests other nodes forwarded here."""

    def admit(principal, name: str, path: str = "", args: dict | None = None):
        """Admit one syscall of a query through the edge; it is traced when the query ends."""
        passage = edge.enter(syscall(name, path=path), principal=principal)
        passage.request_view = {**bounded(args or {}), "via": "aios"}
        _PASSAGES.get().append(passage)
        return passage

    def check_caller(request: Request) -> str:
        """The caller's address, checked: the client's, or (a request another node of the cluster forwarded to
        this one, the agent's home) the address the client reached that node from."""
        forwarded = forwarded_for(cluster, request.headers) if "kernos-forwarded-by" in request.headers else None
        host = forwarded if forwarded is not None else (request.client.host if request.client else "")
        if not cfg.allow_remote:
            try:
                local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = False
            if not local:
                raise StatusError("PERMISSION_DENIED", "AIOS calls are answered on loopback only ([aios] allow_remote)")
        if cfg.token:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(given.encode(), cfg.token.encode()):
                raise StatusError("UNAUTHENTICATED", "this kernel's AIOS API needs its shared token "
                                                     "(Authorization: Bearer ...)")
        return host

    def served_model(q: w.LLMQuery) -> str:
        names = models.names()
        for llm in q.llms or []:
            name = llm.get("name") if isinstance(llm, dict) else None
            if isinstance(name, str) and name:
                model, _ = openai_wire.split_model(name, names)
                if model in names:
                    return name
                if cfg.unknown_model == "error":
                    raise StatusError("NOT_FOUND", f"no model '{name[:128]}' on this kernel; served: {sorted(names)}")
        return models.default

    def generation(body: dict) -> Generation:
        try:
            return openai_wire.chat_request(openai_wire.ChatRequest.model_validate(body), models.names())
        except ValidationError as e:
            raise _bad(e, "query_data") from None

    async def generate_whole(principal, g: Generation):
        passage = edge.enter(syscall("llm.generate"), principal=principal)
        return await complete(passage, g, generate.run(principal, g))

    file_ops = FileOperations(files, access, cfg.group, generate_whole, admit)
    analysis = MemoryAnalysis(generate_whole, models)

    # -- tools ------------------------------------------------------------------------------------------------
    async def run_tools(principal, calls: list[tuple[str, dict]]) -> dict:
        if not calls:
            return w.text_response("tool", None, "the model made no tool call (was max_new_tokens reached?)", 200)
        results, errors = [], []
        for name, args in calls:
            entry = {"name": name, "parameters": args}
            passage = None
            try:
                passage = admit(principal, "tools.call", args={"name": name})
                call = await tools.call_and_wait(principal, name, json.dumps(args))
                entry.update(state=call.state, result=call.result, error=call.error or None)
                if call.state != "done":
                    errors.append(f"{name}: {call.error or call.state}")
            except StatusError as e:
                if passage is not None:
                    passage.failed(e)
                entry.update(state="error", result=None, error=e.message)
                errors.append(f"{name}: {e.message}")
            results.append(entry)
        message = _text(results[0]["result"]) if len(results) == 1 and results[0]["state"] == "done" else \
            json.dumps([{k: r[k] for k in ("name", "result", "error")} for r in results])
        return {**w.text_response("tool", message, "; ".join(errors) or None), "tool_calls": results}

    # -- the four query types -----------------------------------------------------------------------------------
    async def llm(principal, q: w.LLMQuery, created: float):
        action = q.action_type
        model = served_model(q)
        if action == "operate_file":
            return await operate_file(principal, q, model)
        wants_tools = action in ("chat_with_tool_call_output", "call_tool")
        if wants_tools and not q.tools:
            raise StatusError("INVALID_ARGUMENT", f"query_data.tools: action_type '{action}' needs tools")
        rf = w.json_format(q) if action == "chat_with_json_output" or q.message_return_type == "json" else None
        reply = await generate_whole(principal, generation(w.chat_body(
            q, model, tool_choice="required" if wants_tools else None, response_format=rf)))
        started = created + reply.queue_wait_ms / 1e3
        calls = w.calls_of(reply, w.tool_names(q))
        if action == "call_tool":
            return await run_tools(principal, [(c["name"], c["parameters"]) for c in calls]), started
        return w.llm_response(reply.text if (reply.text or not calls) else None, calls), started

    async def operate_file(principal, q: w.LLMQuery, model: str):
        reply, done, errors = await file_ops.operate(principal, generation(w.chat_body(q, model)))
        message = " ".join(done) if done else "No file operation was done."
        return {**w.llm_response(message, w.calls_of(reply), "; ".join(errors) or None,
                                 400 if errors and not done else 200), "finished": not errors}, None

    async def memory(principal, q: w.MemoryQuery, created: float):
        op, p, mem = q.operation_type, q.params, memories
        if op in ("add_memory", "add_agentic_memory"):
            content = param(p, "content")
            try:
                meta = w.metadata(p.get("metadata"))
            except TypeError as e:
                raise StatusError("INVALID_ARGUMENT", f"query_data.{e}") from None
            if op == "add_agentic_memory":
                meta.update(await analysis.analyze(principal, content))
            admit(principal, "memory.add", args=p)
            [memory_id] = await mem.add(principal, [(content, meta, "")])
            return w.memory_response(memory_id=memory_id, content=content, metadata=meta), None
        if op == "get_memory":
            memory_id = param(p, "memory_id")
            admit(principal, "memory.get", args=p)
            return await one_memory(memory_id, mem.get(principal, [memory_id])), None
        if op == "update_memory":
            memory_id = param(p, "memory_id")
            content = param(p, "content", required=False)
            try:
                meta = w.metadata(p.get("metadata")) if p.get("metadata") is not None else None
            except TypeError as e:
                raise StatusError("INVALID_ARGUMENT", f"query_data.{e}") from None
            admit(principal, "memory.update", args=p)
            return await one_memory(memory_id, mem.update(principal, memory_id, content, meta)), None
        if op == "remove_memory":
            memory_id = param(p, "memory_id")
            admit(principal, "memory.delete", args=p)
            n = await mem.delete(principal, [memory_id])
            return w.memory_response(n > 0, memory_id, error=None if n else f"no memory '{memory_id[:64]}'"), None
        # retrieve_memory, retrieve_memory_raw
        query = param(p, "content") if "content" in p or "query" not in p else param(p, "query")
        k = param(p, "k", int, required=False, default=5)
        if not 1 <= k <= 100:
            raise StatusError("INVALID_ARGUMENT", "query_data.params.k must be between 1 and 100")
        admit(principal, "memory.search", args=p)
        # The agent's files are indexed in its memory too (as kind "file"): AIOS's memory holds memories only.
        hits = [h for h in await mem.search(principal, query, min(100, 3 * k)) if h.metadata.get("kind") != "file"][:k]
        return w.memory_response(search_results=[
            {"memory_id": h.id, "content": h.text, "metadata": h.metadata, "distance": h.distance,
             "score": 1.0 / (1.0 + h.distance)} for h in hits]), None

    async def one_memory(memory_id: str, pending) -> dict:
        """The entry a get or an update returns; a missing one is AIOS's `success: false`, not an HTTP error."""
        try:
            r = await pending
        except StatusError as e:
            if e.code != "NOT_FOUND":
                raise
            return w.memory_response(False, memory_id, error=f"no memory '{memory_id[:64]}'")
        r = r[0] if isinstance(r, list) else r
        return w.memory_response(memory_id=r.id, content=r.text, metadata=r.metadata)

    async def storage(principal, q: w.StorageQuery, created: float):
        return w.text_response("storage", await file_ops.run(principal, q.operation_type, q.params)), None

    async def tool(principal, q: w.ToolQuery, created: float):
        try:
            calls = q.calls()
        except TypeError as e:
            raise StatusError("INVALID_ARGUMENT", str(e)) from None
        return await run_tools(principal, calls), None

    handlers = {"llm": llm, "memory": memory, "storage": storage, "tool": tool}

    # -- routes -------------------------------------------------------------------------------------------------
    @app.get("/status")
    async def status(request: Request):
        check_caller(request)
        return {"status": "ok", "message": f"Kernos kernel serving {sorted(models.names())} (AIOS compatible)"}

    @app.get("/core/status")
    async def core_status(request: Request):
        check_caller(request)
        return {c: "active" for c in ("llms", "memory", "storage", "tool", "scheduler")}

    @app.get("/core/llms/list")
    async def llms(request: Request):
        check_caller(request)
        return {"status": "success", "llms": [{"name": m.name, "backend": "kernos", "provider": "kernos",
                                               "default": m.name == models.default}
                                              for m in models.served()]}

    @app.post("/query")
    async def query(request: Request):
        created = time.time()
        kind, passages = "llm", []
        _PASSAGES.set(passages)
        try:
            peer = check_caller(request)
            try:
                body = w.QueryRequest.model_validate_json(await request.body() or b"{}")
            except ValidationError as e:
                raise _bad(e, "") from None
            kind = body.query_type
            try:
                q = w.QUERIES[kind].model_validate(body.query_data)
            except ValidationError as e:
                raise _bad(e, "query_data") from None
            principal = await asyncio.to_thread(bridge.principal, body.agent_name, peer)
            with edge.lifecycle.track():
                try:
                    response, started = await handlers[kind](principal, q, created)
                except TypeError as e:            # a translation found a bad field
                    raise StatusError("INVALID_ARGUMENT", str(e)) from None
            for passage in passages:
                if passage.status == "INTERNAL":    # not refused or failed on its own
                    passage.ok()
            return w.envelope(response, created, started or created, time.time())
        except StatusError as e:
            for passage in passages:
                if passage.status == "INTERNAL":
                    passage.failed(e)
            code, _ = http_status(e)
            response = (w.llm_response(None, error=e.message, status=code) if kind == "llm" else
                        w.memory_response(False, error=e.message) if kind == "memory" else
                        w.text_response(kind, None, e.message, code))
            headers = {"Retry-After": str(max(1, round(e.retry_after_s)))} if e.retry_after_s is not None else None
            return JSONResponse({"detail": e.message, **w.envelope(response, created, created, time.time())}, code,
                                headers=headers)
        finally:
            for passage in passages:
                passage.trace(passage.request_view)
