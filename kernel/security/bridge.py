"""Agents of a protocol without authentication (AIOS's `/query`: any caller names itself any agent). Each name
a caller claims becomes a Kernos agent of its own, `PREFIX + name`, labelled as bridged, in one group with the
capability families the operator configured, so its memory, files, quotas and traces are its own and
isolated from every other name. The bridge holds each such agent's token (in a 0600 file under the data dir)
and authenticates with it on every call: revoking the token (`kernos token revoke --agent NAME`) shuts that
name out, and the bridge never takes over an agent it did not create."""
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

LABEL = "bridge"
HASHED = re.compile(r"-[0-9a-f]{10}$")


class BridgedAgents:
    def __init__(self, registry, access, path: Path, protocol: str, prefix: str, group: str,
                 capabilities: list[str], max_agents: int, per_minute: int = 0):
        self.registry = registry
        self.access = access
        self.path = path
        self.protocol = protocol
        self.prefix = prefix
        self.group = group
        self.capabilities = list(capabilities)
        self.max_agents = max_agents
        self.per_minute = per_minute
        self._new: dict[str, deque] = {}           # address -> times it created a name (last minute)
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

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
            token = self._tokens.get(kname)
            if token is None:
                self._count_new(peer)
                token = self._create(name, kname)
            agent = self.registry.authenticate(token)
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
        existing = self.registry.get(kname)
        if existing is not None:
            if existing.labels.get(LABEL) != self.protocol:
                raise StatusError("ALREADY_EXISTS", f"the Kernos agent '{kname}' that {self.protocol} agent "
                                                    f"'{name[:64]}' maps to belongs to someone else")
            if existing.token_hash is None:
                raise StatusError("PERMISSION_DENIED", f"{self.protocol} agent '{name[:64]}' has been shut out by an "
                                                       "operator (its token is revoked)")
            _, token = self.registry.rotate(kname, existing.description, existing.labels)   # our token file was lost
        else:
            mine = sum(1 for k in self._tokens if k.startswith(self.prefix))
            if self.max_agents and mine >= self.max_agents:
                raise StatusError("RESOURCE_EXHAUSTED", f"this kernel holds its maximum of {self.max_agents} "
                                                        f"{self.protocol} agents")
            _, token = self.registry.create(kname, f"{self.protocol} agent '{name[:200]}'",
                                            {LABEL: self.protocol, "name": name[:256]})
            self.access.create_group(self.group)
            self.access.add_member(self.group, kname)
            self.access.set_capabilities(kname, self.capabilities)
        self._tokens[kname] = token
        self._save()
        return token

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._tokens, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
