"""Working memory: named contexts (conversations) the kernel holds per agent, made of explicit blocks, as
in Letta/MemGPT. Pinned blocks (system prompt, persona, task) always stay in the prompt; turns are evicted
oldest first when the assembled prompt would exceed the context's token budget; an optional summary block
stands in for what was evicted. Stored in SQLite (WAL, full sync)."""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from kernos.abi.errors import StatusError
from kernos.storage.db import Where, connect

CONTEXT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROLES = {"system", "user", "assistant"}
MAX_BLOCK = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    agent_id TEXT NOT NULL, context_id TEXT NOT NULL, budget_tokens INTEGER NOT NULL, summarize INTEGER NOT NULL,
    model TEXT NOT NULL, created REAL NOT NULL, evicted INTEGER NOT NULL DEFAULT 0, next_seq INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (agent_id, context_id)
);
CREATE TABLE IF NOT EXISTS blocks (
    agent_id TEXT NOT NULL, context_id TEXT NOT NULL, block_id TEXT NOT NULL, seq INTEGER NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, pinned INTEGER NOT NULL, kind TEXT NOT NULL, label TEXT NOT NULL,
    PRIMARY KEY (agent_id, context_id, block_id)
);
"""


class ContextError(StatusError):
    pass


@dataclass
class Context:
    context_id: str
    budget_tokens: int
    summarize: bool
    model: str
    created: float
    evicted: int
    blocks: int = 0


@dataclass
class Block:
    block_id: str
    role: str
    content: str
    pinned: bool
    kind: str  # "block" | "turn" | "summary"
    label: str
    seq: int

    def message(self) -> dict:
        return {"role": self.role, "content": self.content}


def plan(blocks: list[Block], new: list[dict], count: Callable[[list[dict]], int], budget: int):
    """Assemble pinned blocks, the summary, turns and the new messages into a prompt of at most `budget`
    tokens (as `count` measures it), evicting the oldest turns. Returns (messages, evicted blocks, tokens)."""
    pinned = [b for b in blocks if b.pinned]
    summary = [b for b in blocks if b.kind == "summary" and not b.pinned]
    turns = [b for b in blocks if not b.pinned and b.kind != "summary"]
    evicted: list[Block] = []
    while True:
        messages = [b.message() for b in pinned + summary + turns] + list(new)
        tokens = count(messages)
        if tokens <= budget:
            return messages, evicted, tokens
        if not turns:
            raise ContextError(
                "RESOURCE_EXHAUSTED",
                f"pinned blocks, summary and the new messages are {tokens} tokens; the context's "
                f"budget is {budget}: unpin or shorten blocks, or raise budget_tokens",
            )
        evicted.append(turns.pop(0))


class ContextStore:
    def __init__(self, path: Where):
        self._db = connect(path, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def create(
        self, agent: str, context_id: str, budget: int, summarize: bool, model: str, system: str = ""
    ) -> Context:
        if not CONTEXT_ID.match(context_id):
            raise ContextError(
                "INVALID_ARGUMENT", "context_id must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        with self._lock:
            if self._db.execute(
                "SELECT 1 FROM contexts WHERE agent_id=? AND context_id=?", (agent, context_id)
            ).fetchone():
                raise ContextError("ALREADY_EXISTS", f"context '{context_id}' exists")
            self._db.execute(
                "INSERT INTO contexts(agent_id, context_id, budget_tokens, summarize, model, created) "
                "VALUES (?,?,?,?,?,?)",
                (agent, context_id, budget, int(summarize), model, time.time()),
            )
        if system:
            self.add_block(agent, context_id, "system", system, pinned=True, label="system")
        return self.get(agent, context_id)

    def get(self, agent: str, context_id: str) -> Context:
        r = self._db.execute(
            "SELECT context_id, budget_tokens, summarize, model, created, evicted FROM contexts "
            "WHERE agent_id=? AND context_id=?",
            (agent, context_id),
        ).fetchone()
        if r is None:
            raise ContextError("NOT_FOUND", f"no context '{context_id[:64]}'")
        n = self._db.execute(
            "SELECT COUNT(*) FROM blocks WHERE agent_id=? AND context_id=?", (agent, context_id)
        ).fetchone()[0]
        return Context(r[0], r[1], bool(r[2]), r[3], r[4], r[5], n)

    def list(self, agent: str) -> list[Context]:
        ids = [
            r[0]
            for r in self._db.execute("SELECT context_id FROM contexts WHERE agent_id=? ORDER BY created", (agent,))
        ]
        return [self.get(agent, c) for c in ids]

    def delete(self, agent: str, context_id: str) -> Context:
        ctx = self.get(agent, context_id)
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blocks WHERE agent_id=? AND context_id=?", (agent, context_id))
            self._db.execute("DELETE FROM contexts WHERE agent_id=? AND context_id=?", (agent, context_id))
        return ctx

    def blocks(self, agent: str, context_id: str) -> list[Block]:
        self.get(agent, context_id)
        rows = self._db.execute(
            "SELECT block_id, role, content, pinned, kind, label, seq FROM blocks WHERE agent_id=? "
            "AND context_id=? ORDER BY seq",
            (agent, context_id),
        )
        return [Block(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6]) for r in rows]

    def add_block(
        self,
        agent: str,
        context_id: str,
        role: str,
        content: str,
        pinned: bool = False,
        label: str = "",
        kind: str = "block",
    ) -> Block:
        if role not in ROLES:
            raise ContextError("INVALID_ARGUMENT", f"role must be one of {sorted(ROLES)}")
        if not content.strip() or len(content.encode()) > MAX_BLOCK:
            raise ContextError("INVALID_ARGUMENT", f"block content must be 1 to {MAX_BLOCK} bytes")
        self.get(agent, context_id)
        with self._lock, self._db:
            self._db.execute("BEGIN")
            seq = self._db.execute(     # one statement: two kernels appending at once get different places
                "UPDATE contexts SET next_seq=next_seq+1 WHERE agent_id=? AND context_id=? RETURNING next_seq-1",
                (agent, context_id)).fetchone()
            if seq is None:
                raise ContextError("NOT_FOUND", f"no context '{context_id}'")
            seq = seq[0]
            block = Block(uuid.uuid4().hex[:16], role, content, pinned, kind, label[:64], seq)
            self._db.execute(
                "INSERT INTO blocks VALUES (?,?,?,?,?,?,?,?,?)",
                (agent, context_id, block.block_id, seq, role, content, int(pinned), kind, block.label),
            )
        return block

    def _block(self, agent: str, context_id: str, block_id: str) -> Block:
        for b in self.blocks(agent, context_id):
            if b.block_id == block_id:
                return b
        raise ContextError("NOT_FOUND", f"context '{context_id}' has no block '{block_id[:32]}'")

    def edit_block(
        self, agent: str, context_id: str, block_id: str, content: str | None = None, pinned: bool | None = None
    ) -> Block:
        b = self._block(agent, context_id, block_id)
        if content is not None:
            if not content.strip() or len(content.encode()) > MAX_BLOCK:
                raise ContextError("INVALID_ARGUMENT", f"block content must be 1 to {MAX_BLOCK} bytes")
            b.content = content
        if pinned is not None:
            b.pinned = pinned
        with self._lock:
            self._db.execute(
                "UPDATE blocks SET content=?, pinned=? WHERE agent_id=? AND context_id=? AND block_id=?",
                (b.content, int(b.pinned), agent, context_id, block_id),
            )
        return b

    def delete_block(self, agent: str, context_id: str, block_id: str) -> Block:
        b = self._block(agent, context_id, block_id)
        with self._lock:
            self._db.execute(
                "DELETE FROM blocks WHERE agent_id=? AND context_id=? AND block_id=?", (agent, context_id, block_id)
            )
        return b

    def evict(self, agent: str, context_id: str, blocks: list[Block]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "DELETE FROM blocks WHERE agent_id=? AND context_id=? AND block_id=?",
                [(agent, context_id, b.block_id) for b in blocks],
            )
            self._db.execute(
                "UPDATE contexts SET evicted = evicted + ? WHERE agent_id=? AND context_id=?",
                (len(blocks), agent, context_id),
            )

    def set_summary(self, agent: str, context_id: str, text: str) -> Block:
        for b in self.blocks(agent, context_id):
            if b.kind == "summary":
                return self.edit_block(agent, context_id, b.block_id, content=text)
        return self.add_block(agent, context_id, "system", text, kind="summary", label="summary")

    def close(self) -> None:
        self._db.close()
