"""Authentication at one place: a server interceptor that checks every call's token before any
servicer runs, and turns undecodable requests (e.g. invalid UTF-8 in a string field) into
INVALID_ARGUMENT instead of gRPC's generic INTERNAL.

The interceptor asks an `Authenticator` who the caller is, then `authorize(principal, method, request)`
(the access-control layer) whether the call is allowed: a message means PERMISSION_DENIED.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Callable, Protocol

import grpc

# The authenticated caller of the syscall being served: set by the interceptor in the task that runs the
# servicer, so servicers read it instead of authenticating twice.
CURRENT_AGENT: ContextVar = ContextVar("kernos_agent", default=None)


def current_agent():
    return CURRENT_AGENT.get()

TOKEN_HEADER = "authorization"     # "Bearer <token>"

PUBLIC_METHODS = {
    "/kernos.v1.Kernel/Register",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
}
PUBLIC_PREFIXES = ("/grpc.reflection.",)


class Authenticator(Protocol):
    def authenticate(self, token: str | None): ...


def token_from_metadata(metadata) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_HEADER:
            value = value if isinstance(value, str) else value.decode("utf-8", "replace")
            return value[7:].strip() if value.lower().startswith("bearer ") else value.strip()
    return None


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


def _safe_deserializer(deserialize):
    if deserialize is None:
        return None

    def wrapped(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError for invalid UTF-8, truncated messages, ...
            return _Undecodable(e)
    return wrapped


def _rebuild(handler, unary_fn, stream_fn):
    """A handler of the same kind as `handler` with new behaviour and a tolerant deserializer."""
    des, ser = _safe_deserializer(handler.request_deserializer), handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_fn(handler.unary_unary), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_fn(handler.unary_stream), des, ser)
    return handler  # client-streaming kinds: none in the ABI


def _guarded(check: Callable):
    """Behaviour wrappers that reject undecodable requests and run `check` (may abort) first."""
    def unary(behaviour):
        async def run(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            CURRENT_AGENT.set(await check(context, request))
            return await behaviour(request, context)
        return run

    def stream(behaviour):
        async def run(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
            CURRENT_AGENT.set(await check(context, request))
            async for item in behaviour(request, context):
                yield item
        return run
    return unary, stream


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, authorize: Callable | None = None):
        self.authenticator = authenticator
        self.authorize = authorize

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        public = method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES)

        async def check(context, request):
            if public:
                return None
            agent = self.authenticator.authenticate(token_from_metadata(context.invocation_metadata()))
            if agent is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing, unknown, expired or revoked token: register with Kernel.Register "
                                    "and send 'authorization: Bearer <token>'")
            if self.authorize is not None:
                try:
                    denied = self.authorize(agent, method, request)
                except Exception as e:  # a quota: RESOURCE_EXHAUSTED with a retry hint
                    retry = getattr(e, "retry_after_s", None)
                    if retry is None:
                        raise
                    context.set_trailing_metadata((("retry-after-ms", str(int(retry * 1000))),))
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry after {retry:.1f} s")
                if denied:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
            return agent

        return _rebuild(handler, *_guarded(check))
