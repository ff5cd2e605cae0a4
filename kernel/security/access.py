"""Access control, decided in one place for every syscall.

Principals are agents (registered), operators (admin tokens, principal "admin:NAME") and groups of agents.
An agent owns its own resources (memory namespace, storage space, contexts, generations) and nothing else;
grants (read / write, where write includes read) give another agent or a group access to a memory
namespace or a storage path prefix, optionally expiring, and are revocable. Each agent also holds a set of
capability families (llm, memory, storage, tools, tuner; admin for operators) that an operator can narrow.

Two kinds of decision, each made once per syscall and written to the audit log:
- `decide(principal, call)`: the capability family of a syscall (`kernos.abi.syscalls`) and the owner its
  request names (memory namespace, storage space and path); the gate calls it before any use case runs.
- `authorize_model` / `authorize_tool`: the model, adapter or tool a request names, which only its use
  case can resolve (the adapter a generation uses may be the agent's default one).
"""
from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import Syscall
from kernos.abi.trace import TraceRecord
from kernos.storage.db import Where, connect, upsert
from kernos.storage.traces import TraceLog

from .principals import Operator

FAMILIES = ("llm", "memory", "storage", "tools", "tuner", "admin")
DEFAULT_FAMILIES = ("llm", "memory", "storage", "tools", "tuner")
GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY, grantee TEXT NOT NULL, kind TEXT NOT NULL, owner TEXT NOT NULL, resource TEXT NOT NULL,
    permission TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
    granted_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS members (grp TEXT NOT NULL, agent_id TEXT NOT NULL, PRIMARY KEY (grp, agent_id));
