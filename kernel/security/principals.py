"""Principals: who calls a syscall. An `Agent` (registered by name, holding a token) or an `Operator` (an
admin token). Both carry `agent_id` (operators: "admin:NAME") and `operator`, which every permission check
reads instead of inspecting the id.

The agent registry: names, hashed tokens, sessions and per-agent counters, persisted in SQLite.

An agent's id is its name, and a name is bound to its credential for good: the token issued when the name
was first registered (or the latest one, after a rotation) is the only way back to it, besides an operator.
The name survives restarts of the kernel and of the agent. Sessions come and go without touching that
ownership: an agent silent for `agent_ttl_s` is `idle`, one that called Exit is `exited`; its next call with
its token starts a new session (`active`). Only a rotation (registering the name again with its token or an
operator's) or an operator's revocation ends a token.

Other processes may write the registry too (`kernos token create --agent`, `--revoke-agent`): the registry
notices their commits through SQLite's `data_version` and reloads before it answers.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from kernos.abi.errors import StatusError
from kernos.storage.db import Where, conflict_errors, connect, upsert

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    labels TEXT NOT NULL,
    token_hash TEXT,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    syscalls INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS agents_by_token ON agents(token_hash);
"""
_COLUMNS = ("agent_id, description, labels, token_hash, state, registered_at, last_seen, syscalls, prompt_tokens, "
            "completion_tokens")


class RegistryError(StatusError):
    pass


@dataclass
class Agent:
    agent_id: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "active"          # active | idle | exited (sessions); the name stays owned in all three
    registered_at: float = 0.0
    last_seen: float = 0.0
    syscalls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_hash: str | None = None  # None: revoked; only an operator can give the name a new token
    operator = False  # a class attribute, not a field: agents are never operators


@dataclass
class Operator:
    """An admin token's principal; it stands where an Agent would."""

    agent_id: str  # "admin:NAME"
    operator = True


Principal = Agent | Operator


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


MAX_LABEL_KEY, MAX_LABEL_VALUE = 64, 256


def check_name(name: str, description: str = "", labels: dict | None = None) -> None:
    if not NAME_RE.match(name or ""):
        raise RegistryError("INVALID_ARGUMENT", "agent name must be 1-64 characters of letters, digits, '_', '.', '-'")
    if len(description) > 1024 or len(labels or {}) > 32:
        raise RegistryError("INVALID_ARGUMENT", "description is limited to 1024 characters and labels to 32")
    for key, value in (labels or {}).items():     # 24 labels of 1 MiB each were taken, and stored, per call
        if not 0 < len(key) <= MAX_LABEL_KEY or len(value) > MAX_LABEL_VALUE:
            raise RegistryError("INVALID_ARGUMENT", f"label '{key[:64]}': keys are 1-{MAX_LABEL_KEY} characters, "
                                                    f"values at most {MAX_LABEL_VALUE}")


def _agent(row) -> Agent:
    return Agent(row[0], row[1], json.loads(row[2]), row[4], row[5], row[6], row[7], row[8], row[9], row[3])


