"""External MCP servers mounted into the kernel's tool registry (`[[tools.mcp]]`). Each server's tools become
kernel tools named `SERVER__TOOL` with the server's JSON schemas, so agents call them through the tool syscall
and the LLM tool loop like any other tool: access checks, per-tool and per-agent limits, confirmation of the
ones configured irreversible, traces.

Each server is supervised by a task in the kernel's event loop: started (a command, over its stdio) or
connected to (a URL), initialized, its tools listed and mounted, then pinged every few seconds. A server that
dies or stops answering is restarted with a growing delay; while it is down its tools answer UNAVAILABLE at
once, and a call that outlives `timeout_s` fails with DEADLINE_EXCEEDED. No call ever hangs on a dead
server."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re

from kernos.abi.errors import StatusError

from .spec import Tool

log = logging.getLogger("kernos.tools.mcp")

PING_S = 5.0
MAX_BACKOFF_S = 30.0


def tool_name(server: str, name: str) -> str:
    return f"{server}__{re.sub(r'[^a-z0-9_]', '_', name.lower())}"[:64]


class McpMount:
    def __init__(self, config, manager):
        self.config = config               # McpServerConfig
        self.manager = manager             # ToolManager
        self.session = None
        self.state = "starting"            # starting | up | down
        self.error = ""
        self.restarts = 0
        self._names: dict[str, str] = {}   # kernel tool name -> the server's tool name

    def _transport(self):
        c = self.config
        if c.command:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            return stdio_client(StdioServerParameters(command=c.command[0], args=list(c.command[1:]),
                                                      env={**os.environ, **c.env}))
        return self._http()

    @contextlib.asynccontextmanager
    async def _http(self):
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with create_mcp_http_client(headers=dict(self.config.headers)) as http:
            async with streamable_http_client(self.config.url, http_client=http) as streams:
                yield streams[0], streams[1]

    async def run(self) -> None:
        """Keep the server mounted until cancelled."""
        from mcp.client.session import ClientSession

        delay = 0.5
        while True:
            try:
                async with self._transport() as streams, ClientSession(streams[0], streams[1]) as session:
                    await asyncio.wait_for(session.initialize(), self.config.timeout_s)
                    listed = await asyncio.wait_for(session.list_tools(), self.config.timeout_s)
                    self._mount(listed.tools)
                    self.session, self.state, self.error, delay = session, "up", "", 0.5
                    log.info("MCP server '%s' mounted: %s", self.config.name, sorted(self._names))
                    while True:
                        await asyncio.sleep(PING_S)
                        await asyncio.wait_for(session.send_ping(), self.config.timeout_s)
            except asyncio.CancelledError:
                raise
            except BaseException as e:              # noqa: BLE001 - anyio groups, a dead pipe, a bad server
                self.error = _reason(e)
                log.warning("MCP server '%s' is down (%s); restarting in %.1f s", self.config.name, self.error,
                            delay)
            finally:
                self.session = None
                if self.state == "up":
                    self.restarts += 1
                self.state = "down"
            await asyncio.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    def _mount(self, tools) -> None:
        c = self.config
        mounted = []
        self._names = {}
        for t in tools:
            name = tool_name(c.name, t.name)
            self._names[name] = t.name
            mounted.append(Tool(name=name, description=(t.description or t.name)[:1024],
                                schema=dict(t.input_schema or {"type": "object"}), owner="kernel",
                                irreversible=t.name in c.irreversible, timeout_s=c.timeout_s, public=c.public,
                                builtin=self._caller(name)))
        self.manager.mount(f"mcp:{c.name}", mounted)

    def _caller(self, name: str):
        async def call(tools, principal, args: dict):
            return await self.call(name, args)
        return call

    async def call(self, name: str, args: dict):
        session = self.session
        if session is None:
            raise StatusError("UNAVAILABLE", f"MCP server '{self.config.name}' is down ({self.error or 'starting'});"
                                             " the kernel is restarting it", 1.0)
        try:
            result = await asyncio.wait_for(session.call_tool(self._names[name], args), self.config.timeout_s)
        except asyncio.TimeoutError:
            raise StatusError("DEADLINE_EXCEEDED", f"MCP tool '{name}' took over {self.config.timeout_s:g} s") \
                from None
        except StatusError:
            raise
        except Exception as e:                      # the connection broke under the call
            raise StatusError("UNAVAILABLE", f"MCP server '{self.config.name}' failed during the call: "
                                             f"{_reason(e)}", 1.0) from None
        text = "".join(getattr(c, "text", "") for c in result.content)
        if result.is_error:
            raise StatusError("FAILED_PRECONDITION", f"MCP tool '{name}': {text[:500]}")
        if not result.content and result.structured_content is not None:
            return result.structured_content
        try:                 # the text a tool returned (servers wrap plain values as {"result": ...} when structured)
            return json.loads(text)
        except ValueError:
            return text


def _reason(e: BaseException) -> str:
    inner = getattr(e, "exceptions", None)
    if inner:
        return _reason(inner[0])
    return f"{type(e).__name__}: {e}"[:300]
