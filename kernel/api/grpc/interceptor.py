"""gRPC's adapter to the edge: every RPC of every `kernos.v1` service passes `kernel/api/edge.py` once.

Here only what is gRPC's own: an undecodable request (invalid UTF-8 in a string field...) is INVALID_ARGUMENT
instead of gRPC's generic INTERNAL; the method and its request become a typed syscall (`methods.py`); the
token comes from the `authorization` metadata; a kernel error becomes the gRPC status of the same name, with
the retry hint in the `retry-after-ms` trailing metadata. Health checks and reflection pass untouched.

Servicers read the caller with `current_principal()`; a servicer that traces its syscall by the use case's
own view (a generation) sets it with `trace_views()`."""
from __future__ import annotations

from contextvars import ContextVar

import grpc

from kernos.abi.errors import CODES, StatusError

from ..edge import Edge, Passage, bearer
from .forward import Forwarder, Unreachable
from .methods import INFRASTRUCTURE, SYSCALL_OF, call_of, trace_view

_PASSAGE: ContextVar = ContextVar("kernos_passage", default=None)
GRPC_STATUS = {code: getattr(grpc.StatusCode, code) for code in CODES}   # the one mapping to gRPC statuses
TOKEN_HEADER = "authorization"     # "Bearer <token>"


def current_principal():
    """The authenticated caller of the syscall being served (None for public methods)."""
    passage = _PASSAGE.get()
    return passage.principal if passage is not None else None


def trace_views(request: dict | None = None, reply: dict | None = None) -> None:
    """Trace the syscall being served with these views of its request and reply instead of its messages."""
    passage = _PASSAGE.get()
    if passage is not None:
        if request is not None:
            passage.request_view = request
        if reply is not None:
            passage.reply_view = reply


def token_from_metadata(metadata) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_HEADER:
            return bearer(value)
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


class SyscallInterceptor(grpc.aio.ServerInterceptor):
    """With a `forwarder` (a cluster), an agent's call that belongs on its home node goes there untouched by this
    node's edge: the home authenticates, admits, runs and traces it once."""

    def __init__(self, edge: Edge, forwarder: Forwarder | None = None):
        self.edge = edge
        self.forwarder = forwarder

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(INFRASTRUCTURE):
            return handler
        if details.method not in SYSCALL_OF:
            return None                            # UNIMPLEMENTED: no syscall of this kernel
        method = details.method
        des, ser = _safe_deserializer(handler.request_deserializer), handler.response_serializer
        if self.forwarder is not None and ser is not None:     # a forwarded reply comes back as its bytes
            ser = (lambda serialize: lambda m: m if isinstance(m, bytes) else serialize(m))(ser)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), des, ser)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream), des, ser)
        return handler  # client-streaming kinds: none in the ABI

    def _home(self, request, context):
        if self.forwarder is None or isinstance(request, _Undecodable):
            return None
        return self.forwarder.home_of(context.invocation_metadata())

    def _unary(self, method: str, behaviour):
        async def run(request, context):
            home = self._home(request, context)
            if home is not None:
                try:
                    return await self.forwarder.unary(home, method, request, context)
                except Unreachable:
                    pass
            passage = self._passage(method, request)
            try:
                _admit(passage, request, context)
                with passage.track():
                    passage.reply = await behaviour(request, context)
                passage.ok()
                return passage.reply
            except BaseException as e:
                await _fail(passage, e, context)
            finally:
                _trace(passage, request)
        return run

    def _stream(self, method: str, behaviour):
        async def run(request, context):
            home = self._home(request, context)
            if home is not None:
                try:
                    async for chunk in self.forwarder.stream(home, method, request, context):
                        yield chunk
                    return
                except Unreachable:
                    pass
            passage = self._passage(method, request)
            handed = None              # a draining node handed this generation to the agent's new home
            watch = self.forwarder.watch if self.forwarder is not None else None
            try:
                _admit(passage, request, context)
                with passage.track():
                    async for item in behaviour(request, context):
                        passage.reply = item
                        if watch is not None and (handed := watch(item)) is not None:
                            break
                        yield item
                passage.ok()
                if handed is not None:      # the rest of the stream comes from there, as one stream
                    async for chunk in self.forwarder.continue_elsewhere(handed, passage.reply, context):
                        yield chunk
            except BaseException as e:
                await _fail(passage, e, context)
            finally:
                _trace(passage, request)
                if watch is not None:       # ended however it ended (the client gone, an error)
                    self.forwarder.forget(passage.reply)
        return run

    def _passage(self, method: str, request) -> Passage:
        passage = Passage(self.edge, call_of(method, request))
        _PASSAGE.set(passage)
        return passage


def _admit(passage: Passage, request, context) -> None:
    if isinstance(request, _Undecodable):       # nobody to account it to yet: answered, not traced
        raise StatusError("INVALID_ARGUMENT", f"malformed request: {request.error}")
    passage.admit(token_from_metadata(context.invocation_metadata()))


async def _fail(passage: Passage, e: BaseException, context) -> None:
    """Abort the RPC with the status `e` stands for (re-raises cancellations and aborts)."""
    if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
        raise e
    error = passage.failed(e)
    if error is None:
        raise e
    message = error.message
    if error.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(error.retry_after_s * 1000))),))
        message = f"{message}; retry after {error.retry_after_s:.1f} s"
    await context.abort(GRPC_STATUS[error.code], message)


def _trace(passage: Passage, request) -> None:
    call, reply = passage.call, passage.reply
    agent = None
    if passage.principal is None and call.name == "kernel.register":
        agent = reply.agent_id if reply is not None else getattr(request, "name", "")
    passage.trace(passage.request_view if passage.request_view is not None else trace_view(call, request),
                  passage.reply_view if passage.reply_view is not None else trace_view(call, reply), agent)
