"""Where snapshotted generations live (`DATA_DIR/snapshots/ID`), and who may restore one. The folder's
content is the engine's snapshot format (`llm/engine/snapshot.py`).

In a cluster (`db` and `blobs` given) a snapshot is also shared: its files stored as checked blobs and a row
naming them and its owner, so that any node can restore it (a drained node's generations continue on their
agents' new homes); a node fetches the folder when it does not have it."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from kernos.abi.errors import StatusError, invalid, not_found
from kernos.storage.blobs import get_tree, put_tree
from kernos.storage.db import Where, connect, upsert

SNAPSHOT_ID = re.compile(r"^[0-9a-f]{32}$")


class SnapshotStore:
    """Snapshots are bounded: at most `per_agent` an agent (RESOURCE_EXHAUSTED beyond: restore or let one
    expire), each kept `ttl_s` after it was taken (a snapshot of the embedded model is tens of MiB; they were
    kept forever, without a cap)."""

    def __init__(self, root: Path, per_agent: int = 0, ttl_s: float = 0, db: Where | None = None, blobs=None):
        self.root = root
        self.per_agent = per_agent
        self.ttl_s = ttl_s
        self.blobs = blobs
        self._db = connect(db) if db is not None and blobs is not None else None
        if self._db is not None:
            self._db.executescript("CREATE TABLE IF NOT EXISTS snapshots (snapshot_id TEXT PRIMARY KEY, "
                                   "agent_id TEXT NOT NULL, files TEXT NOT NULL, created REAL NOT NULL);")

    def share(self, snapshot_id: str, agent_id: str) -> None:
        """Store a snapshot where every node finds it (a cluster; nothing on one machine). Blocking."""
        if self._db is None:
            return
        files = put_tree(self.blobs, self.root / snapshot_id)
        self._db.execute(upsert("snapshots", ("snapshot_id", "agent_id", "files", "created"), ("snapshot_id",)),
                         (snapshot_id, agent_id, json.dumps(files), time.time()))

    def _fetch(self, snapshot_id: str) -> None:
        """Bring a shared snapshot's folder to this node, checked (nothing if it is not shared)."""
        row = self._db.execute("SELECT files FROM snapshots WHERE snapshot_id=?", (snapshot_id,)).fetchone() \
            if self._db is not None else None
        if row is None:
            return
        folder = self.root / snapshot_id
        tmp = self.root / f".{snapshot_id}.fetch"
        shutil.rmtree(tmp, ignore_errors=True)
        get_tree(self.blobs, json.loads(row[0]), tmp, f"snapshot '{snapshot_id}'")
        tmp.rename(folder)

    def consume(self, snapshot_id: str) -> None:
        """A restored generation finished: its snapshot is gone, here and from the cluster."""
        shutil.rmtree(self.root / snapshot_id, ignore_errors=True)
        if self._db is not None:
            self._db.execute("DELETE FROM snapshots WHERE snapshot_id=?", (snapshot_id,))

    def folder(self, request_id: str) -> Path:
        return self.root / request_id

    def owned(self, agent_id: str) -> list[Path]:
        """The agent's snapshots (after dropping expired ones of anyone's). Blocking: call off the loop."""
        out, now = [], time.time()
        for folder in self.root.glob("*/"):
            try:
                state = folder / "state.json"
                if self.ttl_s and now - state.stat().st_mtime > self.ttl_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                if json.loads(state.read_text()).get("agent_id") == agent_id:
                    out.append(folder)
            except (OSError, ValueError):
                continue                 # being written or removed
        return out

    def check_room(self, agent_id: str) -> None:
        if self.per_agent and len(self.owned(agent_id)) >= self.per_agent:
            raise StatusError("RESOURCE_EXHAUSTED", f"'{agent_id}' holds {self.per_agent} snapshots, its limit "
                                                    "(limits.max_snapshots_per_agent): restore one first",
                              max(1.0, self.ttl_s / 10))

    def load(self, snapshot_id: str, agent_id: str) -> tuple[Path, dict]:
        """The snapshot's folder and state, if `agent_id` owns it (blocking file I/O: call off the loop)."""
        if not SNAPSHOT_ID.match(snapshot_id):
            raise invalid("snapshot_id must be the 32 hex characters Snapshot returned")
        folder = self.root / snapshot_id
        if not folder.exists():
            self._fetch(snapshot_id)
        try:
            state = json.loads((folder / "state.json").read_text())
        except FileNotFoundError:
            raise not_found(f"no snapshot '{snapshot_id}'") from None
        if state["agent_id"] != agent_id:
            raise StatusError("PERMISSION_DENIED", f"snapshot '{snapshot_id}' belongs to another agent")
        return folder, state
