"""Per-agent versioned file store.

Contents are content-addressed blobs (`blobs.py`: a folder, `blobs/ab/abcdef...`, or an S3 bucket); metadata is
SQLite in WAL mode with full sync, or a PostgreSQL schema in a cluster (`db.py`). A write is acknowledged only after
its blob is durable and its version row committed, so a crash at any moment leaves every acknowledged
version readable and no torn file (an unacknowledged write leaves at most an orphan blob).

Every write creates a version; delete writes a tombstone version; rollback writes a new version with
an old version's content. Paths are normalised and confined to the agent's own space.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kernos.abi.errors import StatusError

from .blobs import LocalBlobs, S3Blobs
from .db import Where, conflict_errors, connect

MAX_PATH = 1024
MAX_COMPONENT = 255

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    agent_id TEXT NOT NULL,
    path TEXT NOT NULL,
    version INTEGER NOT NULL,
    blob TEXT,                 -- sha256 of the content; NULL for a tombstone
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (agent_id, path, version)
);
CREATE INDEX IF NOT EXISTS versions_by_agent ON versions(agent_id, path);
CREATE TABLE IF NOT EXISTS indexed (      -- files whose text is in the agent's vector memory
    agent_id TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY (agent_id, path)
);
"""


class StorageError(StatusError):
    pass


