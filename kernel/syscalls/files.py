"""The storage syscalls: an agent's versioned files (or another agent's, past the gate's grant check), and
their passages in the agent's vector memory when a file is written with `index=True`. Every store call
runs off the event loop (fsync takes milliseconds)."""

from __future__ import annotations

import asyncio
import difflib

from kernos.abi.errors import exhausted, invalid
from kernos.storage.files import FileStore, FileVersion

from .pools import FairPool

MAX_DIFF_BYTES = 1 << 20

CHUNK_CHARS = 800
CHUNK_OVERLAP = 100


def chunks(text: str) -> list[str]:
    """Overlapping passages of a file's text, for embedding."""
    step = CHUNK_CHARS - CHUNK_OVERLAP
    return [
        text[i : i + CHUNK_CHARS]
        for i in range(0, max(len(text) - CHUNK_OVERLAP, 1), step)
        if text[i : i + CHUNK_CHARS].strip()
    ]


class Files:
    def __init__(self, files: FileStore, memory, pool: FairPool, max_indexed_bytes: int = 1 << 20,
                 group_bytes: dict[str, int] | None = None, access=None):
        self.files = files
        self.group_bytes = {g: n for g, n in (group_bytes or {}).items() if n}   # [quotas.groups.G] storage_bytes
        self.access = access          # groups_of and groups(): whose bytes count together
        self.memory = memory  # () -> the long-term vector memory
        self.pool = pool      # storage's own threads, shared fairly between agents
        self.max_indexed_bytes = max_indexed_bytes

    def _run(self, principal, fn, *args):
        return self.pool.run(principal.agent_id, fn, *args)

    @staticmethod
    def space(principal, owner: str) -> str:
        """Whose files: the caller's, or `owner`'s (another agent's space passed the gate's grant check)."""
        return owner or principal.agent_id

    def _index(self, space: str, f: FileVersion, text: str | None) -> None:
        """Replace the file's passages in the space's vector memory (text None: just drop them)."""
        memory = self.memory()
        memory.delete_where(space, {"kind": "file", "path": f.path})
        parts = chunks(text) if text else []
        if parts:
            memory.add(space, parts, [{"kind": "file", "path": f.path, "version": str(f.version)} for _ in parts])
        self.files.set_indexed(space, f.path, bool(parts))

    def _check_groups(self, space: str, size: int) -> None:
        """A group's storage quota: what its members hold together (1,000 AIOS names once had 1 GiB each)."""
        capped = [g for g in self.access.groups_of(space) if g in self.group_bytes] if self.group_bytes else []
        if not capped:
            return
        members = self.access.groups()
        for g in capped:
            used = self.files.usage_of(list(members.get(g, [])))
            if used + size > self.group_bytes[g]:
                raise exhausted(f"group '{g}' holds {used} of its {self.group_bytes[g]} bytes of files "
                                f"([quotas.groups.{g}] storage_bytes); this write needs {size} more")

    def _reindex(self, space: str, f: FileVersion) -> None:
        """After a delete or rollback: an indexed file's passages follow its current content."""
        if self.files.is_indexed(space, f.path):
            text = None if f.deleted else self.files.read(space, f.path)[1].decode("utf-8", "replace")
            self._index(space, f, text)

    async def write(
        self, principal, path: str, data: bytes, metadata: dict, index: bool, owner: str = ""
    ) -> FileVersion:
        space = self.space(principal, owner)
        text = None
        if index:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid("index=true needs UTF-8 text content") from None
            if len(data) > self.max_indexed_bytes:     # checked before anything is written
                raise invalid(f"index=true takes files up to {self.max_indexed_bytes} bytes "
                              f"(storage.max_indexed_bytes); this one is {len(data)}: write it without index")

        def do():
            self._check_groups(space, len(data))
            f = self.files.write(space, path, data, metadata)
            if index:
                self._index(space, f, text)
            elif self.files.is_indexed(space, f.path):
                self._index(space, f, None)  # stale passages must go
            return f

        return await self._run(principal, do)

    async def search(self, principal, query: str, k: int = 5, owner: str = "") -> list:
        """One hit per file (its best passage): [(path, version, passage, distance)]."""
        k = k or 5
        if not 1 <= k <= 50:
            raise invalid("k must be between 1 and 50")
        space = self.space(principal, owner)
        hits = await self._run(principal, lambda: self.memory().search(space, query, min(100, 4 * k), {"kind": "file"}))
        best: dict[str, object] = {}
        for h in hits:
            best.setdefault(h.metadata["path"], h)
        return [(p, int(h.metadata["version"]), h.text, h.distance) for p, h in list(best.items())[:k]]

    async def read(self, principal, path: str, version: int = 0, owner: str = "") -> tuple[FileVersion, bytes]:
        return await self._run(principal, self.files.read, self.space(principal, owner), path, version)

    async def stat(self, principal, path: str, version: int = 0, owner: str = "") -> FileVersion:
        return await self._run(principal, self.files.stat, self.space(principal, owner), path, version)

    async def list(self, principal, prefix: str = "", owner: str = "") -> list[FileVersion]:
        return await self._run(principal, self.files.list, self.space(principal, owner), prefix)

    async def history(self, principal, path: str, owner: str = "") -> list[FileVersion]:
        return await self._run(principal, self.files.history, self.space(principal, owner), path)

    async def diff(self, principal, path: str, a: int, b: int, owner: str = "") -> dict:
        """Version `a` of a file against version `b`: a unified diff of their text (at most 5,000 lines), or
        `binary` where either is over MAX_DIFF_BYTES or holds a NUL byte."""
        (fa, da), (fb, db) = await asyncio.gather(self.read(principal, path, a, owner),
                                                  self.read(principal, path, b, owner))
        same = fa.sha256 == fb.sha256
        if max(len(da), len(db)) > MAX_DIFF_BYTES or b"\0" in da[:8192] + db[:8192]:
            return {"a": a, "b": b, "binary": True, "lines": [], "same": same}
        lines = list(difflib.unified_diff(da.decode(errors="replace").splitlines(),
                                          db.decode(errors="replace").splitlines(),
                                          f"{path} v{a}", f"{path} v{b}", lineterm=""))
        return {"a": a, "b": b, "binary": False, "lines": lines[:5000], "same": same}

    async def delete(self, principal, path: str, owner: str = "") -> FileVersion:
        space = self.space(principal, owner)

        def do():
            f = self.files.delete(space, path)
            self._reindex(space, f)
            return f

        return await self._run(principal, do)

    async def rollback(self, principal, path: str, version: int, owner: str = "") -> FileVersion:
        space = self.space(principal, owner)

        def do():
            f = self.files.rollback(space, path, version)
            self._reindex(space, f)  # an indexed file stays indexed, with the restored text
            return f

        return await self._run(principal, do)
