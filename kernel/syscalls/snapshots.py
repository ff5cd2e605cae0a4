"""Where snapshotted generations live (`DATA_DIR/snapshots/ID`), and who may restore one. The folder's
content is the engine's snapshot format (`llm/engine/snapshot.py`)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from kernos.storage.status import StatusError, invalid, not_found

SNAPSHOT_ID = re.compile(r"^[0-9a-f]{32}$")


class SnapshotStore:
    def __init__(self, root: Path):
        self.root = root

    def folder(self, request_id: str) -> Path:
        return self.root / request_id

    def load(self, snapshot_id: str, agent_id: str) -> tuple[Path, dict]:
        """The snapshot's folder and state, if `agent_id` owns it (blocking file I/O: call off the loop)."""
        if not SNAPSHOT_ID.match(snapshot_id):
            raise invalid("snapshot_id must be the 32 hex characters Snapshot returned")
        folder = self.root / snapshot_id
        try:
            state = json.loads((folder / "state.json").read_text())
        except FileNotFoundError:
            raise not_found(f"no snapshot '{snapshot_id}'") from None
        if state["agent_id"] != agent_id:
            raise StatusError("PERMISSION_DENIED", f"snapshot '{snapshot_id}' belongs to another agent")
        return folder, state
