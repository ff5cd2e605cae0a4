"""The kernel's one error type: a status code name, a message for the caller, and an optional retry hint.

Raised by every layer (stores, memory, security, tools, engines, use cases); transport-free. The edge
(`kernos.kernel.api.edge`) turns anything else that escapes a syscall into INTERNAL and maps the codes to
HTTP statuses; the gRPC adapter maps them to gRPC statuses of the same names."""
from __future__ import annotations

CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED",
                   "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL",
                   "UNIMPLEMENTED", "CANCELLED", "ABORTED", "DATA_LOSS", "OUT_OF_RANGE"})


class StatusError(Exception):
    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        if code not in CODES:
            raise ValueError(f"unknown status code {code!r}")
        super().__init__(message)
        self.code = code              # a grpc.StatusCode name: "INVALID_ARGUMENT", "NOT_FOUND", ...
        self.message = message
        self.retry_after_s = retry_after_s


def invalid(message: str) -> StatusError:
    return StatusError("INVALID_ARGUMENT", message)


def not_found(message: str) -> StatusError:
    return StatusError("NOT_FOUND", message)


def denied(message: str) -> StatusError:
    return StatusError("PERMISSION_DENIED", message)


def exhausted(message: str, retry_after_s: float | None = None) -> StatusError:
    return StatusError("RESOURCE_EXHAUSTED", message, retry_after_s)


def unavailable(message: str) -> StatusError:
    return StatusError("UNAVAILABLE", message)


def precondition(message: str) -> StatusError:
    return StatusError("FAILED_PRECONDITION", message)
