"""The daemon (`kernos serve`): builds the kernel and the one edge, starts gRPC and, beside it, HTTP, announces
itself, and on SIGTERM/SIGINT drains in-flight syscalls before it stops."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from .api.edge import Edge
from .api.grpc import server as grpc_server
from .app import Kernel
from .config import KernelConfig

log = logging.getLogger("kernos.kernel")


async def _flush_agents_periodically(kernel: Kernel) -> None:
    while True:
        await asyncio.sleep(5)
        kernel.flush()


async def serve(config: KernelConfig) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    kernel = Kernel(config)
    edge = Edge(kernel.gate, kernel.traces, kernel.lifecycle)
    server, health = grpc_server.build(kernel, edge)
    try:
        address = grpc_server.listen(server, config.server)
    except (RuntimeError, OSError) as e:
        log.error("cannot listen on %s: %s", config.server.listen, e)
        kernel.drain(0)
        kernel.close()
        return 2
    await server.start()
    if address.startswith("unix:"):
        os.chmod(address[5:], config.server.socket_mode)  # who may connect: the socket's owner and group
    await grpc_server.set_serving(health, True)
    await kernel.tools.start_mounts()          # external MCP servers' tools ([[tools.mcp]])
    http = None
    if config.server.http_listen:
        from .api.http import server as http_server

        try:
            http = await http_server.start(kernel, edge, config.server.http_listen)
        except (OSError, RuntimeError) as e:
            log.error("cannot serve HTTP on %s: %s", config.server.http_listen, e)
            await server.stop(grace=0)
            kernel.drain(0)
            kernel.close()
            return 2
    (config.data_dir / "kernel.addr").write_text(address + "\n")
    beats = None
    if kernel.cluster is not None:
        kernel.cluster.join(config.cluster.reach(address), config.cluster.reach(http[2], http=True) if http else "",
                            sorted(kernel.llm.models))
        if kernel.forwarder is not None:       # drained: running gRPC streams continue on their agents' new homes
            hand_over, streams = kernel.generate.control.hand_over, kernel.forwarder.streams
            kernos_loop = asyncio.get_running_loop()
            kernel.cluster.on_drain = lambda: asyncio.run_coroutine_threadsafe(
                hand_over(lambda rid: rid in streams), kernos_loop)
        beats = asyncio.create_task(kernel.cluster.run(kernel.publisher.sync, kernel.jobs.adopt))
    # One machine-readable line on stdout: tests and `kernos demo` wait for it.
    print(f"KERNOS READY {address} pid={os.getpid()}" + (f" http={http[2]}" if http else ""), flush=True)
    if http:
        log.info("OpenAI-compatible API on http://%s/v1", http[2])
    log.info("serving %s on %s (data dir %s)", sorted(kernel.llm.models), address, config.data_dir)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    flusher = asyncio.create_task(_flush_agents_periodically(kernel))
    continual = asyncio.create_task(kernel.continual.run())       # agents' continual tuning rounds
    await stop.wait()

    log.info("shutting down: draining in-flight generations (up to %.0f s)", config.server.drain_timeout_s)
    await grpc_server.set_serving(health, False)
    await loop.run_in_executor(None, kernel.drain, config.server.drain_timeout_s)
    # Let the handlers send the replies the engines just finished, then close.
    for _ in range(100):
        if kernel.lifecycle.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    if http:
        await http_server.stop(http[0], http[1])
    await server.stop(grace=2.0)
    await kernel.tools.stop_mounts()
    flusher.cancel()
    continual.cancel()
    if beats is not None:
        beats.cancel()
    if kernel.forwarder is not None:
        await kernel.forwarder.close()
    kernel.close()
    try:
        (config.data_dir / "kernel.addr").unlink()
    except FileNotFoundError:
        pass
    log.info("stopped")
    return 0


def run(config: KernelConfig) -> int:
    return asyncio.run(serve(config))
