"""AIOS compatibility (`server.aios_compat`): agents written with AIOS's SDK (Cerebrum) run unchanged against
Kernos. They send every syscall as `POST /query` and read `result["response"][...]`; at start they call
`/status` and `/core/llms/list`. Each query is mapped onto Kernos's own syscalls, each through the one edge (the
same admission, quotas, audit, scheduling and trace kinds as gRPC): `llm` onto generate (the five action types),
`memory` onto long-term memory, `storage` onto versioned files, `tool` onto the tool syscall.

AIOS has no authentication: any caller names itself any agent. Here each name is its own Kernos agent
(`security/bridge.py`), isolated from every other name, in the group `[aios] group` with the capabilities
`[aios] capabilities`; the routes answer loopback callers only unless `[aios] allow_remote`, and require a
shared bearer token when `[aios] token` is set. A bad body gets a 400 that names the field (AIOS answers 500), a
kernel error its HTTP status with the AIOS-shaped body, never a dead kernel."""
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

from ....security.bridge import BridgedAgents
from ...edge import Edge, bounded, http_status
from ..openai import wire as openai_wire
from ..openai.routes import complete
from . import wire as w

log = logging.getLogger("kernos.aios")
_PASSAGES: ContextVar = ContextVar("kernos_aios_passages")
# query_type (and operation) -> the syscall it is; an LLM query is llm.generate (and, for call_tool and
# operate_file, the tool calls and storage operations the model picks, each admitted as its own syscall)
ROUTES = {"llm": "llm.generate", "memory.add_memory": "memory.add", "memory.add_agentic_memory": "memory.add",
          "memory.get_memory": "memory.get", "memory.update_memory": "memory.update",
          "memory.remove_memory": "memory.delete", "memory.retrieve_memory": "memory.search",
          "memory.retrieve_memory_raw": "memory.search", "storage.write": "storage.write",
          "storage.create_file": "storage.write", "storage.rollback": "storage.rollback",
          "storage.share": "access.grant", "storage.retrieve": "storage.search", "tool": "tools.call"}

