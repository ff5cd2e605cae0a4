"""Agents of a protocol without authentication (AIOS's `/query`: any caller names itself any agent). Each name
a caller claims becomes a Kernos agent of its own, `PREFIX + name`, labelled as bridged, in one group with the
capability families the operator configured, so its memory, files, quotas and traces are its own and
isolated from every other name. The bridge holds each such agent's token and authenticates with it on every
call: revoking the token (`kernos token revoke --agent NAME`) shuts that name out, and the bridge never takes
over an agent it did not create.

The tokens are kept in a store of their own (`bridge.db`, 0600 on one machine; the cluster's database in a
cluster), so that every kernel of a cluster acts for the same names with the same tokens: with a file per
kernel, a name first used on one node and then on another made the second rotate the first's token away. Two
kernels meeting a new name at once: the one that claims its row creates the agent, the other waits for the
token (kernels before this kept a JSON file: it is taken in once, then removed)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import deque
from pathlib import Path

from kernos.abi.errors import StatusError
from kernos.storage.db import conflict_errors, connect

LABEL = "bridge"
WAIT_S = 10.0          # how long a kernel waits for the token of a name another kernel is creating
HASHED = re.compile(r"-[0-9a-f]{10}$")


class BridgedAgents:
    def __init__(self, registry, access, db, protocol: str, prefix: str, group: str,
                 capabilities: list[str], max_agents: int, per_minute: int = 0, legacy: Path | None = None):
        self.registry = registry
        self.access = access
        self.protocol = protocol
        self.prefix = prefix
        self.group = group
        self.capabilities = list(capabilities)
        self.max_agents = max_agents
        self.per_minute = per_minute
        self._new: dict[str, deque] = {}           # address -> times it created a name (last minute)
        self._lock = threading.Lock()
        self._db = connect(db)
        self._db.executescript("CREATE TABLE IF NOT EXISTS bridged (agent_id TEXT PRIMARY KEY, protocol TEXT NOT NULL, "
                               "token TEXT NOT NULL, created REAL NOT NULL);")
        if isinstance(db, Path):
            os.chmod(db, 0o600)          # tokens: the kernel's user only (as the JSON file was)
        self._tokens: dict[str, str] = {}
        if legacy is not None and legacy.exists():
            self._take_in(legacy)

    def _take_in(self, legacy: Path) -> None:
        """The tokens an older kernel kept in a JSON file, into the store (once; the file goes)."""
        with self._db:
            for kname, token in json.loads(legacy.read_text()).items():
                self._db.execute("INSERT INTO bridged VALUES (?,?,?,?) ON CONFLICT(agent_id) DO NOTHING",
                                 (kname, self.protocol, token, time.time()))
        legacy.unlink()

    def _stored(self, kname: str) -> str | None:
        row = self._db.execute("SELECT token FROM bridged WHERE agent_id=?", (kname,)).fetchone()
        return row[0] if row and row[0] else None

    def kernos_name(self, name: str) -> str:
        """The Kernos agent for a claimed name: the prefix and the name, or (when the name has characters Kernos
        names cannot hold, is long, or ends as such a hashed name does) a readable part, '-' and 10 hex digits of
        its hash. The two forms cannot meet: "alice-bot-e36a-e91b7536c9" once reached the agent of "alice bot
        e36a" (and read its memory), because a plain name could spell another's hashed one."""
        clean = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
        if clean == name and len(self.prefix) + len(name) <= 64 and not HASHED.search(name):
            return self.prefix + name
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        return f"{self.prefix}{clean[:63 - len(self.prefix) - len(digest)]}-{digest}"

    def principal(self, name: str, peer: str = ""):
        """The agent a call claiming `name` runs as (created on first use, at most `per_minute` new ones a
        minute from one address)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise StatusError("INVALID_ARGUMENT", "agent_name must be a non-empty string of at most 256 characters")
        kname = self.kernos_name(name)
        with self._lock:
            token = self._tokens.get(kname) or self._stored(kname)
            if token is None:
                self._count_new(peer)
                token = self._create(name, kname)
            agent = self.registry.authenticate(token)
            if agent is None and (fresh := self._stored(kname)) not in (None, token):   # replaced meanwhile
                token, agent = fresh, self.registry.authenticate(fresh)
            self._tokens[kname] = token
        if agent is None:
            raise StatusError("PERMISSION_DENIED", f"{self.protocol} agent '{name[:64]}' (Kernos agent '{kname}') has "
                                                   "been shut out by an operator (its token is revoked)")
        if agent.labels.get("name", name) != name:     # two names, one hash: the later one never gets the agent
            raise StatusError("ALREADY_EXISTS", f"{self.protocol} agent '{name[:64]}' maps to Kernos agent '{kname}', "
                                                "which another name holds: choose another name")
        return agent

    def _count_new(self, peer: str, now: float | None = None) -> None:
        """New names a minute from one address: an unauthenticated loopback client made 1,000 agents in 3 s."""
        if not self.per_minute:
            return
        now = time.monotonic() if now is None else now
        q = self._new.setdefault(peer, deque())
        while q and now - q[0] >= 60.0:
            q.popleft()
        if len(q) >= self.per_minute:
            raise StatusError("RESOURCE_EXHAUSTED", f"over {self.per_minute} new {self.protocol} agents a minute "
                                                    "from this address", max(1.0, 60.0 - (now - q[0])))
        q.append(now)

    def _create(self, name: str, kname: str) -> str:
        """The token of a name new to this kernel: created here if this kernel claims the name's row first, else
        the one the kernel that claimed it stores (waited for)."""
        try:
            with self._db:
                self._db.execute("INSERT INTO bridged VALUES (?,?,?,?)", (kname, self.protocol, "", time.time()))
        except conflict_errors():
            return self._await(name, kname)
        try:
            token = self._make(name, kname)
        except BaseException:
            with self._db:
                self._db.execute("DELETE FROM bridged WHERE agent_id=? AND token=''", (kname,))
            raise
        with self._db:
            self._db.execute("UPDATE bridged SET token=? WHERE agent_id=?", (token, kname))
        return token

    def _await(self, name: str, kname: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            row = self._db.execute("SELECT token FROM bridged WHERE agent_id=?", (kname,)).fetchone()
            if row is None:                       # the other kernel failed: claim it ourselves
                return self._create(name, kname)
            if row[0]:
                return row[0]
            time.sleep(0.05)
        raise StatusError("UNAVAILABLE", f"{self.protocol} agent '{name[:64]}' is being created by another kernel: "
                                         "try again", 1.0)

    def _make(self, name: str, kname: str) -> str:
        existing = self.registry.get(kname)
        if existing is not None:
            if existing.labels.get(LABEL) != self.protocol:
                raise StatusError("ALREADY_EXISTS", f"the Kernos agent '{kname}' that {self.protocol} agent "
                                                    f"'{name[:64]}' maps to belongs to someone else")
            if existing.token_hash is None:
                raise StatusError("PERMISSION_DENIED", f"{self.protocol} agent '{name[:64]}' has been shut out by an "
                                                       "operator (its token is revoked)")
            _, token = self.registry.rotate(kname, existing.description, existing.labels)   # its token was lost
        else:
            mine = self._db.execute("SELECT COUNT(*) FROM bridged WHERE protocol=? AND token <> ''",
                                    (self.protocol,)).fetchone()[0]
            if self.max_agents and mine >= self.max_agents:
                raise StatusError("RESOURCE_EXHAUSTED", f"this kernel holds its maximum of {self.max_agents} "
                                                        f"{self.protocol} agents")
            _, token = self.registry.create(kname, f"{self.protocol} agent '{name[:200]}'",
                                            {LABEL: self.protocol, "name": name[:256]})
            self.access.create_group(self.group)
            self.access.add_member(self.group, kname)
            self.access.set_capabilities(kname, self.capabilities)
        return token
