"""Principals: who calls a syscall. An `Agent` (registered by name, holding a token) or an `Operator` (an
admin token). Both carry `agent_id` (operators: "admin:NAME") and `operator`, which every permission check
reads instead of inspecting the id.

The agent registry: names, hashed tokens, liveness and per-agent counters, persisted in SQLite.

An agent's id is its name, so an agent that restarts keeps its identity (and, in later services, its
memory and files). A name is held while its agent is active; an agent silent for longer than
`agent_ttl_s` is expired and its token revoked, so a crashed agent's name can be taken again.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernos.storage.db import connect
from kernos.storage.status import StatusError

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
"""


class RegistryError(StatusError):
    pass


@dataclass
class Agent:
    agent_id: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "active"
    registered_at: float = 0.0
    last_seen: float = 0.0
    syscalls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_hash: str | None = None
    operator = False  # a class attribute, not a field: agents are never operators


@dataclass
class Operator:
    """An admin token's principal; it stands where an Agent would."""

    agent_id: str  # "admin:NAME"
    operator = True


Principal = Agent | Operator


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AgentRegistry:
    def __init__(self, path: Path, ttl_s: float):
        self.ttl_s = ttl_s
        self._db = connect(path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._agents: dict[str, Agent] = {}
        self._by_token: dict[str, str] = {}
        for row in self._db.execute(
            "SELECT agent_id, description, labels, token_hash, state, registered_at, "
            "last_seen, syscalls, prompt_tokens, completion_tokens FROM agents"
        ):
            a = Agent(row[0], row[1], json.loads(row[2]), row[4], row[5], row[6], row[7], row[8], row[9], row[3])
            self._agents[a.agent_id] = a
            if a.state == "active" and a.token_hash:
                self._by_token[a.token_hash] = a.agent_id

    def register(self, name: str, description: str = "", labels: dict[str, str] | None = None) -> tuple[Agent, str]:
        if not NAME_RE.match(name):
            raise RegistryError(
                "INVALID_ARGUMENT", "agent name must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        if len(description) > 1024 or len(labels or {}) > 32:
            raise RegistryError("INVALID_ARGUMENT", "description is limited to 1024 characters and labels to 32")
        now = time.time()
        token = "kn_" + secrets.token_urlsafe(32)
        with self._lock:
            old = self._agents.get(name)
            if old is not None and old.state == "active":
                if now - old.last_seen < self.ttl_s:
                    raise RegistryError(
                        "ALREADY_EXISTS",
                        f"agent '{name}' is registered and active; reconnect with its token or choose another name",
                    )
                self._by_token.pop(old.token_hash or "", None)
            agent = Agent(name, description, dict(labels or {}), "active", now, now, token_hash=hash_token(token))
            if old is not None:  # a returning agent keeps its lifetime counters
                agent.syscalls, agent.prompt_tokens, agent.completion_tokens = (
                    old.syscalls,
                    old.prompt_tokens,
                    old.completion_tokens,
                )
            self._save(agent)
            self._agents[name] = agent
            self._by_token[agent.token_hash] = name
        return agent, token

    def authenticate(self, token: str | None) -> Agent | None:
        if not token:
            return None
        agent_id = self._by_token.get(hash_token(token))
        if agent_id is None:
            return None
        agent = self._agents[agent_id]
        now = time.time()
        if now - agent.last_seen >= self.ttl_s:
            self._set_state(agent, "expired")
            return None
        agent.last_seen = now
        agent.syscalls += 1
        return agent

    def exit(self, agent: Agent) -> None:
        self._set_state(agent, "exited")

    def add_tokens(self, agent: Agent, prompt: int, completion: int) -> None:
        with self._lock:
            agent.prompt_tokens += prompt
            agent.completion_tokens += completion

    def list(self, include_exited: bool = False) -> list[Agent]:
        now = time.time()
        out = []
        for a in sorted(self._agents.values(), key=lambda a: a.registered_at):
            if a.state == "active" and now - a.last_seen >= self.ttl_s:
                self._set_state(a, "expired")
            if include_exited or a.state == "active":
                out.append(a)
        return out

    def active_count(self) -> int:
        return sum(1 for a in self.list())

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

    def close(self) -> None:
        self.flush()
        self._db.close()

    def _set_state(self, agent: Agent, state: str) -> None:
        with self._lock:
            self._by_token.pop(agent.token_hash or "", None)
            agent.state = state
            agent.token_hash = None
            self._save(agent)

    def _save(self, a: Agent) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO agents(agent_id, description, labels, token_hash, state, registered_at, last_seen,"
            " syscalls, prompt_tokens, completion_tokens) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                a.agent_id,
                a.description,
                json.dumps(a.labels),
                a.token_hash,
                a.state,
                a.registered_at,
                a.last_seen,
                a.syscalls,
                a.prompt_tokens,
                a.completion_tokens,
            ),
        )
