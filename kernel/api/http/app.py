"""The HTTP surfaces, side by side on one FastAPI app and beside gRPC (not on it): OpenAI's `/v1` and
`/metrics` (`openai/`), `/mcp` (`mcp/`), AIOS's `/query` (`aios/`, opt-in) and the console (`console/`).
Each is a thin adapter over the one edge (`kernel/api/edge.py`) and the use cases it calls, handed to it
here (this is the only HTTP module that sees the kernel object); `ROUTES` of each lists its routes and the
syscall each one is."""
from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from kernos.abi.errors import StatusError

from ..edge import Edge
from .errors import error, status_error

log = logging.getLogger("kernos.http")


def build(kernel, edge: Edge) -> FastAPI:
    app = FastAPI(title="Kernos", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StatusError)
    async def _status(request, e: StatusError):
        return status_error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"] if x != "body")
        return error(400, "invalid_request_error", f"{param or 'body'}: {first['msg']}", param=param or None)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error [%s] in %s", ref, request.url.path, exc_info=e)
        return error(500, "internal_error", f"internal kernel error (reference {ref} in the kernel log)")

    from .openai.routes import mount as mount_openai

    server = kernel.config.server
    mount_openai(app, edge, kernel.generate, kernel.responses, kernel.memory, kernel.models, kernel.metrics,
                 server.metrics_public)
    app.state.aios_names = None          # an AIOS name -> its Kernos agent (a cluster forwards /query by it)
    if server.aios_compat:
        from .aios.routes import mount as mount_aios

        bridge = kernel.aios_bridge()
        mount_aios(app, edge, kernel.generate, kernel.memory, kernel.storage, kernel.tools, kernel.access,
                   kernel.models, bridge, kernel.config.aios, kernel.cluster)
        app.state.aios_names = bridge.kernos_name
    app.state.mcp = None
    if server.mcp:
        from .mcp.server import mount as mount_mcp

        app.state.mcp = mount_mcp(app, edge, kernel.tools, kernel.storage, kernel.memory)
    app.state.history = None
    if server.console:
        from .console.routes import mount as mount_console
        from .console.views import ConsoleDeps

        k = kernel
        app.state.history = mount_console(app, ConsoleDeps(
            k.agents, k.generate, k.memory, k.storage, k.tools, k.tuner, k.access, k.access_control, k.adapter_store,
            k.registry, k.quotas, k.models, k.metrics, k.audit, k.lifecycle, server), edge)
    return app
