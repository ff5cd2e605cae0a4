"""The Storage service: each agent's versioned files, confined to its own space."""
from __future__ import annotations

import asyncio


from kernos.proto.v1 import storage_pb2 as pb
from kernos.proto.v1 import storage_pb2_grpc as rpc
from kernos.storage.files import FileVersion
from kernos.storage.status import StatusError
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import invalid, syscall
from .kernel import Kernel


CHUNK_CHARS = 800
CHUNK_OVERLAP = 100


def chunks(text: str) -> list[str]:
    """Overlapping passages of a file's text, for embedding."""
    step = CHUNK_CHARS - CHUNK_OVERLAP
    return [text[i:i + CHUNK_CHARS] for i in range(0, max(len(text) - CHUNK_OVERLAP, 1), step) if text[i:i + CHUNK_CHARS].strip()]


def _info(f: FileVersion) -> pb.FileInfo:
    return pb.FileInfo(path=f.path, version=f.version, size=f.size, sha256=f.sha256, created=f.created,
                       deleted=f.deleted, metadata=f.metadata)


class StorageServicer(rpc.StorageServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    @staticmethod
    def _space(request) -> str:
        """Whose files: the caller's, or `owner`'s (another agent's space passed the access check)."""
        return request.owner or current_agent().agent_id

    async def _do(self, kind: str, request, fn, *args, trace: dict | None = None):
        """Run a store operation in the request's space, off the event loop (fsync takes ms), and trace it."""
        agent = current_agent()
        try:
            result = await asyncio.to_thread(fn, self._space(request), *args)
        except StatusError as e:  # traced here; @syscall turns it into its status
            self.k.traces.record(TraceRecord(agent.agent_id, kind, e.code, trace or {}, {}, {}))
            raise
        self.k.traces.record(TraceRecord(agent.agent_id, kind, "OK", trace or {}, {}, {}))
        return result

    def _index(self, agent_id: str, f: FileVersion, text: str | None) -> None:
        """Replace the file's passages in the agent's vector memory (text None: just drop them)."""
        self.k.memory.delete_where(agent_id, {"kind": "file", "path": f.path})
        parts = chunks(text) if text else []
        if parts:
            self.k.memory.add(agent_id, parts, [{"kind": "file", "path": f.path, "version": str(f.version)}
                                                 for _ in parts])
        self.k.files.set_indexed(agent_id, f.path, bool(parts))

    @syscall
    async def Write(self, request, context):
        text = None
        if request.index:
            try:
                text = request.data.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid("index=true needs UTF-8 text content") from None
        f = await self._do("storage.write", request, self.k.files.write, request.path, request.data, dict(request.metadata),
                           trace={"path": request.path, "size": len(request.data), "index": request.index})
        if request.index:
            await asyncio.to_thread(self._index, self._space(request), f, text)
        elif self.k.files.is_indexed(self._space(request), f.path):
            await asyncio.to_thread(self._index, self._space(request), f, None)  # stale passages must go
        return _info(f)

    @syscall
    async def Search(self, request, context):
        k = request.k or 5
        if not 1 <= k <= 50:
            raise invalid("k must be between 1 and 50")
        hits = await self._do("storage.search", request, lambda aid: self.k.memory.search(aid, request.query, min(100, 4 * k),
                                                                                 {"kind": "file"}),
                              trace={"query": request.query[:200]})
        best: dict[str, object] = {}
        for h in hits:  # one hit per file: its best passage
            if h.metadata["path"] not in best:
                best[h.metadata["path"]] = h
        return pb.SearchFilesReply(hits=[pb.FileHit(path=p, version=int(h.metadata["version"]), snippet=h.text[:400],
                                                    distance=h.distance) for p, h in list(best.items())[:k]])

    @syscall
    async def Read(self, request, context):
        f, data = await self._do("storage.read", request, self.k.files.read, request.path, request.version,
                                 trace={"path": request.path, "version": request.version})
        return pb.ReadReply(info=_info(f), data=data)

    @syscall
    async def Stat(self, request, context):
        return _info(await self._do("storage.stat", request, self.k.files.stat, request.path, request.version,
                                    trace={"path": request.path}))

    @syscall
    async def List(self, request, context):
        files = await self._do("storage.list", request, self.k.files.list, request.prefix, trace={"prefix": request.prefix})
        return pb.ListFilesReply(files=[_info(f) for f in files])

    @syscall
    async def Delete(self, request, context):
        f = await self._do("storage.delete", request, self.k.files.delete, request.path, trace={"path": request.path})
        if self.k.files.is_indexed(self._space(request), f.path):
            await asyncio.to_thread(self._index, self._space(request), f, None)
        return _info(f)

    @syscall
    async def History(self, request, context):
        files = await self._do("storage.history", request, self.k.files.history, request.path, trace={"path": request.path})
        return pb.ListFilesReply(files=[_info(f) for f in files])

    @syscall
    async def Rollback(self, request, context):
        f = await self._do("storage.rollback", request, self.k.files.rollback, request.path, request.version,
                           trace={"path": request.path, "version": request.version})
        aid = self._space(request)
        if self.k.files.is_indexed(aid, f.path):
            _, data = self.k.files.read(aid, f.path)  # an indexed file stays indexed, with the restored text
            await asyncio.to_thread(self._index, aid, f, data.decode("utf-8", "replace"))
        return _info(f)
