"""The daemon: a grpc.aio server with the kernel's services, health and reflection, and a draining
shutdown on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kernos.proto.v1 import (
    access_pb2,
    access_pb2_grpc,
    kernel_pb2,
    kernel_pb2_grpc,
    llm_pb2,
    llm_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
    tools_pb2,
    tools_pb2_grpc,
    tuner_pb2,
    tuner_pb2_grpc,
)

from ...app import Kernel
from ...config import KernelConfig
from .access import AccessServicer
from .interceptor import SyscallInterceptor
from .kernel import KernelServicer
from .llm import LLMServicer
from .memory import MemoryServicer
from .storage import StorageServicer
from .tools import ToolsServicer
from .tuner import TunerServicer

log = logging.getLogger("kernos.kernel")
SERVICES = (kernel_pb2.DESCRIPTOR.services_by_name["Kernel"].full_name,
            llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name,
            storage_pb2.DESCRIPTOR.services_by_name["Storage"].full_name,
            memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name,
            access_pb2.DESCRIPTOR.services_by_name["Access"].full_name,
            tools_pb2.DESCRIPTOR.services_by_name["Tools"].full_name,
            tuner_pb2.DESCRIPTOR.services_by_name["Tuner"].full_name)


async def _flush_agents_periodically(kernel: Kernel) -> None:
    while True:
        await asyncio.sleep(5)
        kernel.flush()


def _listen(server, sc) -> str:
    """Bind the configured address (TCP, TLS, mTLS or a Unix socket); return the address clients use."""
    if sc.listen.startswith("unix:"):
        path = sc.listen[5:]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a killed kernel
        server.add_insecure_port(sc.listen)
        return sc.listen
    if sc.tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(sc.tls_key.read_bytes(), sc.tls_cert.read_bytes())],
            root_certificates=sc.tls_client_ca.read_bytes() if sc.tls_client_ca else None,
            require_client_auth=sc.tls_client_ca is not None)
        port = server.add_secure_port(sc.listen, creds)
    else:
        port = server.add_insecure_port(sc.listen)
    if port == 0:
        raise RuntimeError("the port is taken or the address is invalid")
    return f"{sc.listen.rsplit(':', 1)[0]}:{port}"


async def serve(config: KernelConfig) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    kernel = Kernel(config)
    server = grpc.aio.server(
        interceptors=[SyscallInterceptor(kernel.gate, kernel.traces, kernel.lifecycle)],
        options=[("grpc.max_receive_message_length", config.server.max_message_bytes),
                 ("grpc.max_send_message_length", config.server.max_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    kernel_pb2_grpc.add_KernelServicer_to_server(KernelServicer(kernel.agents), server)
    llm_pb2_grpc.add_LLMServicer_to_server(LLMServicer(kernel.generate), server)
    storage_pb2_grpc.add_StorageServicer_to_server(StorageServicer(kernel.storage), server)
    memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(kernel.memory), server)
    access_pb2_grpc.add_AccessServicer_to_server(AccessServicer(kernel.access), server)
    tools_pb2_grpc.add_ToolsServicer_to_server(ToolsServicer(kernel.tools), server)
    tuner_pb2_grpc.add_TunerServicer_to_server(TunerServicer(kernel.datasets, kernel.tuner), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.server.reflection:
        reflection.enable_server_reflection(SERVICES + (reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    try:
        address = _listen(server, config.server)
    except (RuntimeError, OSError) as e:
        log.error("cannot listen on %s: %s", config.server.listen, e)
        kernel.drain(0)
        kernel.close()
        return 2
    await server.start()
    if address.startswith("unix:"):
        os.chmod(address[5:], config.server.socket_mode)  # who may connect: the socket's owner and group
    for name in ("",) + SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await kernel.tools.start_mounts()          # external MCP servers' tools ([[tools.mcp]])
    http = None
    if config.server.http_listen:
        from ..http import server as http_server

        try:
            http = await http_server.start(kernel, config.server.http_listen)
        except (OSError, RuntimeError) as e:
            log.error("cannot serve HTTP on %s: %s", config.server.http_listen, e)
            await server.stop(grace=0)
            kernel.drain(0)
            kernel.close()
            return 2
    (config.data_dir / "kernel.addr").write_text(address + "\n")
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
    await stop.wait()

    log.info("shutting down: draining in-flight generations (up to %.0f s)", config.server.drain_timeout_s)
    for name in ("",) + SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
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
    kernel.close()
    try:
        (config.data_dir / "kernel.addr").unlink()
    except FileNotFoundError:
        pass
    log.info("stopped")
    return 0


def run(config: KernelConfig) -> int:
    return asyncio.run(serve(config))
