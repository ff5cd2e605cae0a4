"""The HTTP server (uvicorn) in the kernel's own event loop, beside gRPC: started after the kernel is built,
stopped after the drain. The kernel keeps its own signal handling."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

log = logging.getLogger("kernos.http")


def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP (with 0, Nagle's algorithm and
    # delayed ACKs added ~40 ms to every call, measured with benchmarks/http.py)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    return sock


async def start(kernel, edge, listen: str):
    """(server, its task, the address it listens on: port 0 becomes the one the system picked)."""
    import uvicorn

    from .app import build
    from .limits import RequestLimits, head_timeout_protocol

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):        # SIGTERM belongs to the kernel: it drains, then stops us
            yield

    sock = _bind(listen)
    app = build(kernel, edge)
    mcp_task = None
    if app.state.mcp is not None:          # the MCP endpoint's session manager lives as long as the server
        ready = asyncio.Event()

        async def run_mcp():
            async with app.state.mcp.run():
                ready.set()
                await asyncio.Event().wait()
        mcp_task = asyncio.create_task(run_mcp())
        await asyncio.wait_for(ready.wait(), 10)
    inner = app
    if kernel.cluster is not None:        # an agent's /v1, /mcp and /query requests are served on its home
        from .forward import HomeForwarding

        inner = HomeForwarding(app, kernel.cluster, kernel.registry.identify, aios=app.state.aios_names)
    limited = RequestLimits(inner, kernel.config.server.max_http_body_bytes, kernel.config.server.http_body_timeout_s,
                            kernel.gate.authenticate)
    # Heads are bounded by h11 (16 KiB, then 400) and in time (head_timeout_protocol), bodies by RequestLimits.
    config = uvicorn.Config(limited, log_level="warning", access_log=False, lifespan="off",
                            timeout_keep_alive=30, http=head_timeout_protocol(kernel.config.server.http_body_timeout_s))
    server = Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()                 # raises what stopped it
            raise RuntimeError("the HTTP server stopped at start")
        await asyncio.sleep(0.01)
    if app.state.history is not None:      # the console's charts sample while the server is up
        server.sampler = asyncio.create_task(app.state.history.run())
    server.mcp_task = mcp_task
    server.forwarding = inner if inner is not app else None
    host, port = sock.getsockname()[:2]
    return server, task, f"{'[' + host + ']' if ':' in host else host}:{port}"


async def stop(server, task) -> None:
    for background in (getattr(server, "sampler", None), getattr(server, "mcp_task", None)):
        if background is not None:
            background.cancel()
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(task, 10)
    if getattr(server, "forwarding", None) is not None:
        await server.forwarding.close()
