"""Console log-in sessions. The browser holds only an opaque session id, in an HttpOnly, SameSite=Strict
cookie; the token it logged in with stays here and is authenticated again on every request, so revoking the
token (or rotating an agent's) ends its console sessions at once. Each session has its own CSRF secret,
which the page carries in a meta tag and sends back in a header on every state-changing request; the login
form is protected by a double-submitted cookie. Sessions live in the kernel's memory: a restart logs
everyone out."""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

COOKIE = "kernos_console"
LOGIN_COOKIE = "kernos_login_csrf"
CSRF_HEADER = "x-kernos-csrf"


@dataclass
class Session:
    session_id: str
    token: str
    csrf: str
    owner: str = ""                 # the principal it logged in as: its sessions are capped together
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)


class Sessions:
    """At most `per_owner` sessions a principal, `max_sessions` in all. A principal's new session replaces its
    own least recently used one, never another's: an agent logging in 10,050 times once pushed an idle
    operator out. When the whole table is full, the principal holding the most sessions gives one up."""

    def __init__(self, idle_s: float = 8 * 3600, max_sessions: int = 10_000, per_owner: int = 16):
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.per_owner = per_owner
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, token: str, owner: str = "") -> Session:
        s = Session(secrets.token_urlsafe(32), token, secrets.token_urlsafe(24), owner)
        with self._lock:
            self._expire()
            mine = [x for x in self._sessions.values() if x.owner == owner]
            if len(mine) >= self.per_owner:
                self._drop_oldest(mine)
            elif len(self._sessions) >= self.max_sessions:
                counts: dict[str, int] = {}
                for x in self._sessions.values():
                    counts[x.owner] = counts.get(x.owner, 0) + 1
                top = max(counts, key=counts.__getitem__)
                self._drop_oldest([x for x in self._sessions.values() if x.owner == top])
            self._sessions[s.session_id] = s
        return s

    def _drop_oldest(self, sessions: list[Session]) -> None:
        oldest = min(sessions, key=lambda x: x.last_used)
        self._sessions.pop(oldest.session_id, None)

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return None
            if time.monotonic() - s.last_used > self.idle_s:
                del self._sessions[session_id]
                return None
            s.last_used = time.monotonic()
            return s

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_s]:
            del self._sessions[sid]


def same(a: str | None, b: str | None) -> bool:
    return bool(a and b) and secrets.compare_digest(a.encode(), b.encode())