def normalize_path(path: str) -> str:
    """'a//b/./c' -> 'a/b/c'. Absolute paths, '..', NUL bytes, empty and over-long names are refused."""
    if not path or not path.strip():
        raise StorageError("INVALID_ARGUMENT", "path is empty")
    if "\x00" in path:
        raise StorageError("INVALID_ARGUMENT", "path contains a NUL byte")
    if len(path.encode()) > MAX_PATH:
        raise StorageError("INVALID_ARGUMENT", f"path is longer than {MAX_PATH} bytes")
    if path.startswith("/") or path.startswith("\\") or (len(path) > 1 and path[1] == ":"):
        raise StorageError("INVALID_ARGUMENT", f"path must be relative to the agent's space, got '{path[:64]}'")
    if "\\" in path:
        raise StorageError("INVALID_ARGUMENT", "use '/' to separate path components")
    parts = [p for p in PurePosixPath(path).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError("INVALID_ARGUMENT", "path may not contain '..'")
    if not parts:
        raise StorageError("INVALID_ARGUMENT", "path names no file")
    if any(len(p.encode()) > MAX_COMPONENT for p in parts):
        raise StorageError("INVALID_ARGUMENT", f"a path component is longer than {MAX_COMPONENT} bytes")
    return "/".join(parts)


@dataclass
class FileVersion:
    path: str
    version: int
    size: int
    sha256: str
    created: float
    deleted: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


MAX_METADATA_KEYS, MAX_METADATA_BYTES = 64, 16 << 10


def check_metadata(metadata: dict) -> None:
    """A version's metadata is small and counts against the quota: 0-byte files with 12 MiB of metadata each
    took 60 MiB of disk counted as 0, and made their owner's own List too large for gRPC."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise StorageError("INVALID_ARGUMENT", f"metadata has {len(metadata)} keys; the limit is {MAX_METADATA_KEYS}")
    size = len(json.dumps(metadata))
    if size > MAX_METADATA_BYTES:
        raise StorageError("INVALID_ARGUMENT", f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")


class FileStore:
    """`db` and `blobs` default to SQLite and a folder under `root`; a cluster passes its PostgreSQL schema and
    its S3 bucket (`S3Blobs`)."""

    def __init__(self, root: Path, quota_bytes: int = 0, max_file_bytes: int = 16 << 20, db: Where | None = None,
                 blobs: LocalBlobs | S3Blobs | None = None):
        self.root = root
        self.blobs = blobs or LocalBlobs(root / "blobs")
        self.quota_bytes = quota_bytes
        self.max_file_bytes = max_file_bytes
        self._db = connect(db or root / "files.db", synchronous="FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    # -- blobs ---------------------------------------------------------------------------------------
    def _put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs.put(digest, data)
        return digest

    def _get_blob(self, digest: str) -> bytes:
        data = self.blobs.get(digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise StorageError("DATA_LOSS", f"blob {digest[:12]} is corrupt")
        return data

    # -- queries ---------------------------------------------------------------------------------------
    @staticmethod
    def _row(r) -> FileVersion:
        path, version, blob, size, created, metadata = r
        return FileVersion(path, version, size, blob or "", created, blob is None, json.loads(metadata))

    def _latest(self, agent: str, path: str) -> FileVersion | None:
        r = self._db.execute(
            "SELECT path, version, blob, size, created, metadata FROM versions WHERE agent_id=? "
            "AND path=? ORDER BY version DESC LIMIT 1",
            (agent, path),
        ).fetchone()
        return self._row(r) if r else None

    def usage(self, agent: str) -> int:
        """Bytes the agent holds: every version's content and metadata."""
        return int(self._db.execute("SELECT COALESCE(SUM(size + LENGTH(metadata)), 0) FROM versions "
                                    "WHERE agent_id=?", (agent,)).fetchone()[0])

    def usage_of(self, agents: list[str]) -> int:
        """Bytes several agents hold together (a group's storage quota)."""
        total = 0
        for i in range(0, len(agents), 500):
            part = agents[i:i + 500]
            total += int(self._db.execute(
                f"SELECT COALESCE(SUM(size + LENGTH(metadata)), 0) FROM versions WHERE agent_id IN "
                f"({','.join('?' * len(part))})", part).fetchone()[0])
        return total

    def _append(self, agent: str, path: str, blob: str | None, size: int, metadata: dict) -> FileVersion:
        with self._lock:
            need = size + len(json.dumps(metadata)) if blob is not None else 0
            if need and self.quota_bytes and self.usage(agent) + need > self.quota_bytes:
                raise StorageError(
                    "RESOURCE_EXHAUSTED",
                    f"storage quota: {self.usage(agent)} of {self.quota_bytes} bytes used "
                    f"(versions count); this write needs {need} more",
                )
            for attempt in range(8):   # another node may take the same next version: the key refuses one of us
                latest = self._latest(agent, path)
                version = (latest.version if latest else 0) + 1
                now = time.time()
                try:
                    self._db.execute(
                        "INSERT INTO versions(agent_id, path, version, blob, size, created, metadata) "
                        "VALUES (?,?,?,?,?,?,?)", (agent, path, version, blob, size, now, json.dumps(metadata)))
                except conflict_errors():
                    if attempt == 7:
                        raise StorageError("ABORTED", f"'{path}' is being written concurrently; retry") from None
                    continue
                return FileVersion(path, version, size, blob or "", now, blob is None, metadata)

    # -- the file operations ---------------------------------------------------------------------------
    def write(self, agent: str, path: str, data: bytes, metadata: dict[str, str] | None = None) -> FileVersion:
        path = normalize_path(path)
        if len(data) > self.max_file_bytes:
            raise StorageError("RESOURCE_EXHAUSTED", f"file is {len(data)} bytes; the limit is {self.max_file_bytes}")
        check_metadata(metadata or {})
        need = len(data) + len(json.dumps(dict(metadata or {})))
        if self.quota_bytes and self.usage(agent) + need > self.quota_bytes:  # before touching the disk
            raise StorageError(
                "RESOURCE_EXHAUSTED",
                f"storage quota: {self.usage(agent)} of {self.quota_bytes} bytes used; "
                f"this write needs {need} more",
            )
        digest = self._put_blob(data)
        return self._append(agent, path, digest, len(data), dict(metadata or {}))

    def stat(self, agent: str, path: str, version: int = 0) -> FileVersion:
        path = normalize_path(path)
        if version:
            r = self._db.execute(
                "SELECT path, version, blob, size, created, metadata FROM versions WHERE agent_id=? "
                "AND path=? AND version=?",
                (agent, path, version),
            ).fetchone()
            if r is None:
                raise StorageError("NOT_FOUND", f"'{path}' has no version {version}")
            return self._row(r)
        latest = self._latest(agent, path)
        if latest is None or latest.deleted:
            raise StorageError("NOT_FOUND", f"no file '{path}'")
        return latest

    def read(self, agent: str, path: str, version: int = 0) -> tuple[FileVersion, bytes]:
        info = self.stat(agent, path, version)
        if info.deleted:
            raise StorageError("NOT_FOUND", f"version {info.version} of '{info.path}' is a deletion")
        return info, self._get_blob(info.sha256)

    def list(self, agent: str, prefix: str = "") -> list[FileVersion]:
        if prefix:
            prefix = normalize_path(prefix)
        rows = self._db.execute(
            "SELECT v.path, v.version, v.blob, v.size, v.created, v.metadata FROM versions v JOIN "
            "(SELECT path, MAX(version) AS version FROM versions WHERE agent_id=? GROUP BY path) m "
            "ON v.path = m.path AND v.version = m.version WHERE v.agent_id=? ORDER BY v.path",
            (agent, agent),
        )
        out = [self._row(r) for r in rows]
        return [f for f in out if not f.deleted and (not prefix or f.path == prefix or f.path.startswith(prefix + "/"))]

    def delete(self, agent: str, path: str) -> FileVersion:
        self.stat(agent, path)  # NOT_FOUND unless it exists
        return self._append(agent, normalize_path(path), None, 0, {})

    def history(self, agent: str, path: str) -> list[FileVersion]:
        path = normalize_path(path)
        rows = self._db.execute(
            "SELECT path, version, blob, size, created, metadata FROM versions WHERE agent_id=? "
            "AND path=? ORDER BY version",
            (agent, path),
        ).fetchall()
        if not rows:
            raise StorageError("NOT_FOUND", f"no file '{path}'")
        return [self._row(r) for r in rows]

    def rollback(self, agent: str, path: str, version: int) -> FileVersion:
        old = self.stat(agent, path, version)
        if old.deleted:
            raise StorageError("INVALID_ARGUMENT", f"version {version} of '{old.path}' is a deletion")
        return self._append(agent, old.path, old.sha256, old.size, dict(old.metadata, rolled_back_from=str(version)))

    def is_indexed(self, agent: str, path: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM indexed WHERE agent_id=? AND path=?", (agent, path)).fetchone() is not None
        )

    def set_indexed(self, agent: str, path: str, indexed: bool) -> None:
        with self._lock:
            if indexed:
                self._db.execute("INSERT INTO indexed VALUES (?, ?) ON CONFLICT DO NOTHING", (agent, path))
            else:
                self._db.execute("DELETE FROM indexed WHERE agent_id=? AND path=?", (agent, path))

    def close(self) -> None:
        self._db.close()
