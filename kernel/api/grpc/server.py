"""The gRPC server: a grpc.aio server with the kernel's services over the one edge, health and reflection, on
TCP, TLS, mTLS or a Unix socket. The process around it (HTTP beside it, signals, drain) is `kernel/daemon.py`."""
from __future__ import annotations

import os

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
from ..edge import Edge
from .access import AccessServicer
from .forward import Forwarder
from .interceptor import SyscallInterceptor
from .kernel import KernelServicer
from .llm import LLMServicer
from .memory import MemoryServicer
from .storage import StorageServicer
from .tools import ToolsServicer
from .tuner import TunerServicer

SERVICES = (kernel_pb2.DESCRIPTOR.services_by_name["Kernel"].full_name,
            llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name,
            storage_pb2.DESCRIPTOR.services_by_name["Storage"].full_name,
            memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name,
            access_pb2.DESCRIPTOR.services_by_name["Access"].full_name,
            tools_pb2.DESCRIPTOR.services_by_name["Tools"].full_name,
            tuner_pb2.DESCRIPTOR.services_by_name["Tuner"].full_name)


def listen(server, sc) -> str:
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


def node_credentials(config):
    """TLS for calls to the other nodes of a cluster when this one serves TLS: their CA (cluster.tls_ca, else the
    system's roots), and this node's certificate and key as its client certificate."""
    sc = config.server
    if sc.tls_cert is None:
        return None
    ca = config.cluster.tls_ca
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes() if ca else None,
                                        private_key=sc.tls_key.read_bytes(), certificate_chain=sc.tls_cert.read_bytes())


def build(kernel: Kernel, edge: Edge):
    """(the server with every service registered, its health servicer); not yet listening."""
    config = kernel.config
    forwarder = None
    if kernel.cluster is not None:     # an agent's calls go to its home node
        forwarder = kernel.forwarder = Forwarder(kernel.cluster, kernel.registry.identify,
                                                 config.server.max_message_bytes, kernel.generate.control.handovers,
                                                 node_credentials(config))
    server = grpc.aio.server(
        interceptors=[SyscallInterceptor(edge, forwarder)],
        options=[("grpc.max_receive_message_length", config.server.max_message_bytes),
                 ("grpc.max_send_message_length", config.server.max_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    kernel_pb2_grpc.add_KernelServicer_to_server(KernelServicer(kernel.agents), server)
    llm_pb2_grpc.add_LLMServicer_to_server(LLMServicer(kernel.generate, kernel.models), server)
    storage_pb2_grpc.add_StorageServicer_to_server(StorageServicer(kernel.storage), server)
    memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(kernel.memory), server)
    access_pb2_grpc.add_AccessServicer_to_server(AccessServicer(kernel.access), server)
    tools_pb2_grpc.add_ToolsServicer_to_server(ToolsServicer(kernel.tools), server)
    tuner_pb2_grpc.add_TunerServicer_to_server(TunerServicer(kernel.datasets, kernel.tuner), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.server.reflection:
        reflection.enable_server_reflection(SERVICES + (reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    return server, health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("",) + SERVICES:
        await health_servicer.set(name, status)
