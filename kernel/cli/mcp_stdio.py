"""`kernos mcp --stdio`: a local MCP client (a desktop assistant, an IDE) talks MCP over this process's stdin and
stdout; every request is relayed to the kernel's `/mcp` endpoint with the agent's token (`KERNOS_TOKEN`), so
what the client sees and may do is decided by the kernel, exactly as over HTTP. Nothing is decided here."""
from __future__ import annotations

import asyncio
import contextlib

import mcp_types as types


async def relay(url: str, token: str) -> None:
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server import Server
    from mcp.server.stdio import stdio_server
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}))
        streams = await stack.enter_async_context(streamable_http_client(url, http_client=http))
        kernel = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
        info = await kernel.initialize()

        async def list_tools(ctx, params) -> types.ListToolsResult:
            return await kernel.list_tools()

        async def call_tool(ctx, params) -> types.CallToolResult:
            return await kernel.call_tool(params.name, params.arguments)

        async def list_resources(ctx, params) -> types.ListResourcesResult:
            return await kernel.list_resources()

        async def read_resource(ctx, params) -> types.ReadResourceResult:
            return await kernel.read_resource(params.uri)

        server = Server("kernos", version=info.server_info.version if info.server_info else "",
                        instructions=info.instructions, on_list_tools=list_tools, on_call_tool=call_tool,
                        on_list_resources=list_resources, on_read_resource=read_resource)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


def run(url: str, token: str) -> int:
    asyncio.run(relay(url, token))
    return 0
