"""Fine-tuning jobs in a cluster: a job's folder (its data, settings and last whole checkpoint) is kept in the object
store as it goes, listed in the job's row with the node that runs it, so that when that node dies another claims
the job, fetches the folder and resumes from the checkpoint.

What is uploaded is always a whole checkpoint: the loop's `checkpoint/` is read twice around the upload and kept
only if its step did not move meanwhile; TRL's `checkpoint-N/` folders only once marked complete. Logs, locks and
folders being written are never uploaded."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from kernos.storage.blobs import get_tree

SKIP = ("worker.log", "lock", "cancel")


def _step(d: Path) -> int | None:
    try:
        return json.loads((d / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def _wanted(rel: Path) -> bool:
    parts = rel.parts
    if rel.name in SKIP or any(p.endswith((".tmp", ".old", ".fetch")) for p in parts):
        return False
    return True


class SharedJobs:
    def __init__(self, blobs, node_id: str, alive_nodes):
        """`alive_nodes()`: ids of the nodes whose lease is current (a job on any other node is orphaned)."""
        self.blobs, self.node_id, self.alive_nodes = blobs, node_id, alive_nodes
        self._sent: dict[str, dict[str, tuple[float, int, str]]] = {}   # job -> rel path -> (mtime, size, digest)
        self._lock = threading.Lock()

    def _read(self, d: Path, sent: dict) -> dict[str, tuple] | None:
        """Every wanted file's (stat key, bytes or a known digest), read quickly into memory; None if the loop's
        checkpoint was replaced meanwhile."""
        before = _step(d)
        complete = {p.parent for p in d.rglob("kernos-complete")}
        out: dict[str, tuple] = {}
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            rel = f.relative_to(d)
            if not _wanted(rel) or (rel.parts[0].startswith("checkpoint-") and d / rel.parts[0] not in complete):
                continue                                       # (a TRL checkpoint not yet whole)
            try:
                st = f.stat()
                key = (st.st_mtime, st.st_size)
                known = sent.get(str(rel))
                out[str(rel)] = (key, None, known[2]) if known and known[:2] == key else (key, f.read_bytes(), "")
            except FileNotFoundError:                          # replaced under us
                return None
        return out if _step(d) == before else None

    def upload(self, job_id: str, d: Path) -> dict[str, str] | None:
        """The job folder's manifest (relative path -> sha256) after storing what changed; None if a checkpoint
        was being replaced each time it was read (try again later). The files are read into memory first (a
        checkpoint is replaced every few steps; storing takes longer than reading), then stored."""
        with self._lock:
            sent = self._sent.setdefault(job_id, {})
            for _ in range(5):
                files = self._read(d, sent)
                if files is not None:
                    break
            else:
                return None
            manifest: dict[str, str] = {}
            for rel, (key, data, digest) in files.items():
                if data is not None:
                    digest = hashlib.sha256(data).hexdigest()
                    self.blobs.put(digest, data)
                    sent[rel] = (*key, digest)
                manifest[rel] = digest
        return manifest

    def fetch(self, manifest: dict[str, str], d: Path) -> None:
        """Bring a claimed job's folder here (every file checked against its digest)."""
        get_tree(self.blobs, manifest, d, "the job's folder")

    def orphaned(self, node: str) -> bool:
        return node != self.node_id and node not in set(self.alive_nodes())
