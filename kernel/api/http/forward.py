"""The HTTP side of home nodes (a cluster): an agent's request to `/v1` or `/mcp` that reaches a node other than its
home is sent there, and the home's answer (a JSON body or a server-sent event stream, relayed as it arrives)
comes back, so that OpenAI clients, LangChain and MCP clients keep the one URL they know (gRPC's twin:
`api/grpc/forward.py`). A forwarded request carries a mark and is never forwarded again; a home that refuses the
connection is passed over and the request served here.

AIOS's `/query` carries no token: its agent is the name in its body (`bridge.kernos_name`). Its home answers
loopback callers only unless told otherwise, and the forwarding node is not one: a forwarded request carries the
cluster's secret (`kernos-cluster-secret`, shared by the nodes through the database) and the caller's address
(`kernos-forwarded-for`), and the home checks that address as if the caller had come straight to it.

A plain ASGI middleware inside `RequestLimits`: the body it reads was already held to the size and time limits,
and the token already authenticated."""
from __future__ import annotations

import json
import logging

from ..edge import bearer

log = logging.getLogger("kernos.http")
FORWARDED = b"kernos-forwarded-by"
SECRET = b"kernos-cluster-secret"
FORWARDED_FOR = b"kernos-forwarded-for"
_HOP = {SECRET, FORWARDED_FOR, b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
        b"content-length", b"proxy-authorization", b"proxy-connection", b"trailer"}


class HomeForwarding:
    def __init__(self, app, membership, identify, paths: tuple[str, ...] = ("/v1/", "/mcp"), aios=None):
        self.app, self.membership, self.identify, self.paths = app, membership, identify, paths
        self.aios = aios            # body -> the Kernos agent of an AIOS `/query` (None: /query is not forwarded)
        self._client = None

    def _home(self, scope):
        token = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                token = bearer(v.decode("latin-1"))
        home = self.membership.elsewhere(self.identify(token) if token else None)
        return home if home is not None and home.http_address else None

    def _aios_home(self, body: bytes):
        try:
            name = json.loads(body).get("agent_name")
            agent = self.aios(name) if isinstance(name, str) and name.strip() and len(name) <= 256 else None
        except (ValueError, AttributeError):
            agent = None                   # the home would refuse it as this node will: answered here
        home = self.membership.elsewhere(agent)
        return home if home is not None and home.http_address else None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path or not self.membership.forward or any(k == FORWARDED for k, _ in scope.get("headers", ())):
            return await self.app(scope, receive, send)
        if path.startswith(self.paths):
            home = self._home(scope)
            if home is None:
                return await self.app(scope, receive, send)
            body = await _body(receive)
        elif path == "/query" and self.aios is not None and scope.get("method") == "POST":
            body = await _body(receive)
            home = self._aios_home(body)
            if home is None:
                return await self.app(scope, _replay(body), send)
        else:
            return await self.app(scope, receive, send)
        await self._relay(scope, body, home, send)

    async def _relay(self, scope, body: bytes, home, send) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        client = (scope.get("client") or ("", 0))[0]
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP] + \
            [(FORWARDED, self.membership.node_id.encode()), (SECRET, self.membership.secret.encode()),
             (FORWARDED_FOR, client.encode())]
        url = f"http://{home.http_address}{scope.get('raw_path', scope['path'].encode()).decode('latin-1')}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            request = self._client.build_request(scope["method"], url, headers=headers, content=body)
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            self.membership.unreachable(home)
            return await self.app(scope, _replay(body), send)
        self.membership.forwarded += 1
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as e:      # the home died mid-answer: the client sees the answer end early
            log.warning("forwarded %s to %s: %s", scope["path"], home.node_id, e)
        finally:
            await response.aclose()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def forwarded_for(membership, headers) -> str | None:
    """The original caller's address of a request that a node of this cluster forwarded here (None: it did not
    come from one; `headers` as Starlette's)."""
    if membership is None or not membership.trusts(headers.get(SECRET.decode())):
        return None
    return headers.get(FORWARDED_FOR.decode(), "")


async def _body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive
