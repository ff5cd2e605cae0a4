"""What every HTTP request is held to before any route reads it: a deadline for its head (`head_timeout_protocol`),
a body size (checked against Content-Length
before a byte of the body is read, and counted as it arrives for chunked bodies), a deadline for the whole body
(a client announcing 100 MB and sending 1 byte held a connection and its buffer for 40 s and more), and on the
token-authenticated surfaces (`/v1`, `/mcp`) a token that authenticates, checked on the headers alone (a 150 MiB
body was read and parsed, 2.5 s and 262 MiB, before it was answered 401).

A plain ASGI middleware: it sees the raw request before FastAPI, Starlette or the MCP transport buffer it."""
from __future__ import annotations

import asyncio
import json

from kernos.abi.errors import StatusError

from ..edge import bearer


class BodyTooLarge(StatusError):
    """Raised from inside a route's body read: the app's handler answers it (413) like any StatusError."""

    def __init__(self, limit: int):
        super().__init__("RESOURCE_EXHAUSTED", f"the request body is over {limit} bytes (server.max_http_body_bytes)")


class BodyTimeout(StatusError):
    def __init__(self, seconds: float):
        super().__init__("DEADLINE_EXCEEDED", f"the request body did not arrive within {seconds:g} s "
                                              "(server.http_body_timeout_s)")


class RequestLimits:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, authenticate=None,
                 token_paths: tuple[str, ...] = ("/v1/", "/mcp")):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.authenticate = authenticate          # token -> principal or None
        self.token_paths = token_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        length = headers.get("content-length", "")
        if length and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
            return await _answer(send, 413, "request_too_large",
                                 f"the request body is {length.strip()[:20]} bytes; the limit is "
                                 f"{self.max_body_bytes} (server.max_http_body_bytes)")
        path = scope.get("path", "")
        if self.authenticate is not None and path.startswith(self.token_paths):
            token = bearer(headers.get("authorization", ""))
            if not token or self.authenticate(token) is None:
                return await _answer(send, 401, "authentication_error",
                                     "missing, unknown or revoked token: send 'Authorization: Bearer <agent token>'",
                                     [(b"www-authenticate", b"Bearer")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        received = 0
        started = False

        body_done = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:                 # after the body: a streaming reply waits here for the disconnect, unbounded
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except (BodyTooLarge, BodyTimeout) as e:
            if started:
                raise
            too_large = isinstance(e, BodyTooLarge)
            await _answer(send, 413 if too_large else 408, "request_too_large" if too_large else "timeout", e.message)


async def _answer(send, status: int, kind: str, message: str, extra: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
def head_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline for each request head: a client that sends its head a byte at a time
    (or opens a connection and sends nothing) is cut off after `seconds`; uvicorn re-arms its keep-alive timer on
    every byte, so nothing else ends such a connection."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeout(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(seconds, self._too_slow)

        def _too_slow(self):
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()                # between requests: a new head is (or may be) coming
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete and self._head_timer is not None:
                self._head_timer.cancel()  # a head arrived whole: the body has its own deadline
                self._head_timer = None

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return HeadTimeout
