"""Every RPC passes here once, before and after its servicer: the one place that

- rejects undecodable requests (invalid UTF-8 in a string field...) as INVALID_ARGUMENT instead of
  gRPC's generic INTERNAL;
- authenticates the caller's token and runs the gate (request rate, capability and grant check);
- turns the kernel's one error type (`StatusError`) into its gRPC status, with the retry hint in the
  `retry-after-ms` trailing metadata, and anything else into INTERNAL with a reference in the log;
- counts the syscall in flight, and writes its trace record (agent, kind, status, request, response,
  timings) for every method of every service.

Servicers read the caller with `current_principal()`.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict

from kernos.storage.status import CODES, StatusError
from kernos.storage.traces import TraceLog, TraceRecord

from ...security.gate import Gate
from ...syscalls.lifecycle import Lifecycle

log = logging.getLogger("kernos.kernel")

_PRINCIPAL: ContextVar = ContextVar("kernos_principal", default=None)


def current_principal():
    """The authenticated caller of the syscall being served (None for public methods)."""
    return _PRINCIPAL.get()


GRPC_STATUS = {code: getattr(grpc.StatusCode, code) for code in CODES}   # the one mapping to gRPC statuses
TOKEN_HEADER = "authorization"     # "Bearer <token>"
PUBLIC_METHODS = {"/kernos.v1.Kernel/Register", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                  "/grpc.health.v1.Health/List"}
PUBLIC_PREFIXES = ("/grpc.reflection.",)
UNTRACED_PREFIXES = ("/grpc.",)
# Methods whose request and reply are traced whole: the fine-tuner learns from generations, and tool calls
# are worth replaying. Other syscalls keep their scalar fields and the size of everything else.
TRACED_WHOLE = ("/kernos.v1.LLM/Generate", "/kernos.v1.LLM/GenerateStream", "/kernos.v1.LLM/Restore",
                "/kernos.v1.Tools/")
KINDS = {"/kernos.v1.LLM/GenerateStream": "llm.generate", "/kernos.v1.LLM/Restore": "llm.generate"}
SECRET_FIELDS = {"token"}
MAX_TRACED_STRING = 200


def trace_kind(method: str) -> str:
    """'/kernos.v1.Storage/ListFiles' -> 'storage.list_files'."""
    if method in KINDS:
        return KINDS[method]
    service, _, name = method.rpartition("/")
    return service.rsplit(".", 1)[-1].lower() + "." + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _summary(msg) -> dict:
    """A bounded view of a message: scalars (long strings cut), sizes of bytes and repeated fields."""
    out = {}
    for fd, value in msg.ListFields():
        if fd.name in SECRET_FIELDS:
            out[fd.name] = "<redacted>"
        elif fd.is_repeated:
            out[fd.name] = {"count": len(value)}
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            out[fd.name] = _summary(value)
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            out[fd.name] = {"bytes": len(value)}
        elif isinstance(value, str):
            out[fd.name] = value[:MAX_TRACED_STRING]
        else:
            out[fd.name] = value
    return out


def _as_dict(method: str, msg) -> dict:
    if msg is None or isinstance(msg, _Undecodable):
        return {}
    if method.startswith(TRACED_WHOLE):
        if msg.DESCRIPTOR.fields_by_name.get("reply") is not None and msg.HasField("reply"):
            msg = msg.reply                   # a stream's last chunk carries the whole reply
        return MessageToDict(msg, preserving_proto_field_name=True)
    return _summary(msg)


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


class SyscallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate, traces: TraceLog, lifecycle: Lifecycle):
        self.gate = gate
        self.traces = traces
        self.lifecycle = lifecycle

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        des, ser = _safe_deserializer(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), des, ser)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream), des, ser)
        return handler  # client-streaming kinds: none in the ABI

    def _unary(self, method: str, behaviour):
        async def run(request, context):
            call = _Syscall(self, method, request, context)
            try:
                await call.admit()
                with self.lifecycle.track():
                    call.reply = await behaviour(request, context)
                return call.reply
            except BaseException as e:
                await call.fail(e)
            finally:
                call.trace()
        return run

    def _stream(self, method: str, behaviour):
        async def run(request, context):
            call = _Syscall(self, method, request, context)
            try:
                await call.admit()
                with self.lifecycle.track():
                    async for item in behaviour(request, context):
                        call.reply = item
                        yield item
            except BaseException as e:
                await call.fail(e)
            finally:
                call.trace()
        return run


class _Syscall:
    """One RPC's passage through the interceptor."""

    def __init__(self, interceptor: SyscallInterceptor, method: str, request, context):
        self.i, self.method, self.request, self.context = interceptor, method, request, context
        self.t0 = time.monotonic()
        self.principal = None
        self.reply = None
        self.status = "OK"

    async def admit(self) -> None:
        if isinstance(self.request, _Undecodable):
            raise StatusError("INVALID_ARGUMENT", f"malformed request: {self.request.error}")
        if self.method in PUBLIC_METHODS or self.method.startswith(PUBLIC_PREFIXES):
            return
        principal = self.i.gate.authenticate(token_from_metadata(self.context.invocation_metadata()))
        if principal is None:
            raise StatusError("UNAUTHENTICATED", "missing, unknown, expired or revoked token: register with "
                                                 "Kernel.Register and send 'authorization: Bearer <token>'")
        self.principal = principal
        _PRINCIPAL.set(principal)
        self.i.gate.admit(principal, self.method, self.request)

    async def fail(self, e: BaseException) -> None:
        """Abort the RPC with the status `e` stands for (re-raises cancellations and aborts)."""
        if isinstance(e, StatusError):
            self.status = e.code
            message = e.message
            if e.retry_after_s is not None:
                self.context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
                message = f"{message}; retry after {e.retry_after_s:.1f} s"
            await self.context.abort(GRPC_STATUS[e.code], message)
        if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
            raise e
        if not isinstance(e, Exception):          # CancelledError, GeneratorExit: the client went away
            self.status = "CANCELLED"
            raise e
        self.status = "INTERNAL"
        ref = uuid.uuid4().hex[:12]
        log.error("internal error [%s] in %s", ref, self.method, exc_info=e)
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal kernel error (reference {ref} in the kernel log)")

    def trace(self) -> None:
        try:
            self._trace()
        except Exception:                          # a trace must never fail the syscall it records
            log.exception("could not trace %s", self.method)

    def _trace(self) -> None:
        if self.method.startswith(UNTRACED_PREFIXES):
            return
        agent = self.principal.agent_id if self.principal is not None else ""
        if not agent and self.method == "/kernos.v1.Kernel/Register":
            agent = self.reply.agent_id if self.reply is not None else getattr(self.request, "name", "")
        record_trace(self.i.traces, agent, self.method, self.status, self.request, self.reply, self.t0)


def record_call(traces: TraceLog, agent: str, kind: str, status: str, request: dict, t0: float) -> None:
    """A trace record for a call that reached a use case without a gRPC message (an MCP tool call, an AIOS
    query): its scalar arguments, strings cut as for gRPC traces."""
    traces.record(TraceRecord(agent, kind, status,
                              {k: (v[:MAX_TRACED_STRING] if isinstance(v, str) else v) for k, v in request.items()},
                              {}, {"syscall_ms": (time.monotonic() - t0) * 1e3}))


def record_trace(traces: TraceLog, agent: str, method: str, status: str, request, reply, t0: float) -> None:
    """One syscall's trace record, the same for every transport (the request and reply as the gRPC messages
    that carry them)."""
    if not agent:
        return                                    # unauthenticated: nobody to account it to
    traces.record(TraceRecord(agent, trace_kind(method), status, _as_dict(method, request),
                              _as_dict(method, reply) if status == "OK" else {},
                              {"syscall_ms": (time.monotonic() - t0) * 1e3}))
