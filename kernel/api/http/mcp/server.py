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
from urllib.parse import quote, unquote

import mcp_types as types

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import syscall

from ...edge import Edge, bearer, bounded

PREFIX = "kernos_"        # the syscalls offered as tools; a Kernos tool name never holds a ':' or starts so
URI = "kernos://files/"


def _schema(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


_STR = {"type": "string"}
SYSCALL_TOOLS = {
    "memory_add": ("Remember a text (with optional string metadata) in long-term memory.", "memory.add",
                   _schema({"text": _STR, "metadata": {"type": "object", "additionalProperties": _STR}}, ["text"])),
    "storage_read": ("Read a file (its latest version, or `version`).", "storage.read",
                     _schema({"path": _STR, "version": {"type": "integer", "minimum": 0, "maximum": (1 << 31) - 1}},
                             ["path"])),
    "storage_write": ("Write a text file (a new version).", "storage.write",
                      _schema({"path": _STR, "content": _STR}, ["path", "content"])),
    "storage_list": ("List files (under `prefix`).", "storage.list", _schema({"prefix": _STR}, [])),
    "storage_history": ("A file's versions.", "storage.history", _schema({"path": _STR}, ["path"])),
}


# MCP's methods -> the syscall each is (a kernel tool's call is tools.call; a kernos_* tool's, its own)
METHODS = {"tools/list": "tools.list", "tools/call": "tools.call", "resources/list": "storage.list",
          "resources/read": "storage.read", **{PREFIX + name: spec[1] for name, spec in SYSCALL_TOOLS.items()}}

# (method, path) -> the syscalls the route makes: the one MCP endpoint carries all of METHODS
ROUTES = {(m, "/mcp"): tuple(sorted(set(METHODS.values()))) for m in ("GET", "POST", "DELETE")}


def build(edge: Edge, tools, files, memory):
    """The MCP server (mcp's low-level `Server`) over the kernel's use cases."""
    from mcp.server import Server

    def enter(ctx, call):
        request = getattr(ctx, "request", None)
        return edge.enter(call, bearer(request.headers.get("authorization", "") if request is not None else ""))

    async def list_tools(ctx, params) -> types.ListToolsResult:
        principal = enter(ctx, syscall("tools.list")).principal
        listed = [types.Tool(name=t.name_for(principal), description=t.description or t.name,
                             input_schema=t.schema, annotations=types.ToolAnnotations(destructive_hint=t.irreversible))
                  for t in tools.visible(principal)]
        listed += [types.Tool(name=PREFIX + name, description=text, input_schema=schema)
                   for name, (text, _, schema) in SYSCALL_TOOLS.items()]
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx, params) -> types.CallToolResult:
        name, args = params.name, dict(params.arguments or {})
        own = name.startswith(PREFIX) and name[len(PREFIX):] in SYSCALL_TOOLS
        call = syscall(METHODS[name], path=args.get("path", "") or args.get("prefix", "")) if own else \
            syscall("tools.call")
        passage = None
        try:
            passage = enter(ctx, call)
            with passage.track():
                result = await (syscall_tool(passage.principal, name[len(PREFIX):], args) if own else
                                tool(passage.principal, name, args))
            passage.ok()
            text = result if isinstance(result, str) else json.dumps(result)
            return types.CallToolResult(content=[types.TextContent(text=text)], is_error=False)
        except StatusError as e:
            if passage is not None:
                passage.failed(e)
            return types.CallToolResult(content=[types.TextContent(text=f"{e.code}: {e.message}")], is_error=True)
        finally:
            if passage is not None:
                passage.trace({"name": name, "arguments": bounded(args), "via": "mcp"})

    async def tool(principal, name: str, args: dict):
        call = await tools.call_and_wait(principal, name, json.dumps(args))   # irreversible: an operator
        if call.state != "done":
            raise StatusError("ABORTED" if call.state == "denied" else "FAILED_PRECONDITION",
                              f"tool '{name}' {call.state}: {call.error}")
        return call.result

    async def syscall_tool(principal, name: str, a: dict):
        path = a.get("path", "")
        if name == "memory_add":
            meta = {str(k): str(v) for k, v in (a.get("metadata") or {}).items()}
            [memory_id] = await memory.add(principal, [(str(a["text"]), meta, "")])
            return {"id": memory_id}
        if name == "storage_read":
            f, data = await files.read(principal, path, int(a.get("version") or 0))
            return data.decode("utf-8", errors="replace")
        if name == "storage_write":
            f = await files.write(principal, path, str(a["content"]).encode(), {"source": "mcp"}, False)
            return {"path": f.path, "version": f.version, "size": f.size}
        if name == "storage_list":
            return [{"path": f.path, "version": f.version, "size": f.size}
                    for f in await files.list(principal, a.get("prefix", ""))]
        return [{"version": f.version, "size": f.size, "created": f.created, "deleted": f.deleted}
                for f in await files.history(principal, path)]

    async def list_resources(ctx, params) -> types.ListResourcesResult:
        principal = enter(ctx, syscall("storage.list")).principal
        found = await files.list(principal, "")
        return types.ListResourcesResult(resources=[
            types.Resource(uri=URI + quote(f.path), name=f.path, size=f.size,
                           description=f"version {f.version}") for f in found])

    async def read_resource(ctx, params) -> types.ReadResourceResult:
        uri = str(params.uri)
        if not uri.startswith(URI):
            raise StatusError("NOT_FOUND", f"no resource '{uri[:128]}' (files are {URI}PATH)")
        path = unquote(uri[len(URI):])
        principal = enter(ctx, syscall("storage.read", path=path)).principal
        f, data = await files.read(principal, path)
        try:
            return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, text=data.decode())])
        except UnicodeDecodeError:
            import base64
            return types.ReadResourceResult(contents=[types.BlobResourceContents(
                uri=uri, blob=base64.b64encode(data).decode())])

    return Server("kernos", version="0.1.0", instructions="Kernos: an agent kernel's tools, memory and files.",
                  on_list_tools=list_tools, on_call_tool=call_tool, on_list_resources=list_resources,
                  on_read_resource=read_resource)


def mount(app, edge: Edge, tools, files, memory):
    """Serve `/mcp` (stateless streamable HTTP: every request carries its token); returns the session manager
    whose `run()` the HTTP server keeps open while it serves."""
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    manager = StreamableHTTPSessionManager(app=build(edge, tools, files, memory), stateless=True, json_response=True)

    class Endpoint:                 # an ASGI app (a class instance, so that Starlette's Route passes scope through)
        async def __call__(self, scope, receive, send):
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
            if edge.gate.authenticate(bearer(headers.get("authorization", ""))) is None:
                response = JSONResponse({"error": "send an agent's token: Authorization: Bearer <token>"}, 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            await manager.handle_request(scope, receive, send)

    app.router.routes.append(Route("/mcp", Endpoint(), methods=["GET", "POST", "DELETE"]))
    return manager
