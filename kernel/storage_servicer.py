"""The Storage service: each agent's versioned files, confined to its own space."""
from __future__ import annotations

import asyncio

import grpc

from kernos.proto.v1 import storage_pb2 as pb
from kernos.proto.v1 import storage_pb2_grpc as rpc
from kernos.storage.files import FileVersion, StorageError
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import SyscallError, syscall
from .kernel import Kernel


def _info(f: FileVersion) -> pb.FileInfo:
    return pb.FileInfo(path=f.path, version=f.version, size=f.size, sha256=f.sha256, created=f.created,
                       deleted=f.deleted, metadata=f.metadata)


class StorageServicer(rpc.StorageServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    async def _do(self, kind: str, fn, *args, trace: dict | None = None):
        """Run a store operation off the event loop (fsync takes milliseconds) and trace it."""
        agent = current_agent()
        try:
            result = await asyncio.to_thread(fn, agent.agent_id, *args)
        except StorageError as e:
            self.k.traces.record(TraceRecord(agent.agent_id, kind, e.code, trace or {}, {}, {}))
            raise SyscallError(getattr(grpc.StatusCode, e.code), str(e)) from None
        self.k.traces.record(TraceRecord(agent.agent_id, kind, "OK", trace or {}, {}, {}))
        return result

    @syscall
    async def Write(self, request, context):
        f = await self._do("storage.write", self.k.files.write, request.path, request.data, dict(request.metadata),
                           trace={"path": request.path, "size": len(request.data)})
        return _info(f)

    @syscall
    async def Read(self, request, context):
        f, data = await self._do("storage.read", self.k.files.read, request.path, request.version,
                                 trace={"path": request.path, "version": request.version})
        return pb.ReadReply(info=_info(f), data=data)

    @syscall
    async def Stat(self, request, context):
        return _info(await self._do("storage.stat", self.k.files.stat, request.path, request.version,
                                    trace={"path": request.path}))

    @syscall
    async def List(self, request, context):
        files = await self._do("storage.list", self.k.files.list, request.prefix, trace={"prefix": request.prefix})
        return pb.ListFilesReply(files=[_info(f) for f in files])

    @syscall
    async def Delete(self, request, context):
        return _info(await self._do("storage.delete", self.k.files.delete, request.path, trace={"path": request.path}))

    @syscall
    async def History(self, request, context):
        files = await self._do("storage.history", self.k.files.history, request.path, trace={"path": request.path})
        return pb.ListFilesReply(files=[_info(f) for f in files])

    @syscall
    async def Rollback(self, request, context):
        return _info(await self._do("storage.rollback", self.k.files.rollback, request.path, request.version,
                                    trace={"path": request.path, "version": request.version}))
