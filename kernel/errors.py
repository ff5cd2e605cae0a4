"""Syscall errors: raised anywhere in the kernel with a gRPC status, turned into a clean status reply at
the servicer boundary (never a stack trace)."""
from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc

from kernos.storage.status import StatusError

log = logging.getLogger("kernos.kernel")


class SyscallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def invalid(msg: str) -> SyscallError:
    return SyscallError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def not_found(msg: str) -> SyscallError:
    return SyscallError(grpc.StatusCode.NOT_FOUND, msg)


def exhausted(msg: str) -> SyscallError:
    return SyscallError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)


def unavailable(msg: str) -> SyscallError:
    return SyscallError(grpc.StatusCode.UNAVAILABLE, msg)


async def _abort(context, e: SyscallError) -> None:
    if e.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
        await context.abort(e.code, f"{e.message}; retry after {e.retry_after_s:.1f} s")
    await context.abort(e.code, e.message)


async def _abort_internal(context, e: Exception) -> None:
    ref = uuid.uuid4().hex[:12]
    log.error("internal error [%s]", ref, exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal kernel error (reference {ref} in the kernel log)")


def syscall(fn):
    """Wrap a servicer method (unary or server-streaming) so that errors become gRPC statuses."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except SyscallError as e:
                await _abort(context, e)
            except StatusError as e:
                await context.abort(getattr(grpc.StatusCode, e.code), str(e))
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
                    raise
                await _abort_internal(context, e)
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except SyscallError as e:
            await _abort(context, e)
        except StatusError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
                raise
            await _abort_internal(context, e)
    return unary
