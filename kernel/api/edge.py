"""The one edge every transport passes, for every syscall: gRPC's interceptor, the OpenAI routes, `/mcp`,
AIOS's `/query` and the console are thin adapters over it.

    passage = edge.enter(syscall("storage.write", owner=..., path=...), token)   # authenticate, admit
    with passage.track():                                                        # counted for the drain
        reply = await use_case(passage.principal, ...)                           # run
    passage.ok()
    ... except BaseException as e: error = passage.failed(e)                     # map errors
    ... finally: passage.trace(request_view, reply_view)                          # trace with timings

Admission is the gate's (request rate, capability family, grants on the resource the call names, written to
the audit log); it decides on the typed syscall (`kernos.abi.syscalls`), never on a transport's method name.
Anything but the kernel's one error type that escapes a use case becomes INTERNAL with a reference in the log.
The transports map the error's code to their own status: gRPC by name, HTTP with `HTTP_STATUS`."""
from __future__ import annotations

import contextlib
import logging
import time
import uuid

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import Syscall
from kernos.abi.trace import TraceRecord

log = logging.getLogger("kernos.kernel")

# error code -> (HTTP status, OpenAI error type): the statuses OpenAI's clients map to their exceptions.
HTTP_STATUS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "OUT_OF_RANGE": (400, "invalid_request_error"),
               "UNAUTHENTICATED": (401, "authentication_error"), "PERMISSION_DENIED": (403, "permission_error"),
               "NOT_FOUND": (404, "not_found_error"), "ALREADY_EXISTS": (409, "conflict_error"),
               "FAILED_PRECONDITION": (409, "conflict_error"), "ABORTED": (409, "conflict_error"),
               "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable"),
               "DEADLINE_EXCEEDED": (504, "timeout"), "INTERNAL": (500, "internal_error")}
MAX_TRACED_STRING = 200
UNAUTHENTICATED = ("missing, unknown, expired or revoked token: register (Kernel.Register over gRPC, or "
                   "kernos token create --agent) and send 'Authorization: Bearer <token>'")


def http_status(e: StatusError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of a kernel error."""
    if e.code == "RESOURCE_EXHAUSTED" and e.retry_after_s is None:      # too large, not too often
        return 413, "request_too_large"
    return HTTP_STATUS.get(e.code, (500, "internal_error"))


def bearer(value: str | bytes | None) -> str | None:
    """The token of an `Authorization` header ('Bearer <token>', or the bare token)."""
    if not value:
        return None
    value = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return value[7:].strip() if value.lower().startswith("bearer ") else value.strip()


def bounded(args: dict) -> dict:
    """Arguments as a trace keeps them: long strings cut."""
    return {k: (v[:MAX_TRACED_STRING] if isinstance(v, str) else v) for k, v in args.items()}


class Edge:
    def __init__(self, gate, traces, lifecycle):
        self.gate = gate
        self.traces = traces
        self.lifecycle = lifecycle

    def authenticate(self, token: str | None):
        """The principal behind a token; UNAUTHENTICATED if there is none."""
        principal = self.gate.authenticate(token)
        if principal is None:
            raise StatusError("UNAUTHENTICATED", UNAUTHENTICATED)
        return principal

    def enter(self, call: Syscall, token: str | None = None, principal=None) -> Passage:
        """A passage for `call`, admitted (see `Passage.admit`); a refusal of a known caller is traced here, as
        the gRPC adapter traces it, before it raises."""
        passage = Passage(self, call)
        try:
            passage.admit(token, principal)
        except StatusError as e:
            passage.failed(e)
            passage.trace({})
            raise
        return passage

    def admit(self, principal, call: Syscall) -> None:
        """Admit one more syscall for a caller already authenticated (a console page, an action on it)."""
        self.gate.admit(principal, call)


class Passage:
    """One syscall's passage through the edge."""

    def __init__(self, edge: Edge, call: Syscall):
        self.edge, self.call = edge, call
        self.principal = None
        self.status = "INTERNAL"
        self.t0 = time.monotonic()
        self.reply = None                          # what the transport answered, for its trace
        self.request_view: dict | None = None      # the use case's own view of the call, when it traces so
        self.reply_view: dict | None = None

    def admit(self, token: str | None = None, principal=None) -> None:
        """Authenticate (unless the caller is already known, or the syscall is public) and admit the call:
        a refusal raises, and is traced as the caller's once the caller is known."""
        if principal is None and not self.call.spec.public:
            principal = self.edge.authenticate(token)
        self.principal = principal
        if principal is not None:
            self.edge.gate.admit(principal, self.call)

    @contextlib.contextmanager
    def track(self):
        """Count the syscall in flight (the drain waits for it)."""
        with self.edge.lifecycle.track():
            yield

    def ok(self) -> None:
        self.status = "OK"

    def failed(self, e: BaseException) -> StatusError | None:
        """The kernel error to answer for `e` (None: the caller went away; re-raise it)."""
        if isinstance(e, StatusError):
            self.status = e.code
            return e
        if not isinstance(e, Exception):          # CancelledError, GeneratorExit
            self.status = "CANCELLED"
            return None
        self.status = "INTERNAL"
        ref = uuid.uuid4().hex[:12]
        log.error("internal error [%s] in %s", ref, self.call.name, exc_info=e)
        return StatusError("INTERNAL", f"internal kernel error (reference {ref} in the kernel log)")

    def trace(self, request: dict, reply: dict | None = None, agent: str | None = None) -> None:
        """The syscall's trace record (the reply only on success); never fails the syscall it records."""
        agent = agent if agent is not None else (self.principal.agent_id if self.principal is not None else "")
        if not agent:
            return                                 # unauthenticated: nobody to account it to
        try:
            self.edge.traces.record(TraceRecord(agent, self.call.spec.kind, self.status, request,
                                                (reply or {}) if self.status == "OK" else {},
                                                {"syscall_ms": (time.monotonic() - self.t0) * 1e3}))
        except Exception:
            log.exception("could not trace %s", self.call.name)
