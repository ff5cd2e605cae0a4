"""Typed exceptions for syscall failures; each carries the gRPC status code and the kernel's message."""
from __future__ import annotations

import grpc


class KernosError(Exception):
    """A syscall failed. `code` is the gRPC status, `message` the kernel's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(KernosError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KernosError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KernosError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(KernosError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(KernosError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(KernosError):
    """A limit or quota; `retry_after_s` says when to retry when the kernel knows."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s: float | None = None


class FailedPrecondition(KernosError):
    """The system is not in the state the call needs (e.g. a data set without a held-out split)."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(KernosError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(KernosError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(KernosError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
                                      ResourceExhausted, FailedPrecondition, Unavailable, DeadlineExceeded, Internal)}


def from_rpc_error(e: grpc.RpcError) -> KernosError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    cls = _BY_CODE.get(code, KernosError)
    err = cls(details or code.name, code)
    trailing = e.trailing_metadata() if callable(getattr(e, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == "retry-after-ms":
            err.retry_after_s = int(value) / 1000
    return err
