"""Kernos as an MCP server (`/mcp`, streamable HTTP, on the kernel's HTTP server). An MCP client authenticates
with an agent's token (`Authorization: Bearer`) and sees, under that agent's rights, what it could reach over
gRPC: the tools it may execute (built-ins such as memory_search, public and its own tools, with their JSON schemas;
irreversible ones still wait for an operator's confirmation), memory add, and its files (tools to read, write, list
and see the history of them, and each file as a resource `kernos://files/PATH`). Every call passes the gate
as the syscall it stands for, so capabilities, grants, quotas, the audit log and traces apply; the tools use
case, the memory use case and the files use case do the work. `kernos mcp --stdio` relays a local MCP client
to this endpoint."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace
from urllib.parse import quote, unquote

import mcp_types as types

from kernos.storage.status import StatusError

from ..grpc.interceptor import record_call, token_from_metadata

PREFIX = "kernos_"        # the syscalls offered as tools; a Kernos tool name never holds a ':' or starts so
URI = "kernos://files/"


def _schema(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


_STR = {"type": "string"}
SYSCALL_TOOLS = {
    "memory_add": ("Remember a text (with optional string metadata) in long-term memory.", "/kernos.v1.Memory/Add",
                   _schema({"text": _STR, "metadata": {"type": "object", "additionalProperties": _STR}}, ["text"])),
    "storage_read": ("Read a file (its latest version, or `version`).", "/kernos.v1.Storage/Read",
                     _schema({"path": _STR, "version": {"type": "integer", "minimum": 0, "maximum": (1 << 31) - 1}},
                             ["path"])),
    "storage_write": ("Write a text file (a new version).", "/kernos.v1.Storage/Write",
                      _schema({"path": _STR, "content": _STR}, ["path", "content"])),
    "storage_list": ("List files (under `prefix`).", "/kernos.v1.Storage/List", _schema({"prefix": _STR}, [])),
    "storage_history": ("A file's versions.", "/kernos.v1.Storage/History", _schema({"path": _STR}, ["path"])),
}


def build(kernel):
    """The MCP server (mcp's low-level `Server`) over the kernel's use cases."""
    from mcp.server import Server

    gate = kernel.gate

    def principal_of(ctx):
        request = getattr(ctx, "request", None)
        header = request.headers.get("authorization", "") if request is not None else ""
        principal = gate.authenticate(token_from_metadata([("authorization", header)]))
        if principal is None:
            raise StatusError("UNAUTHENTICATED", "missing, unknown or revoked token")
        return principal

    def trace(principal, kind: str, status: str, args: dict, t0: float) -> None:
        record_call(kernel.traces, principal.agent_id, f"mcp.{kind}", status, args, t0)

    async def list_tools(ctx, params) -> types.ListToolsResult:
        principal = principal_of(ctx)
        gate.admit(principal, "/kernos.v1.Tools/List", None)
        tools = [types.Tool(name=t.name_for(principal), description=t.description or t.name,
                            input_schema=t.schema,
                            annotations=types.ToolAnnotations(destructive_hint=t.irreversible))
                 for t in kernel.tools.visible(principal)]
        tools += [types.Tool(name=PREFIX + name, description=text, input_schema=schema)
                  for name, (text, _, schema) in SYSCALL_TOOLS.items()]
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx, params) -> types.CallToolResult:
        principal = principal_of(ctx)
        name, args, t0 = params.name, dict(params.arguments or {}), time.monotonic()
        status = "INTERNAL"
        try:
            with kernel.lifecycle.track():
                if name.startswith(PREFIX) and name[len(PREFIX):] in SYSCALL_TOOLS:
                    result = await syscall(principal, name[len(PREFIX):], args)
                else:
                    result = await tool(principal, name, args)
            status = "OK"
            text = result if isinstance(result, str) else json.dumps(result)
            return types.CallToolResult(content=[types.TextContent(text=text)], is_error=False)
        except StatusError as e:
            status = e.code
            return types.CallToolResult(content=[types.TextContent(text=f"{e.code}: {e.message}")], is_error=True)
        finally:
            trace(principal, "call_tool", status, {"name": name}, t0)

    async def tool(principal, name: str, args: dict):
        gate.admit(principal, "/kernos.v1.Tools/Call", None)
        call = await kernel.tools.call_and_wait(principal, name, json.dumps(args))   # irreversible: an operator
        if call.state != "done":
            raise StatusError("ABORTED" if call.state == "denied" else "FAILED_PRECONDITION",
                              f"tool '{name}' {call.state}: {call.error}")
        return call.result

    async def syscall(principal, name: str, a: dict):
        _, method, _ = SYSCALL_TOOLS[name]
        path = a.get("path", "")
        gate.admit(principal, method, SimpleNamespace(namespace="", owner="", path=path, prefix=a.get("prefix", "")))
        if name == "memory_add":
            meta = {str(k): str(v) for k, v in (a.get("metadata") or {}).items()}
            [memory_id] = await kernel.memory.add(principal, [(str(a["text"]), meta, "")])
            return {"id": memory_id}
        if name == "storage_read":
            f, data = await kernel.storage.read(principal, path, int(a.get("version") or 0))
            return data.decode("utf-8", errors="replace")
        if name == "storage_write":
            f = await kernel.storage.write(principal, path, str(a["content"]).encode(), {"source": "mcp"}, False)
            return {"path": f.path, "version": f.version, "size": f.size}
        if name == "storage_list":
            return [{"path": f.path, "version": f.version, "size": f.size}
                    for f in await kernel.storage.list(principal, a.get("prefix", ""))]
        return [{"version": f.version, "size": f.size, "created": f.created, "deleted": f.deleted}
                for f in await kernel.storage.history(principal, path)]

    async def list_resources(ctx, params) -> types.ListResourcesResult:
        principal = principal_of(ctx)
        gate.admit(principal, "/kernos.v1.Storage/List", SimpleNamespace(owner="", path="", prefix=""))
        files = await kernel.storage.list(principal, "")
        return types.ListResourcesResult(resources=[
            types.Resource(uri=URI + quote(f.path), name=f.path, size=f.size,
                           description=f"version {f.version}") for f in files])

    async def read_resource(ctx, params) -> types.ReadResourceResult:
        principal = principal_of(ctx)
        uri = str(params.uri)
        if not uri.startswith(URI):
            raise StatusError("NOT_FOUND", f"no resource '{uri[:128]}' (files are {URI}PATH)")
        path = unquote(uri[len(URI):])
        gate.admit(principal, "/kernos.v1.Storage/Read", SimpleNamespace(owner="", path=path, prefix=""))
        f, data = await kernel.storage.read(principal, path)
        try:
            return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, text=data.decode())])
        except UnicodeDecodeError:
            import base64
            return types.ReadResourceResult(contents=[types.BlobResourceContents(
                uri=uri, blob=base64.b64encode(data).decode())])

    return Server("kernos", version="0.1.0", instructions="Kernos: an agent kernel's tools, memory and files.",
                  on_list_tools=list_tools, on_call_tool=call_tool, on_list_resources=list_resources,
                  on_read_resource=read_resource)


def mount(app, kernel):
    """Serve `/mcp` (stateless streamable HTTP: every request carries its token); returns the session manager
    whose `run()` the HTTP server keeps open while it serves."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    manager = StreamableHTTPSessionManager(app=build(kernel), stateless=True, json_response=True)

    class Endpoint:                 # an ASGI app (a class instance, so that Starlette's Route passes scope through)
        async def __call__(self, scope, receive, send):
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            token = token_from_metadata([("authorization", headers.get("authorization", ""))])
            if kernel.gate.authenticate(token) is None:
                response = JSONResponse({"error": "send an agent's token: Authorization: Bearer <token>"}, 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            await manager.handle_request(scope, receive, send)

    app.router.routes.append(Route("/mcp", Endpoint(), methods=["GET", "POST", "DELETE"]))
    return manager
