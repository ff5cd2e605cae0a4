"""HTTP's side of the kernel's one error type: OpenAI's error body, the status the edge maps a code to, and
request bodies parsed into pydantic shapes with errors that name the field."""
from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from kernos.abi.errors import StatusError

from ..edge import http_status
from .limits import BodyTimeout


def error(status: int, kind: str, message: str, param: str | None = None, code: str | None = None,
          retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def status_error(e: StatusError) -> JSONResponse:
    status, kind = http_status(e)
    if isinstance(e, BodyTimeout):                                     # the client's, not the kernel's slowness
        status, kind = 408, "timeout"
    return error(status, kind, e.message, code=e.code.lower(), retry_after=e.retry_after_s)


def parse(model, body: bytes):
    """`body` as the pydantic `model`; INVALID_ARGUMENT naming the first bad field."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"])
        raise StatusError("INVALID_ARGUMENT", f"{param or 'body'}: {first['msg']}") from None
