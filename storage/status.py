"""The one error type of the kernel's stores (files, memory, contexts, access, agents): a gRPC status name
and a message for the caller. The syscall layer turns it into that status (`kernos.kernel.errors`)."""
from __future__ import annotations


class StatusError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code   # a grpc.StatusCode name: "INVALID_ARGUMENT", "NOT_FOUND", ...
