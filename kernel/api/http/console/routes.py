"""The operator console's routes on the kernel's HTTP server (`/console`): log-in and log-out, the page shell
and its static assets (all shipped in the package: no network, no build step), each page's data as JSON
and as a server-sent-event stream (`/console/api/stream/PAGE`, a fresh snapshot every second), and the
actions. What a page shows and who may act is decided in `views.py`."""
from __future__ import annotations

import asyncio
import html
import json
import secrets
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from kernos.abi.errors import StatusError
from kernos.abi.trace import TraceRecord

from .history import History
from .sessions import COOKIE, CSRF_HEADER, LOGIN_COOKIE, Sessions, same
from .views import ACTION_SYSCALLS, PAGE_SYSCALLS, ConsoleDeps, Views

STATIC = Path(__file__).parent / "static"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css", "favicon.svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store"}
MAX_FORM = 16 * 1024
STREAM_PERIOD_S = 1.0


def _page(name: str, **values: str) -> HTMLResponse:
    text = (STATIC / name).read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", html.escape(v, quote=True))
    return HTMLResponse(text, headers=HEADERS)


def _same_origin(request: Request) -> bool:
    """A browser's form post names its origin; one from another site is refused (CSRF on the login form)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


_PAGES = tuple(sorted(set(PAGE_SYSCALLS.values())))
# (method, path) -> the syscalls the route makes ((): log-in, the page shell and its assets: no syscall)
ROUTES = {("GET", "/console/login"): (), ("POST", "/console/login"): (), ("POST", "/console/logout"): (),
          ("GET", "/console"): (), ("GET", "/console/static/{name}"): (), ("GET", "/console/api/page/{page}"): _PAGES,
          ("GET", "/console/api/stream/{page}"): _PAGES,
          ("POST", "/console/api/action/{action}"): tuple(sorted(set(ACTION_SYSCALLS.values())))}

def mount(app: FastAPI, deps: ConsoleDeps, edge) -> History:
    """Add the console's routes to `app`; returns the sampler the HTTP server runs beside it."""
    history = History(deps.models, deps.metrics)
    views = Views(deps, edge, history)
    sessions = Sessions(idle_s=deps.server.console_session_idle_s,
                        per_owner=deps.server.console_sessions_per_principal)
    gate = edge.gate

    def cookie(response: Response, request: Request, name: str, value: str, path: str = "/console") -> None:
        response.set_cookie(name, value, httponly=True, samesite="strict", path=path,
                            secure=request.url.scheme == "https")

    def logged_in(request: Request):
        """(session, principal), or None: no session, or its token is no longer valid."""
        s = sessions.get(request.cookies.get(COOKIE))
        if s is None:
            return None
        principal = gate.authenticate(s.token)
        if principal is None:                 # revoked or rotated: the session ends with it
            sessions.drop(s.session_id)
            return None
        return s, principal

    def require(request: Request, csrf: bool = False):
        found = logged_in(request)
        if found is None:
            raise StatusError("UNAUTHENTICATED", "log in to the console first (/console/login)")
        if csrf and not same(request.headers.get(CSRF_HEADER), found[0].csrf):
            raise StatusError("PERMISSION_DENIED", "missing or wrong CSRF token: reload the console")
        return found

    def audit(who: str, what: str, allowed: bool, reason: str) -> None:
        deps.audit.record(TraceRecord(who, what, "ALLOW" if allowed else "DENY", {"capability": "console"},
                                        {"reason": reason}, {}))

    @app.get("/console/login")
    async def login_page(request: Request, error: str = ""):
        csrf = secrets.token_urlsafe(24)
        message = {"refused": "That token was refused: unknown, revoked or expired.",
                   "expired": "The login form expired: try again.",
                   "origin": "The login came from another site and was refused."}.get(error, "")
        response = _page("login.html", csrf=csrf, error=message)
        cookie(response, request, LOGIN_COOKIE, csrf, path="/console/login")
        return response

    @app.post("/console/login")
    async def login(request: Request):
        body = await request.body()
        if len(body) > MAX_FORM:
            raise StatusError("INVALID_ARGUMENT", "the login form is too large")
        form = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
        if not _same_origin(request):
            return RedirectResponse("/console/login?error=origin", 303, headers=HEADERS)
        if not same(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            return RedirectResponse("/console/login?error=expired", 303, headers=HEADERS)
        token = (form.get("token") or "").strip()
        principal = gate.authenticate(token)
        peer = request.client.host if request.client else "?"
        if principal is None:
            audit(f"console:{peer}", "console.login", False, "unknown, revoked or expired token")
            await asyncio.sleep(0.25)         # slows guessing; tokens are long random strings anyway
            return RedirectResponse("/console/login?error=refused", 303, headers=HEADERS)
        audit(principal.agent_id, "console.login", True, f"logged in from {peer}")
        s = sessions.create(token, principal.agent_id)
        response = RedirectResponse("/console", 303, headers=HEADERS)
        cookie(response, request, COOKIE, s.session_id)
        response.delete_cookie(LOGIN_COOKIE, path="/console/login")
        return response

    @app.post("/console/logout")
    async def logout(request: Request):
        s = sessions.get(request.cookies.get(COOKIE))
        form = {k: v[0] for k, v in parse_qs((await request.body())[:MAX_FORM].decode(errors="replace")).items()}
        if s is not None and (same(form.get("csrf"), s.csrf) or same(request.headers.get(CSRF_HEADER), s.csrf)):
            sessions.drop(s.session_id)
        response = RedirectResponse("/console/login", 303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/console")
        return response

    @app.get("/console")
    async def shell(request: Request):
        found = logged_in(request)
        if found is None:
            return RedirectResponse("/console/login", 303, headers=HEADERS)
        s, principal = found
        return _page("console.html", csrf=s.csrf, who=principal.agent_id, operator="1" if principal.operator else "0")

    @app.get("/console/static/{name}")
    async def static(name: str):
        if name not in ASSETS:
            raise StatusError("NOT_FOUND", "no such console asset")
        return Response((STATIC / name).read_bytes(), media_type=ASSETS[name],
                        headers={**HEADERS, "Cache-Control": "private, max-age=300"})

    def params(request: Request) -> dict:
        return {k: v[:512] for k, v in request.query_params.items()}

    @app.get("/console/api/page/{page}")
    async def page(page: str, request: Request):
        _, principal = require(request)
        p = params(request)
        views.admit(principal, page, p)
        return JSONResponse(await views.page(principal, page, p), headers=HEADERS)

    @app.get("/console/api/stream/{page}")
    async def stream(page: str, request: Request):
        s, principal = require(request)
        p = params(request)
        views.admit(principal, page, p)

        async def events():
            since = float(p.get("since") or 0)
            while True:
                if await request.is_disconnected() or deps.lifecycle.stopping:   # a drain ends the stream
                    return
                found = logged_in(request)
                if found is None or found[0].session_id != s.session_id:
                    yield "event: logout\ndata: {}\n\n"
                    return
                try:
                    data = await views.page(principal, page, {**p, "since": str(since)})
                    if page == "overview":       # only the new chart points after the first snapshot
                        since = max((pt["t"] for pts in data["series"].values() for pt in pts), default=since)
                    yield "data: " + json.dumps(data) + "\n\n"
                except StatusError as e:
                    yield "event: failure\ndata: " + json.dumps({"code": e.code, "message": e.message}) + "\n\n"
                await asyncio.sleep(STREAM_PERIOD_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    @app.post("/console/api/action/{action}")
    async def action(action: str, request: Request):
        _, principal = require(request, csrf=True)
        body = await request.body()
        if len(body) > MAX_FORM:
            raise StatusError("INVALID_ARGUMENT", "the request is too large")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise StatusError("INVALID_ARGUMENT", "the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise StatusError("INVALID_ARGUMENT", "the body must be a JSON object")
        result = await views.act(principal, action, data)
        audit(principal.agent_id, f"console.{action}", True, json.dumps(data)[:200])
        return JSONResponse(result, headers=HEADERS)

    return history
