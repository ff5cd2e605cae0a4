"""Token administration on a kernel's data dir, without the kernel (`kernos token`): operator tokens,
enrollment tokens and agents' tokens. A running kernel sees the change at its next check (operator tokens at
once; it reads them at each use). Only hashes are kept: a token is shown once, when it is made."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from kernos.storage.db import Databases

from .access import AccessControl
from .enrollment import Enrollment, Enrollments
from .principals import AgentRegistry


@dataclass
class TokenInfo:
    kind: str            # operator | enroll | agent
    name: str
    state: str           # active, revoked, expired, expires in N s, used up
    detail: str = ""


def expiry(expires: float) -> str:
    if not expires:
        return "active"
    left = expires - time.time()
    return f"expires in {left:.0f} s" if left > 0 else "expired"


class OfflineTokens:
    def __init__(self, data_dir: Path, database: str = ""):
        """`database`: a cluster's PostgreSQL URL (config `cluster.database`); empty: the data dir's SQLite."""
        self.data = data_dir
        self.data.mkdir(parents=True, exist_ok=True)
        self.db = Databases(data_dir, database)

    def _access(self):
        return contextlib.closing(AccessControl(self.db("access.db")))

    def _enrollments(self):
        return contextlib.closing(Enrollments(self.db("access.db")))

    @contextlib.contextmanager
    def _agents(self, ttl_s: float = 600):
        registry = AgentRegistry(self.db("kernel.db"), ttl_s=ttl_s)
        try:
            yield registry
        finally:
            registry.close(flush=False)    # the kernel's counters are its own

    # -- operators ---------------------------------------------------------------------------------------------
    def create_operator(self, name: str, ttl_s: float = 0) -> tuple[str, float]:
        with self._access() as ac:
            return ac.create_token(name, admin=True, ttl_s=ttl_s)

    def revoke_operator(self, name: str) -> bool:
        with self._access() as ac:
            return ac.revoke_token(name)

    # -- enrollment ---------------------------------------------------------------------------------------------
    def create_enrollment(self, name: str, uses: int = 1, ttl_s: float = 0, group: str = "") -> tuple[str, Enrollment]:
        with self._enrollments() as en:
            return en.create(name, uses=uses, ttl_s=ttl_s, group=group)

    def revoke_enrollment(self, name: str) -> bool:
        with self._enrollments() as en:
            return en.revoke(name)

    # -- agents -------------------------------------------------------------------------------------------------
    def issue_agent(self, name: str, description: str = "") -> tuple[str, bool]:
        """(a new token for agent `name`, whether the agent existed: its old token then no longer works)."""
        with self._agents() as registry:
            known = registry.get(name) is not None
            _, token = (registry.rotate if known else registry.create)(name, description)
            return token, known

    def revoke_agent(self, name: str) -> bool:
        with self._agents() as registry:
            return registry.revoke(name)

    # -- all of them ----------------------------------------------------------------------------------------------
    def list(self) -> list[TokenInfo]:
        """Every token's name and state (never a token)."""
        out = []
        with self._access() as ac:
            out += [TokenInfo("operator", name, "revoked" if revoked else expiry(expires))
                    for name, expires, revoked in ac.tokens()]
        with self._enrollments() as en:
            for e in en.list():
                state = "revoked" if e.revoked else "used up" if e.uses_left < 1 else expiry(e.expires)
                out.append(TokenInfo("enroll", e.name, state,
                                     f"{e.uses_left} left" + (f", group {e.group}" if e.group else "")))
        with self._agents(ttl_s=float("inf")) as registry:
            out += [TokenInfo("agent", a.agent_id, "active token" if a.token_hash else "revoked")
                    for a in registry.list(include_exited=True)]
        return out
