"""Enrollment tokens: an operator's permission for new agents to register under the `enroll` policy (and a
way to place them in a group under any policy). Made offline with `kernos token create --enroll`; each has a
number of uses, an optional expiry and an optional group its agents join. Only their hashes are stored."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from kernos.abi.errors import StatusError
from kernos.storage.db import Where, connect, upsert

from .access import GROUP_RE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollments (
    name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, grp TEXT NOT NULL, uses_left INTEGER NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
);
"""
_COLUMNS = ("name", "token_hash", "grp", "uses_left", "created", "expires", "revoked")
PREFIX = "kn_enroll_"


@dataclass(frozen=True)
class Enrollment:
    name: str
    group: str          # "" : none
    uses_left: int
    expires: float      # 0: never
    revoked: bool


class Enrollments:
    def __init__(self, path: Where):
        self._db = connect(path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def create(self, name: str, uses: int = 1, ttl_s: float = 0, group: str = "") -> tuple[str, Enrollment]:
        if not GROUP_RE.match(name) or (group and not GROUP_RE.match(group)):
            raise StatusError("INVALID_ARGUMENT", "token and group names are 1-64 characters of letters, digits, "
                                                  "'_', '.', '-'")
        if uses < 1 or ttl_s < 0:
            raise StatusError("INVALID_ARGUMENT", "an enrollment token needs uses >= 1 and ttl >= 0")
        token = PREFIX + secrets.token_urlsafe(32)
        expires = time.time() + ttl_s if ttl_s else 0.0
        with self._lock:
            self._db.execute(upsert("enrollments", _COLUMNS, ("name",)),
                             (name, _hash(token), group, uses, time.time(), expires, 0))
        return token, Enrollment(name, group, uses, expires, False)

    def redeem(self, token: str | None) -> Enrollment | None:
        """Use one of the token's uses; None if it is unknown, used up, expired or revoked."""
        if not token or not token.startswith(PREFIX):
            return None
        with self._lock:     # one statement: two kernels redeeming the last use at once cannot both get it
            r = self._db.execute("UPDATE enrollments SET uses_left=uses_left-1 WHERE token_hash=? AND revoked=0 AND "
                                 "uses_left>0 AND (expires=0 OR expires>?) RETURNING name, grp, uses_left, expires",
                                 (_hash(token), time.time())).fetchone()
            return None if r is None else Enrollment(r[0], r[1], r[2], r[3], False)

    def revoke(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("UPDATE enrollments SET revoked=1 WHERE name=? AND revoked=0",
                                    (name,)).rowcount > 0

    def list(self) -> list[Enrollment]:
        return [Enrollment(r[0], r[1], r[2], r[3], bool(r[4])) for r in
                self._db.execute("SELECT name, grp, uses_left, expires, revoked FROM enrollments ORDER BY created")]

    def close(self) -> None:
        self._db.close()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
