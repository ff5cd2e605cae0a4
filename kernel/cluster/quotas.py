"""A group's quota held across a cluster's nodes. An agent's own limits are enforced where its calls run, on its
home node; a group's members live on several nodes, so its budget is counted in the database: requests in
100 ms slots over the last second, tokens in 1 s slots over the last minute, running generations per node
(a dead node's count drops out with its lease).

Each check adds first, then reads the total, and takes its share back if that went over: two nodes at the limit
at once may both refuse, never both pass, so a group never gets more than its budget."""
from __future__ import annotations

import math
import time

from kernos.abi.errors import StatusError
from kernos.storage.db import Where, connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    subject TEXT NOT NULL, kind TEXT NOT NULL, slot INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (subject, kind, slot)
);
CREATE TABLE IF NOT EXISTS running (
    subject TEXT NOT NULL, node TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (subject, node)
);
"""
# kind -> (slots a second, slots in the window)
WINDOWS = {"req": (10, 10), "tok": (1, 60)}


def _exceeded(message: str, retry_after_s: float) -> StatusError:
    return StatusError("RESOURCE_EXHAUSTED", message, max(0.0, retry_after_s))


class SharedQuotas:
    def __init__(self, where: Where, node_id: str, alive_nodes):
        """`alive_nodes()`: the ids of the nodes whose lease is current (their running generations count)."""
        self.node_id, self.alive_nodes = node_id, alive_nodes
        self._db = connect(where, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._db.execute("DELETE FROM running WHERE node=?", (node_id,))     # this node starts with none
        self._pruned = 0.0

    def _add(self, subject: str, kind: str, n: int, now: float) -> int:
        """Add n to the current slot; the window's total after it."""
        per_s, slots = WINDOWS[kind]
        slot = math.floor(now * per_s)
        self._db.execute("INSERT INTO usage VALUES (?,?,?,?) ON CONFLICT(subject, kind, slot) DO UPDATE "
                         "SET n = usage.n + excluded.n", (subject, kind, slot, n))
        if now - self._pruned > 60:
            self._pruned = now
            for k, (rate, _) in WINDOWS.items():
                self._db.execute("DELETE FROM usage WHERE kind=? AND slot < ?", (k, math.floor((now - 120) * rate)))
        return int(self._db.execute("SELECT COALESCE(SUM(n), 0) FROM usage WHERE subject=? AND kind=? AND slot > ?",
                                    (subject, kind, slot - slots)).fetchone()[0])

    def _oldest_wait(self, subject: str, kind: str, now: float) -> float:
        per_s, slots = WINDOWS[kind]
        first = self._db.execute("SELECT MIN(slot) FROM usage WHERE subject=? AND kind=? AND slot > ? AND n > 0",
                                 (subject, kind, math.floor(now * per_s) - slots)).fetchone()[0]
        return (first + slots) / per_s - now if first is not None else slots / per_s

    def request(self, subject: str, who: str, limit: float) -> None:
        now = time.time()
        if self._add(subject, "req", 1, now) > limit:
            self._add(subject, "req", -1, now)
            raise _exceeded(f"{who} is over its {limit:g} requests per second (across the cluster)",
                            self._oldest_wait(subject, "req", now))

    def _running(self, subject: str) -> int:
        alive = list(self.alive_nodes()) or [self.node_id]
        rows = self._db.execute("SELECT node, n FROM running WHERE subject=?", (subject,)).fetchall()
        return sum(n for node, n in rows if node in alive)

    def _change_running(self, subject: str, delta: int) -> None:
        self._db.execute("INSERT INTO running VALUES (?,?,?) ON CONFLICT(subject, node) DO UPDATE "
                         "SET n = running.n + excluded.n", (subject, self.node_id, delta))

    def start_generation(self, subject: str, who: str, concurrent: int, tokens_per_minute: int, prompt_tokens: int,
                         refuse: bool) -> None:
        now = time.time()
        self._change_running(subject, 1)
        if refuse and concurrent and self._running(subject) > concurrent:
            self._change_running(subject, -1)
            raise _exceeded(f"{who} already runs {concurrent} generations across the cluster (its limit)", 1.0)
        if tokens_per_minute:
            total = self._add(subject, "tok", prompt_tokens, now)
            if refuse and total > tokens_per_minute:
                self._add(subject, "tok", -prompt_tokens, now)
                self._change_running(subject, -1)
                raise _exceeded(f"{who} used {total - prompt_tokens} of its {tokens_per_minute} tokens per minute "
                                f"across the cluster; this prompt needs {prompt_tokens}",
                                self._oldest_wait(subject, "tok", now))

    def end_generation(self, subject: str, tokens_per_minute: int, completion_tokens: int) -> None:
        self._change_running(subject, -1)
        if tokens_per_minute and completion_tokens:
            self._add(subject, "tok", completion_tokens, time.time())

    def usage(self, subject: str) -> dict:
        now = time.time()
        out = {}
        for kind, name in (("req", "requests_last_second"), ("tok", "tokens_last_minute")):
            per_s, slots = WINDOWS[kind]
            out[name] = int(self._db.execute(
                "SELECT COALESCE(SUM(n), 0) FROM usage WHERE subject=? AND kind=? AND slot > ?",
                (subject, kind, math.floor(now * per_s) - slots)).fetchone()[0])
        out["running"] = self._running(subject)
        return out

    def close(self) -> None:
        self._db.close()
