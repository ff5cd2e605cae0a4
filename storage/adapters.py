"""The adapter store: published LoRA adapters, versioned per owner and name, and each agent's default
adapter per model.

An adapter version is a folder `ROOT/OWNER/NAME/vN` (peft's `adapter_config.json` +
`adapter_model.safetensors`), copied in under a temporary name, every file and the folder fsynced, then
renamed; its row is committed after that, so a crash leaves either a whole version or none (at most an
orphan folder). Served name of a published adapter: `OWNER:NAME` (the latest version).

In a cluster (`db` a PostgreSQL schema, `blobs` the S3 store) the registry is shared and a version's files are
also stored as content-addressed blobs before its row is committed; the row lists them (`files`), and a node
that lacks the folder fetches it (`local()`) before it serves the version. `changed()` tells a node that another
published a version or changed a default."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kernos.abi.errors import StatusError

from .blobs import get_tree, put_tree
from .db import Where, connect, upsert
from .durable import fsync_dir, fsync_tree

NAME_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    owner TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, model TEXT NOT NULL,
    path TEXT NOT NULL, metrics TEXT NOT NULL, job_id TEXT NOT NULL, created REAL NOT NULL,
    files TEXT NOT NULL DEFAULT '{}',   -- relative path -> sha256 of each file, in the blob store (a cluster)
    PRIMARY KEY (owner, name, version)
);
CREATE TABLE IF NOT EXISTS defaults (
    agent_id TEXT NOT NULL, model TEXT NOT NULL, adapter TEXT NOT NULL, PRIMARY KEY (agent_id, model)
);
"""


@dataclass
class AdapterVersion:
    owner: str
    name: str
    version: int
    model: str
    path: Path
    metrics: dict
    job_id: str
    created: float
    files: dict = None

    @property
    def served_name(self) -> str:
        return f"{self.owner}:{self.name}"


class AdapterStore:
    def __init__(self, root: Path, db: Where | None = None, blobs=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = blobs
        self._db = connect(db or self.root / "adapters.db", synchronous="FULL")
        self._db.executescript(_SCHEMA)
        if "files" not in self._db.columns("adapters"):      # a data dir of an older kernel
            self._db.execute("ALTER TABLE adapters ADD COLUMN files TEXT NOT NULL DEFAULT '{}'")
        self._lock = threading.Lock()
        self._version = self._db.data_version("adapters", "defaults")
        # Read on every generation that names no adapter: kept in memory, written through to SQLite.
        self._defaults = {(a, m): name for a, m, name in
                          self._db.execute("SELECT agent_id, model, adapter FROM defaults")}

    def publish(self, owner: str, name: str, model: str, src: Path, metrics: dict, job_id: str = "") -> AdapterVersion:
        if not NAME_RE.match(name):
            raise StatusError("INVALID_ARGUMENT", "adapter names are 1-64 characters of a-z, 0-9, '_', '.', '-'")
        src = Path(src)
        if not (src / "adapter_config.json").exists():
            raise StatusError("FAILED_PRECONDITION", f"{src} is not a peft adapter folder (no adapter_config.json)")
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(version) FROM adapters WHERE owner=? AND name=?", (owner, name)
            ).fetchone()
            version = (row[0] or 0) + 1
            home = self.root / owner / name
            home.mkdir(parents=True, exist_ok=True)
            final, tmp = home / f"v{version}", home / f".v{version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # an orphan of a crash before its row was committed
            shutil.copytree(src, tmp)
            fsync_tree(tmp)
            tmp.rename(final)
            fsync_dir(home)
            # the other nodes fetch it from the object store
            files = put_tree(self.blobs, final) if self.blobs is not None else {}
            created = time.time()
            with self._db:
                self._db.execute(
                    "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?)",
                    (owner, name, version, model, f"{owner}/{name}/v{version}", json.dumps(metrics), job_id,
                     created, json.dumps(files)),
                )
        return AdapterVersion(owner, name, version, model, final, metrics, job_id, created, files)

    def _row(self, r) -> AdapterVersion:
        path = Path(r[4])                       # relative to the root (older kernels wrote it absolute)
        return AdapterVersion(r[0], r[1], r[2], r[3], path if path.is_absolute() else self.root / path,
                              json.loads(r[5]), r[6], r[7], json.loads(r[8] or "{}"))

    def local(self, v: AdapterVersion) -> Path:
        """The version's folder on this node, fetched from the blob store (checked) if another node published it."""
        if (v.path / "adapter_config.json").exists() or not v.files or self.blobs is None:
            return v.path
        tmp = v.path.with_name(f".{v.path.name}.fetch")
        shutil.rmtree(tmp, ignore_errors=True)
        get_tree(self.blobs, v.files, tmp, f"adapter {v.owner}:{v.name} v{v.version}")
        fsync_tree(tmp)
        shutil.rmtree(v.path, ignore_errors=True)
        tmp.rename(v.path)
        return v.path

    def changed(self) -> bool:
        """Whether anyone (another node) published a version or changed a default since the last look; the
        defaults are reloaded if so."""
        version = self._db.data_version("adapters", "defaults")
        if version == self._version:
            return False
        self._version = version
        with self._lock:
            self._defaults = {(a, m): name for a, m, name in
                              self._db.execute("SELECT agent_id, model, adapter FROM defaults")}
        return True

    def versions(self, owner: str | None = None) -> list[AdapterVersion]:
        q = ("SELECT owner, name, version, model, path, metrics, job_id, created, files FROM adapters"
             + (" WHERE owner=?" if owner else "") + " ORDER BY owner, name, version")
        with self._lock:
            return [self._row(r) for r in self._db.execute(q, (owner,) if owner else ())]

    def latest(self) -> list[AdapterVersion]:
        """The newest version of every adapter: what the kernel serves."""
        newest: dict[tuple[str, str], AdapterVersion] = {}
        for v in self.versions():
            newest[(v.owner, v.name)] = v
        return list(newest.values())

    def set_default(self, agent_id: str, model: str, adapter: str) -> None:
        with self._lock, self._db:
            if adapter:
                self._db.execute(upsert("defaults", ("agent_id", "model", "adapter"), ("agent_id", "model")),
                                 (agent_id, model, adapter))
                self._defaults[(agent_id, model)] = adapter
            else:
                self._db.execute("DELETE FROM defaults WHERE agent_id=? AND model=?", (agent_id, model))
                self._defaults.pop((agent_id, model), None)

    def default(self, agent_id: str, model: str) -> str | None:
        return self._defaults.get((agent_id, model))

    def close(self) -> None:
        self._db.close()
