"""The nodes of a cluster. Each `kernos serve` whose config names a cluster database registers itself (its gRPC and
HTTP addresses and the models it serves) and holds a lease by heartbeats in that database; a node whose lease has
expired is dead to the others. An agent's home node is chosen by rendezvous hashing over the live nodes that serve
the model it asks for: the same node every time while the set of nodes stays (its resident KV and programs stay
warm there), and when a node leaves or dies only that node's agents move.

Leases compare the nodes' own clocks: keep them in sync (NTP); the lease (`cluster.lease_s`) is many times the
heartbeat interval and any skew."""
from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field

from kernos.abi.errors import StatusError
from kernos.storage.db import Where, connect, upsert

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, grpc_address TEXT NOT NULL, http_address TEXT NOT NULL, models TEXT NOT NULL,
    state TEXT NOT NULL, started REAL NOT NULL, heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (agent_id TEXT PRIMARY KEY, node_id TEXT NOT NULL);  -- agents moved by hand
CREATE TABLE IF NOT EXISTS secret (id INTEGER PRIMARY KEY, value TEXT NOT NULL);  -- the nodes' shared secret
"""
_COLUMNS = ("node_id", "grpc_address", "http_address", "models", "state", "started", "heartbeat")
STATES = ("up", "draining", "left")   # up: takes agents; draining: hands its agents over; left: stopped cleanly


@dataclass
class Node:
    node_id: str
    grpc_address: str
    http_address: str
    models: list[str] = field(default_factory=list)
    state: str = "up"
    started: float = 0.0
    heartbeat: float = 0.0

    def alive(self, now: float, lease_s: float) -> bool:
        return self.state != "left" and now - self.heartbeat <= lease_s


def _score(node_id: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{node_id}\x00{key}".encode()).digest()[:8], "big")


def rendezvous(nodes: list[Node], key: str) -> Node | None:
    """The node with the highest hash of (node, key): stable while the set stays, moving only a leaver's keys."""
    return max(nodes, key=lambda n: _score(n.node_id, key), default=None)


class Nodes:
    def __init__(self, where: Where, node_id: str, lease_s: float = 10.0):
        self.node_id, self.lease_s = node_id, lease_s
        self._db = connect(where, synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.me: Node | None = None

    def join(self, grpc_address: str, http_address: str, models: list[str]) -> Node:
        now = time.time()
        self.me = Node(self.node_id, grpc_address, http_address, sorted(models), "up", now, now)
        self._save(self.me)
        return self.me

    def beat(self) -> None:
        """Renew the lease (and come back as 'up' if others took this node for dead and it still runs)."""
        if self.me is None:
            return
        with self._lock:
            self.me.heartbeat = time.time()
            row = self._db.execute("UPDATE nodes SET heartbeat=? WHERE node_id=? RETURNING state",
                                   (self.me.heartbeat, self.node_id)).fetchone()
            if row is None:
                self._save(self.me)
            else:
                self.me.state = row[0]

    def leave(self) -> None:
        if self.me is not None:
            self.set_state(self.node_id, "left")

    def set_state(self, node_id: str, state: str) -> Node:
        if state not in STATES:
            raise StatusError("INVALID_ARGUMENT", f"a node's state is one of {list(STATES)}")
        with self._lock:
            row = self._db.execute("UPDATE nodes SET state=? WHERE node_id=? RETURNING node_id", (state, node_id))
            if row.fetchone() is None:
                raise StatusError("NOT_FOUND", f"no node '{node_id[:64]}' in the cluster")
        if self.me is not None and node_id == self.node_id:
            self.me.state = state
        return self.get(node_id)

    def get(self, node_id: str) -> Node:
        for n in self.all():
            if n.node_id == node_id:
                return n
        raise StatusError("NOT_FOUND", f"no node '{node_id[:64]}' in the cluster")

    def all(self) -> list[Node]:
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM nodes ORDER BY node_id").fetchall()
        return [Node(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in rows]

    def live(self) -> list[Node]:
        now = time.time()
        return [n for n in self.all() if n.alive(now, self.lease_s)]

    def pin(self, agent_id: str, node_id: str | None) -> None:
        """Move an agent by hand: its home is `node_id` while that node is alive and up (None: back to the
        rendezvous choice)."""
        with self._lock:
            if node_id is None:
                self._db.execute("DELETE FROM pins WHERE agent_id=?", (agent_id,))
                return
            self.get(node_id)                       # NOT_FOUND for a node the cluster does not know
            self._db.execute(upsert("pins", ("agent_id", "node_id"), ("agent_id",)), (agent_id, node_id))

    def secret(self) -> str:
        """The secret the cluster's nodes share (made by the first node that asks): a forwarded request that
        carries it comes from a node, which has already checked the caller as far as it could."""
        with self._lock:
            self._db.execute("INSERT INTO secret VALUES (1, ?) ON CONFLICT(id) DO NOTHING", (secrets.token_hex(32),))
            return self._db.execute("SELECT value FROM secret WHERE id=1").fetchone()[0]

    def pins(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT agent_id, node_id FROM pins").fetchall())

    def _save(self, n: Node) -> None:
        with self._lock:
            self._db.execute(upsert("nodes", _COLUMNS, ("node_id",)),
                             (n.node_id, n.grpc_address, n.http_address, json.dumps(n.models), n.state, n.started,
                              n.heartbeat))

    def close(self) -> None:
        self._db.close()