AGENTIC_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["keywords", "context", "tags"],
                  "properties": {"keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                                 "context": {"type": "string"},
                                 "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8}}}


def _fn(name: str, description: str, props: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}


_PATH = {"type": "string", "description": "the file's path, e.g. notes/plan.txt"}
# operate_file: the storage operations the model may pick (AIOS's own set).
FILE_TOOLS = [_fn("write", "Write text into a file (a new version).",
                  {"file_path": _PATH, "content": {"type": "string"}}),
              _fn("create_file", "Create an empty file.", {"file_path": _PATH}),
              _fn("create_dir", "Create a directory.", {"dir_path": {"type": "string"}}),
              _fn("rollback", "Restore a file as it was n versions ago.",
                  {"file_path": _PATH, "n": {"type": "integer", "minimum": 1}}),
              _fn("share", "Share a file with the other AIOS agents.", {"file_path": _PATH}),
              _fn("retrieve", "Find files by meaning.", {"query_text": {"type": "string"}})]


def _bad(e: ValidationError, prefix: str) -> StatusError:
    first = e.errors()[0]
    where = ".".join(str(x) for x in (prefix, *first["loc"]) if x != "")
    return StatusError("INVALID_ARGUMENT", f"{where or 'body'}: {first['msg']}")


def _param(params: dict, key: str, kind=str, required: bool = True, default=None):
    v = params.get(key, default)
    if v is None and not required:
        return default
    if kind is int and isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if (not isinstance(v, kind) or (kind is str and required and not v.strip()) or isinstance(v, bool) and kind is int
            or kind is int and not 0 <= v < (1 << 31)):
        what = "a non-empty string" if kind is str else "an integer from 0 to 2^31-1"
        raise StatusError("INVALID_ARGUMENT", f"query_data.params.{key} must be {what}")
    return v


def _text(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


def mount(app: FastAPI, edge: Edge, kernel) -> None:
    cfg = kernel.config.aios
    bridge = BridgedAgents(kernel.registry, kernel.access_control, kernel.config.data_dir / "aios_agents.json",
                           "aios", cfg.prefix, cfg.group, cfg.capabilities, cfg.max_agents, cfg.new_agents_per_minute)

    def admit(principal, name: str, path: str = "", args: dict | None = None):
        """Admit one syscall of a query through the edge; it is traced when the query ends."""
        passage = edge.enter(syscall(name, path=path), principal=principal)
        passage.request_view = {**bounded(args or {}), "via": "aios"}
        _PASSAGES.get().append(passage)
        return passage

    def check_caller(request: Request) -> None:
        host = request.client.host if request.client else ""
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

    def served_model(q: w.LLMQuery) -> str:
        names = set(kernel.llm.models)
        for llm in q.llms or []:
            name = llm.get("name") if isinstance(llm, dict) else None
            if isinstance(name, str) and name:
                model, _ = openai_wire.split_model(name, names)
                if model in names:
                    return name
                if cfg.unknown_model == "error":
                    raise StatusError("NOT_FOUND", f"no model '{name[:128]}' on this kernel; served: {sorted(names)}")
        return kernel.llm.default

    async def generate(principal, body: dict):
        try:
            message = openai_wire.chat_request(openai_wire.ChatRequest.model_validate(body), set(kernel.llm.models))
        except ValidationError as e:
            raise _bad(e, "query_data") from None
        return await complete(edge.enter(syscall("llm.generate"), principal=principal), kernel.generate, message)

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
                call = await kernel.tools.call_and_wait(principal, name, json.dumps(args))
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
        reply = await generate(principal, w.chat_body(q, model, tool_choice="required" if wants_tools else None,
                                                       response_format=rf))
        started = created + reply.queue_wait_ms / 1e3
        calls = w.calls_of(reply, w.tool_names(q))
        if action == "call_tool":
            return await run_tools(principal, [(c["name"], c["parameters"]) for c in calls]), started
        return w.llm_response(reply.text if (reply.text or not calls) else None, calls), started

    async def operate_file(principal, q: w.LLMQuery, model: str):
        system = {"role": "system", "content": "You turn the user's request into file operations. Call the "
                                               "operations that do what the user asks."}
        body = w.chat_body(q, model, tools=FILE_TOOLS, tool_choice="required")
        body["messages"] = [system] + body["messages"]
        reply = await generate(principal, body)
        done, errors = [], []
        for c in w.calls_of(reply):
            try:
                done.append(await storage_op(principal, c["name"], c["parameters"]))
            except StatusError as e:
                errors.append(f"{c['name']}: {e.message}")
        message = " ".join(done) if done else "No file operation was done."
        return {**w.llm_response(message, w.calls_of(reply), "; ".join(errors) or None,
                                 400 if errors and not done else 200), "finished": not errors}, None

    async def memory(principal, q: w.MemoryQuery, created: float):
        op, p, mem = q.operation_type, q.params, kernel.memory
        if op in ("add_memory", "add_agentic_memory"):
            content = _param(p, "content")
            try:
                meta = w.metadata(p.get("metadata"))
            except TypeError as e:
                raise StatusError("INVALID_ARGUMENT", f"query_data.{e}") from None
            if op == "add_agentic_memory":
                meta.update(await analyze(principal, content))
            admit(principal, "memory.add", args=p)
            [memory_id] = await mem.add(principal, [(content, meta, "")])
            return w.memory_response(memory_id=memory_id, content=content, metadata=meta), None
        if op == "get_memory":
            memory_id = _param(p, "memory_id")
            admit(principal, "memory.get", args=p)
            return await one_memory(memory_id, mem.get(principal, [memory_id])), None
        if op == "update_memory":
            memory_id = _param(p, "memory_id")
            content = _param(p, "content", required=False)
            try:
                meta = w.metadata(p.get("metadata")) if p.get("metadata") is not None else None
            except TypeError as e:
                raise StatusError("INVALID_ARGUMENT", f"query_data.{e}") from None
            admit(principal, "memory.update", args=p)
            return await one_memory(memory_id, mem.update(principal, memory_id, content, meta)), None
        if op == "remove_memory":
            memory_id = _param(p, "memory_id")
            admit(principal, "memory.delete", args=p)
            n = await mem.delete(principal, [memory_id])
            return w.memory_response(n > 0, memory_id, error=None if n else f"no memory '{memory_id[:64]}'"), None
        # retrieve_memory, retrieve_memory_raw
        query = _param(p, "content") if "content" in p or "query" not in p else _param(p, "query")
        k = _param(p, "k", int, required=False, default=5)
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

    async def analyze(principal, content: str) -> dict[str, str]:
        """add_agentic_memory: keywords, a one-line context and tags, by the model, as JSON that fits a schema."""
        body = {"model": kernel.llm.default, "max_tokens": 160, "temperature": 0.0, "messages": [
            {"role": "system", "content": "Reply with a JSON object: the content's keywords (nouns, verbs, key "
                                          "concepts), a one-sentence context, and broad tags."},
            {"role": "user", "content": content}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "analysis", "schema": AGENTIC_SCHEMA,
                                                                       "strict": True}}}
        reply = await generate(principal, body)
        try:
            data = json.loads(reply.text)
        except ValueError:                           # cut short by max_tokens: keep what the content says
            return {"context": content[:200]}
        return {"keywords": ", ".join(map(str, data.get("keywords", [])))[:1000],
                "context": str(data.get("context", ""))[:1000],
                "tags": ", ".join(map(str, data.get("tags", [])))[:1000]}

    async def storage(principal, q: w.StorageQuery, created: float):
        return w.text_response("storage", await storage_op(principal, q.operation_type, q.params)), None

    async def storage_op(principal, op: str, p: dict) -> str:
        files = kernel.storage
        if op == "mount":
            return f"mounted the storage of agent '{principal.agent_id}' (each AIOS agent has its own)"
        if op == "create_dir":
            path = _param(p, "dir_path")
            return f"directory '{path}' is ready (directories exist through the files in them)"
        if op in ("write", "create_file"):
            path = _param(p, "file_path")
            content = _param(p, "content", required=False, default="") if op == "write" else ""
            if not isinstance(content, str):
                raise StatusError("INVALID_ARGUMENT", "query_data.params.content must be a string")
            admit(principal, "storage.write", path, {"file_path": path})
            if op == "create_file":
                try:
                    f = await files.stat(principal, path)
                    if not f.deleted:
                        return f"file '{f.path}' already exists (version {f.version})"
                except StatusError as e:
                    if e.code != "NOT_FOUND":
                        raise
            data = content.encode()
            # AIOS indexes what it writes, for retrieve; past storage.max_indexed_bytes the file is stored unindexed
            # (a 3.8 MB write spent 45 s embedding and then failed)
            index = bool(content.strip()) and len(data) <= files.max_indexed_bytes
            f = await files.write(principal, path, data, {"source": "aios"}, index)
            note = "" if index or not content.strip() else (
                f"; not indexed for retrieve: over {files.max_indexed_bytes} bytes (storage.max_indexed_bytes)")
            return f"wrote '{f.path}' (version {f.version}, {f.size} bytes{note})"
        if op == "rollback":
            path = _param(p, "file_path")
            n = _param(p, "n", int, required=False, default=1)
            admit(principal, "storage.rollback", path, {"file_path": path, "n": n})
            history = await files.history(principal, path)
            if n < 1 or n >= len(history):
                raise StatusError("OUT_OF_RANGE", f"'{path}' has {len(history)} versions: cannot go back {n}")
            target = history[-1 - n].version
            f = await files.rollback(principal, path, target)
            return f"rolled '{f.path}' back to version {target} (now version {f.version})"
        if op == "share":
            path = _param(p, "file_path")
            admit(principal, "access.grant", args={"file_path": path})
            await files.stat(principal, path)
            await kernel.access.grant(principal, f"group:{cfg.group}", "storage", principal.agent_id, path, "read", 0)
            return (f"shared '{path}' with every AIOS agent (read it as owner '{principal.agent_id}', "
                    f"path '{path}')")
        # retrieve
        query = _param(p, "query_text")
        n = _param(p, "n", int, required=False, default=5)
        admit(principal, "storage.search", args={"query_text": query})
        hits = await files.search(principal, query, max(1, min(50, n)))
        return json.dumps([{"file_path": path, "version": version, "passage": passage, "distance": d}
                           for path, version, passage, d in hits])

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
        return {"status": "ok", "message": f"Kernos kernel serving {sorted(kernel.llm.models)} (AIOS compatible)"}

    @app.get("/core/status")
    async def core_status(request: Request):
        check_caller(request)
        return {c: "active" for c in ("llms", "memory", "storage", "tool", "scheduler")}

    @app.get("/core/llms/list")
    async def llms(request: Request):
        check_caller(request)
        return {"status": "success", "llms": [{"name": m.name, "backend": "kernos", "provider": "kernos",
                                               "default": m.name == kernel.llm.default}
                                              for m in kernel.llm.models.values()]}

    @app.post("/query")
    async def query(request: Request):
        created = time.time()
        kind, passages = "llm", []
        _PASSAGES.set(passages)
        try:
            check_caller(request)
            try:
                body = w.QueryRequest.model_validate_json(await request.body() or b"{}")
            except ValidationError as e:
                raise _bad(e, "") from None
            kind = body.query_type
            try:
                q = w.QUERIES[kind].model_validate(body.query_data)
            except ValidationError as e:
                raise _bad(e, "query_data") from None
            principal = await asyncio.to_thread(bridge.principal, body.agent_name,
                                                request.client.host if request.client else "")
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