class AgentRegistry:
    def __init__(self, path: Where, ttl_s: float):
        self.ttl_s = ttl_s
        self._db = connect(path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._agents: dict[str, Agent] = {}
        self._by_token: dict[str, str] = {}
        self._version = None
        self._sync()

    # -- ownership -------------------------------------------------------------------------------------------
    def get(self, name: str) -> Agent | None:
        with self._lock:
            self._sync()
            return self._agents.get(name)

    def owns(self, agent: Agent, token: str | None) -> bool:
        """Whether `token` is `agent`'s credential (whatever its session's state)."""
        return bool(token and agent.token_hash and secrets.compare_digest(hash_token(token), agent.token_hash))

    def create(self, name: str, description: str = "", labels: dict[str, str] | None = None) -> tuple[Agent, str]:
        """A new agent bound to a new token (shown once). ALREADY_EXISTS if the name is owned."""
        check_name(name, description, labels)
        with self._lock:
            self._sync()
            if name in self._agents:
                raise RegistryError("ALREADY_EXISTS", f"agent '{name}' exists: registering it again needs its token "
                                                      "(or an operator's)")
            now = time.time()
            token = "kn_" + secrets.token_urlsafe(32)
            agent = Agent(name, description, dict(labels or {}), "active", now, now, token_hash=hash_token(token))
            try:
                self._save(agent, new=True)
            except conflict_errors():      # another kernel of the cluster registered it a moment ago
                raise RegistryError("ALREADY_EXISTS", f"agent '{name}' exists") from None
            self._agents[name] = agent
            self._by_token[agent.token_hash] = name
        return agent, token

    def rotate(self, name: str, description: str = "", labels: dict[str, str] | None = None) -> tuple[Agent, str]:
        """A new token for an existing agent (the old one stops working) and a new session; the caller has
        checked the right to do it. The agent keeps its registration time and lifetime counters."""
        check_name(name, description, labels)
        with self._lock:
            self._sync()
            agent = self._agents[name]
            self._by_token.pop(agent.token_hash or "", None)
            token = "kn_" + secrets.token_urlsafe(32)
            agent.description, agent.labels = description, dict(labels or {})
            agent.token_hash, agent.state, agent.last_seen = hash_token(token), "active", time.time()
            self._save(agent)
            self._by_token[agent.token_hash] = name
        return agent, token

    def revoke(self, name: str) -> bool:
        """End the agent's token (an operator's act): the name stays owned; only an operator can re-issue it."""
        with self._lock:
            self._sync()
            agent = self._agents.get(name)
            if agent is None or agent.token_hash is None:
                return False
            self._by_token.pop(agent.token_hash, None)
            agent.token_hash, agent.state = None, "exited"
            self._save(agent)
        return True

    # -- sessions --------------------------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Agent | None:
        with self._lock:
            agent_id = self._holder(token)
            if agent_id is None:
                return None
            agent = self._agents[agent_id]
            if agent.state != "active":       # a new session for an idle or exited agent
                agent.state = "active"
                self._save(agent)
            agent.last_seen = time.time()
            agent.syscalls += 1
        return agent

    def identify(self, token: str | None) -> str | None:
        """Whose token this is (no session, no counters): where a cluster forwards the call."""
        with self._lock:
            return self._holder(token)

    def _holder(self, token: str | None) -> str | None:
        """The agent holding `token` (called under the lock)."""
        if not token:
            return None
        h = hash_token(token)
        self._sync()
        return self._by_token.get(h) or self._look_up(h)

    def _look_up(self, h: str) -> str | None:
        """A token not known here may be an agent another node registered a moment ago (in a cluster, change
        notifications take milliseconds): ask the database for that one row."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM agents WHERE token_hash=?", (h,)).fetchone()
        if row is None:
            return None
        fresh = _agent(row)
        agent = self._agents.setdefault(fresh.agent_id, fresh)
        agent.token_hash, agent.description, agent.labels = fresh.token_hash, fresh.description, fresh.labels
        self._by_token[h] = agent.agent_id
        return agent.agent_id

    def exit(self, agent: Agent) -> None:
        """End the agent's session; its name and token stay its own."""
        with self._lock:
            agent.state = "exited"
            self._save(agent)

    def add_tokens(self, agent: Agent, prompt: int, completion: int) -> None:
        with self._lock:
            agent.prompt_tokens += prompt
            agent.completion_tokens += completion

    def list(self, include_exited: bool = False) -> list[Agent]:
        """Agents with a session (active); with `include_exited`, every agent the kernel knows."""
        now = time.time()
        out = []
        with self._lock:
            self._sync()
            for a in sorted(self._agents.values(), key=lambda a: a.registered_at):
                if a.state == "active" and now - a.last_seen >= self.ttl_s:
                    a.state = "idle"
                    self._save(a)
                if include_exited or a.state == "active":
                    out.append(a)
        return out

    def active_count(self) -> int:
        return len(self.list())

    def count(self) -> int:
        with self._lock:
            self._sync()
            return len(self._agents)

    def flush(self) -> None:
        """Persist counters and last-seen times (called periodically and at shutdown)."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "UPDATE agents SET last_seen=?, syscalls=?, prompt_tokens=?, completion_tokens=? WHERE agent_id=?",
                    [
                        (a.last_seen, a.syscalls, a.prompt_tokens, a.completion_tokens, a.agent_id)
                        for a in self._agents.values()
                    ],
                )

    def close(self, flush: bool = True) -> None:
        if flush:
            self.flush()
        self._db.close()

    # -- persistence -----------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Reload what another process committed since we last looked (its tokens and states; our in-memory
        counters and last-seen times are newer than the rows and are kept)."""
        version = self._db.data_version("agents")
        if version == self._version:
            return
        self._version = version
        self._by_token.clear()
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM agents"):
            fresh = _agent(row)
            agent = self._agents.get(fresh.agent_id)
            if agent is None:
                agent = self._agents[fresh.agent_id] = fresh
            else:
                agent.token_hash, agent.description, agent.labels = fresh.token_hash, fresh.description, fresh.labels
                if fresh.state != agent.state and fresh.last_seen >= agent.last_seen:
                    agent.state = fresh.state
            if agent.token_hash:
                self._by_token[agent.token_hash] = agent.agent_id

    def _save(self, a: Agent, new: bool = False) -> None:
        columns = _COLUMNS.split(", ")
        with self._db:
            self._db.execute(
                f"INSERT INTO agents({_COLUMNS}) VALUES ({','.join('?' * len(columns))})" if new
                else upsert("agents", columns, ("agent_id",)),
                (a.agent_id, a.description, json.dumps(a.labels), a.token_hash, a.state, a.registered_at,
                 a.last_seen, a.syscalls, a.prompt_tokens, a.completion_tokens),
            )