CREATE TABLE IF NOT EXISTS groups_ (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS capabilities (agent_id TEXT PRIMARY KEY, families TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY, token_hash TEXT NOT NULL, admin INTEGER NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
);
"""

_TOKEN_COLUMNS = ("name", "token_hash", "admin", "created", "expires", "revoked")

OPEN = "not restricted"


class AccessError(StatusError):
    pass


@dataclass
class Grant:
    grant_id: str
    grantee: str
    kind: str
    owner: str
    resource: str
    permission: str
    created: float
    expires: float
    revoked: bool
    granted_by: str

    def active(self, now: float) -> bool:
        return not self.revoked and (self.expires == 0 or now < self.expires)


def _covers(prefix: str, path: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


class AccessControl:
    """`resolve(kind, name)` tells who owns a tool ("tool") and whether a model or "model/adapter" is
    restricted ("model"): (owner, needs_grant).

    Grants, group memberships and capabilities are kept in memory, written through to the database; a decision
    first asks the database whether anyone else (another kernel of a cluster) committed a change to them since,
    and reloads if so. Operator tokens are read from the database at each use, because `kernos token create`
    adds them from another process while the kernel runs."""

    def __init__(self, path: Where, admin_token: str | None = None, resolve=None, audit: TraceLog | None = None):
        self.resolve = resolve or (lambda kind, name: ("kernel", False))
        self.audit = audit
        self._db = connect(path, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._config_admin = hashlib.sha256(admin_token.encode()).hexdigest() if admin_token else None
        self._version = None
        self._fresh()

    def _fresh(self) -> None:
        """Reload the caches if another writer committed to them. Copy-on-write: a reader on another thread
        always sees a whole value."""
        version = self._db.data_version("members", "capabilities", "grants")
        if version == self._version:
            return
        with self._lock:
            self._version = version
            groups_of: dict[str, frozenset[str]] = {}
            for g, a in self._db.execute("SELECT grp, agent_id FROM members"):
                groups_of[a] = groups_of.get(a, frozenset()) | {g}
            grants: dict[tuple[str, str], tuple[Grant, ...]] = {}
            for g in (g for g in self._all_grants() if not g.revoked):
                grants[(g.kind, g.owner)] = grants.get((g.kind, g.owner), ()) + (g,)
            self._groups_of, self._grants = groups_of, grants
            self._caps = {a: fams for a, fams in self._db.execute("SELECT agent_id, families FROM capabilities")}

    # -- operators -----------------------------------------------------------------------------------
    def create_token(self, name: str, admin: bool = True, ttl_s: float = 0) -> tuple[str, float]:
        if not GROUP_RE.match(name):
            raise AccessError("INVALID_ARGUMENT", "token names are 1-64 characters of letters, digits, '_', '.', '-'")
        token = "kn_admin_" + secrets.token_urlsafe(32)
        expires = time.time() + ttl_s if ttl_s else 0.0
        with self._lock:
            self._db.execute(upsert("tokens", _TOKEN_COLUMNS, ("name",)),
                             (name, hashlib.sha256(token.encode()).hexdigest(), int(admin), time.time(), expires, 0))
        return token, expires

    def revoke_token(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("UPDATE tokens SET revoked=1 WHERE name=? AND revoked=0", (name,)).rowcount > 0

    def tokens(self) -> list[tuple[str, float, bool]]:
        """(name, expires, revoked) of every operator token; never the token."""
        return [(r[0], r[1], bool(r[2])) for r in
                self._db.execute("SELECT name, expires, revoked FROM tokens ORDER BY name")]

    def operator(self, token: str | None) -> Operator | None:
        if not token:
            return None
        h = hashlib.sha256(token.encode()).hexdigest()
        if self._config_admin and secrets.compare_digest(h, self._config_admin):
            return Operator("admin:config")
        r = self._db.execute("SELECT name, expires, revoked FROM tokens WHERE token_hash=?", (h,)).fetchone()
        if r is None or r[2] or (r[1] and time.time() >= r[1]):
            return None
        return Operator(f"admin:{r[0]}")

    # -- groups and capabilities ---------------------------------------------------------------------------
    def create_group(self, name: str) -> None:
        if not GROUP_RE.match(name):
            raise AccessError("INVALID_ARGUMENT", "group names are 1-64 characters of letters, digits, '_', '.', '-'")
        with self._lock:
            self._db.execute("INSERT INTO groups_ VALUES (?) ON CONFLICT DO NOTHING", (name,))

    def _require_group(self, name: str) -> None:
        if not self._db.execute("SELECT 1 FROM groups_ WHERE name=?", (name,)).fetchone():
            raise AccessError("NOT_FOUND", f"no group '{name[:64]}'")

    def add_member(self, group: str, agent_id: str) -> None:
        self._require_group(group)
        with self._lock:
            self._db.execute("INSERT INTO members VALUES (?,?) ON CONFLICT DO NOTHING", (group, agent_id))
            self._groups_of[agent_id] = self._groups_of.get(agent_id, frozenset()) | {group}

    def remove_member(self, group: str, agent_id: str) -> None:
        self._require_group(group)
        with self._lock:
            self._db.execute("DELETE FROM members WHERE grp=? AND agent_id=?", (group, agent_id))
            self._groups_of[agent_id] = self._groups_of.get(agent_id, frozenset()) - {group}

    def groups(self) -> dict[str, list[str]]:
        out = {r[0]: [] for r in self._db.execute("SELECT name FROM groups_ ORDER BY name")}
        for g, a in self._db.execute("SELECT grp, agent_id FROM members ORDER BY agent_id"):
            out.setdefault(g, []).append(a)
        return out

    def groups_of(self, agent_id: str) -> frozenset[str]:
        self._fresh()
        return self._groups_of.get(agent_id, frozenset())

    def capabilities(self, agent_id: str, operator: bool = False) -> tuple[str, ...]:
        if operator:
            return FAMILIES
        self._fresh()
        fams = self._caps.get(agent_id)
        return DEFAULT_FAMILIES if fams is None else tuple(fams.split(",")) if fams else ()

    def set_capabilities(self, agent_id: str, families: list[str]) -> tuple[str, ...]:
        bad = [f for f in families if f not in FAMILIES]
        if bad:
            raise AccessError("INVALID_ARGUMENT", f"unknown capability families {bad}; known: {list(FAMILIES)}")
        with self._lock:
            self._db.execute(upsert("capabilities", ("agent_id", "families"), ("agent_id",)),
                             (agent_id, ",".join(families)))
            self._caps[agent_id] = ",".join(families)
        return self.capabilities(agent_id)

    # -- grants --------------------------------------------------------------------------------------------
    def grant(self, by, grantee: str, kind: str, owner: str, resource: str, permission: str,
              ttl_s: float = 0) -> Grant:
        """`by` (a principal) lets `grantee` use `owner`'s resource; only the owner or an operator may."""
        owner = owner or by.agent_id
        if not (ttl_s >= 0 and math.isfinite(ttl_s)):
            raise AccessError("INVALID_ARGUMENT", "ttl_s must be a finite number of seconds >= 0 (0: no expiry)")
        if kind not in ("memory", "storage", "tool", "model"):
            raise AccessError("INVALID_ARGUMENT", "kind must be 'memory', 'storage', 'tool' or 'model'")
        allowed = ("execute",) if kind in ("tool", "model") else ("read", "write")
        if permission not in allowed:
            raise AccessError("INVALID_ARGUMENT", f"permission for {kind} must be one of {list(allowed)}")
        if kind in ("tool", "model"):
            if not resource:
                raise AccessError("INVALID_ARGUMENT", f"name the {kind} in resource")
            if kind == "tool" and "/" not in resource and not by.operator:
                resource = f"{by.agent_id}/{resource}"      # an agent grants its own private tool, by its name
            owner = self.resolve(kind, resource)[0]
        if not by.operator and owner != by.agent_id:
            raise AccessError("PERMISSION_DENIED", f"only '{owner}' (or an operator) may grant access to its resources")
        if grantee.startswith("group:"):
            self._require_group(grantee[6:])
        elif not grantee or grantee == owner:
            raise AccessError("INVALID_ARGUMENT", "grantee must be another agent or 'group:NAME'")
        if kind == "memory" and resource:
            raise AccessError("INVALID_ARGUMENT", "memory grants cover a whole namespace: leave resource empty")
        if kind == "storage" and resource:  # noqa: SIM102
            from kernos.storage.files import StorageError, normalize_path
            try:
                resource = normalize_path(resource)
            except StorageError as e:
                raise AccessError("INVALID_ARGUMENT", f"resource: {e}") from None
        g = Grant(uuid.uuid4().hex[:16], grantee, kind, owner, resource, permission, time.time(),
                  time.time() + ttl_s if ttl_s else 0.0, False, by.agent_id)
        with self._lock:
            self._db.execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?,?)", (
                g.grant_id, g.grantee, g.kind, g.owner, g.resource, g.permission, g.created, g.expires, 0,
                by.agent_id))
            self._grants[(g.kind, g.owner)] = self._grants.get((g.kind, g.owner), ()) + (g,)
        return g

    def _select_grants(self, where: str = "", args: tuple = ()) -> list[Grant]:
        rows = self._db.execute("SELECT grant_id, grantee, kind, owner, resource, permission, created, expires, "
                                f"revoked, granted_by FROM grants {where} ORDER BY created", args).fetchall()
        return [Grant(*r[:8], bool(r[8]), r[9]) for r in rows]

    def _all_grants(self) -> list[Grant]:
        return self._select_grants()

    def _grant(self, grant_id: str) -> Grant:
        found = self._select_grants("WHERE grant_id=?", (grant_id,))
        if not found:
            raise AccessError("NOT_FOUND", f"no grant '{grant_id[:32]}'")
        return found[0]

    def revoke(self, by, grant_id: str) -> Grant:
        g = self._grant(grant_id)
        if not by.operator and by.agent_id not in (g.owner, g.granted_by):
            raise AccessError("PERMISSION_DENIED", "only the owner, the granter or an operator may revoke a grant")
        with self._lock:
            self._db.execute("UPDATE grants SET revoked=1 WHERE grant_id=?", (grant_id,))
            key = (g.kind, g.owner)
            self._grants[key] = tuple(x for x in self._grants.get(key, ()) if x.grant_id != grant_id)
        g.revoked = True
        return g

    def grants(self, principal, include_revoked: bool = False) -> list[Grant]:
        out = self._all_grants()
        now = time.time()
        if not principal.operator:
            pid = principal.agent_id
            mine = {pid} | {f"group:{g}" for g in self.groups_of(pid)}
            out = [g for g in out if g.owner == pid or g.grantee in mine]
        return [g for g in out if include_revoked or g.active(now)]

    # -- the decision ----------------------------------------------------------------------------------------
    def decide(self, principal, call: Syscall) -> tuple[bool, str, str]:
        """(allowed, capability, reason) for `principal` making `call`; audited (kernel calls need only a
        caller, and are audited only if refused)."""
        allowed, capability, reason = self._decide(principal, call)
        if call.spec.family != "kernel" or not allowed:
            self._audit(principal.agent_id, call.name, allowed, capability, reason)
        return allowed, capability, reason

    def _audit(self, pid: str, what: str, allowed: bool, capability: str, reason: str) -> None:
        if self.audit is not None:
            self.audit.record(TraceRecord(pid, what, "ALLOW" if allowed else "DENY", {"capability": capability},
                                          {"reason": reason}, {}))

    def _decide(self, principal, call: Syscall) -> tuple[bool, str, str]:
        family, perm, names = call.spec.family, call.spec.permission, call.spec.names
        pid = principal.agent_id
        if family == "kernel":
            return True, "kernel", "authenticated"
        if family == "access":
            return True, "access", "grant management on the caller's own resources"
        if family not in self.capabilities(pid, principal.operator):
            return False, f"{family}", f"'{pid}' lacks the '{family}' capability family"
        if names in ("none", "own", "named"):
            return True, f"{family}:{perm}", "own resources" if names != "named" else "decided by the use case"
        owner = (call.namespace if names == "namespace" else call.owner) or pid
        resource = call.path if names == "path" else ""
        capability = f"{family}:{perm} on {owner}" + (f"/{resource}" if resource else "")
        if owner == pid or principal.operator:
            return True, capability, "owner" if owner == pid else "operator"
        if names == "path" and resource:
            from kernos.storage.files import StorageError, normalize_path
            try:
                resource = normalize_path(resource)
            except StorageError:
                return True, capability, "invalid path: the service rejects it"
        mine = {pid} | {f"group:{g}" for g in self.groups_of(pid)}    # (refreshes the caches)
        now = time.time()
        for g in self._grants.get((family, owner), ()):
            if not g.active(now) or g.grantee not in mine:
                continue
            if (perm == "read" or g.permission == "write") and (family == "memory" or _covers(g.resource, resource)):
                return True, capability, f"grant to {g.grantee}"
        return False, capability, f"no grant gives '{pid}' {capability}"

    def _has_grant(self, pid: str, kind: str, owner: str, resource: str) -> bool:
        mine = {pid} | {f"group:{g}" for g in self.groups_of(pid)}    # (refreshes the caches)
        now = time.time()
        return any(g.grantee in mine and g.resource == resource and g.active(now)
                   for g in self._grants.get((kind, owner), ()))

    def authorize_model(self, principal, model: str, adapter: str | None, default: str | None = None) -> str | None:
        """The one decision on the model and adapter a generation uses: PERMISSION_DENIED for a model or a
        named adapter the caller may not use; its default adapter (`default`, used when it names none) is
        dropped if it may not use that one any more. Returns the adapter to use."""
        for name in (model, f"{model}/{adapter}" if adapter else None):
            if name is not None:
                self._require(principal, "model", name)
        if adapter or not default:
            return adapter or None
        allowed, capability, reason = self.decide_named(principal, "model", f"{model}/{default}")
        if reason != OPEN:
            self._audit(principal.agent_id, "default_adapter", allowed, capability, reason)
        return default if allowed else None

    def authorize_tool(self, principal, name: str) -> None:
        self._require(principal, "tool", name)

    def _require(self, principal, kind: str, name: str) -> None:
        allowed, capability, reason = self.decide_named(principal, kind, name)
        if reason != OPEN:             # a restricted or private resource: a decision worth the audit log
            self._audit(principal.agent_id, f"{kind}:{name}", allowed, capability, reason)
        if not allowed:
            raise AccessError("PERMISSION_DENIED", f"missing capability {capability}: {reason}")

    def decide_named(self, principal, kind: str, name: str) -> tuple[bool, str, str]:
        """May `principal` execute the tool or model ("model/adapter") `name`? ("open": nothing to decide)"""
        pid = principal.agent_id
        owner, restricted = self.resolve(kind, name)
        if not restricted:
            return True, f"{kind}:execute on {name}", OPEN
        if principal.operator or owner == pid:
            return True, f"{kind}:execute on {name}", "allowed"
        if not self._has_grant(pid, kind, owner, name):
            return False, f"{kind}:execute on {name}", f"'{name}' is restricted and no grant gives '{pid}' access"
        return True, f"{kind}:execute on {name}", "granted"

    def close(self) -> None:
        self._db.close()
