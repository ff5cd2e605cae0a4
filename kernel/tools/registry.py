"""Registered tools, kept: every tool agents and operators registered (not the built-ins, not a mounted MCP
server's tools, which the kernel makes again at each start), in a store of their own (`tools.db`; the cluster's
database in a cluster). A registered tool is acknowledged like a written file: it outlives the kernel process that
took it (a restart) and every node of a cluster serves it (an agent's home node moves when a node dies or
drains, and the agent's tools must be there when it arrives).

Two registrations of one public name from different owners, on two nodes at once: the row's key decides, and the
one that did not get it is refused, as it would be on one machine."""
from __future__ import annotations

import json
import threading
import time

from kernos.storage.db import Where, connect

from .spec import Tool

_SCHEMA = """CREATE TABLE IF NOT EXISTS tools (key TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL,
                                             created REAL NOT NULL);"""
_FIELDS = ("name", "description", "schema", "owner", "code", "irreversible", "timeout_s", "max_concurrency",
           "cpu_s", "memory_mb", "public")


def spec_of(tool: Tool) -> str:
    """A registered tool as its row holds it (JSON of what its registration decided)."""
    return json.dumps({f: getattr(tool, f) for f in _FIELDS}, sort_keys=True)


class ToolStore:
    def __init__(self, where: Where):
        self._db = connect(where)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._version = None

    def put(self, tool: Tool, replaces: str = "") -> bool:
        """Store `tool` under its key, in place of its owner's other version (`replaces`: its key as a private tool
        when it is now public, or the reverse). False when the key is another owner's (a public name taken)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            if replaces:
                self._db.execute("DELETE FROM tools WHERE key=? AND owner=?", (replaces, tool.owner))
            row = self._db.execute(
                "INSERT INTO tools VALUES (?,?,?,?) ON CONFLICT(key) DO UPDATE SET spec=excluded.spec, "
                "created=excluded.created WHERE tools.owner=excluded.owner RETURNING key",
                (tool.key, tool.owner, spec_of(tool), time.time())).fetchone()
            if row is None:
                self._db.execute("ROLLBACK")
            return row is not None

    def delete(self, key: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM tools WHERE key=? RETURNING key", (key,)).fetchone() is not None

    def changed(self) -> bool:
        """Whether the table changed (here or on another node) since the last look."""
        with self._lock:
            version = self._db.data_version("tools")
            if version == self._version:
                return False
            self._version = version
            return True

    def load(self) -> list[Tool]:
        with self._lock:
            rows = self._db.execute("SELECT spec FROM tools ORDER BY created").fetchall()
        return [Tool(**json.loads(spec)) for (spec,) in rows]

    def close(self) -> None:
        self._db.close()
