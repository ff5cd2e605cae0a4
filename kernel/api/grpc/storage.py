"""The Storage service: converts to and from the files use case."""

from __future__ import annotations

from kernos.proto.v1 import storage_pb2 as pb
from kernos.proto.v1 import storage_pb2_grpc as rpc
from kernos.storage.files import FileVersion

from ...syscalls.files import Files
from .interceptor import current_principal


def _info(f: FileVersion) -> pb.FileInfo:
    return pb.FileInfo(
        path=f.path,
        version=f.version,
        size=f.size,
        sha256=f.sha256,
        created=f.created,
        deleted=f.deleted,
        metadata=f.metadata,
    )


class StorageServicer(rpc.StorageServicer):
    def __init__(self, files: Files):
        self.files = files

    async def Write(self, r, context):
        return _info(await self.files.write(current_principal(), r.path, r.data, dict(r.metadata), r.index, r.owner))

    async def Search(self, r, context):
        hits = await self.files.search(current_principal(), r.query, r.k, r.owner)
        return pb.SearchFilesReply(
            hits=[pb.FileHit(path=p, version=v, snippet=text[:400], distance=d) for p, v, text, d in hits]
        )

    async def Read(self, r, context):
        f, data = await self.files.read(current_principal(), r.path, r.version, r.owner)
        return pb.ReadReply(info=_info(f), data=data)

    async def Stat(self, r, context):
        return _info(await self.files.stat(current_principal(), r.path, r.version, r.owner))

    async def List(self, r, context):
        return pb.ListFilesReply(
            files=[_info(f) for f in await self.files.list(current_principal(), r.prefix, r.owner)]
        )

    async def Delete(self, r, context):
        return _info(await self.files.delete(current_principal(), r.path, r.owner))

    async def History(self, r, context):
        return pb.ListFilesReply(
            files=[_info(f) for f in await self.files.history(current_principal(), r.path, r.owner)]
        )

    async def Rollback(self, r, context):
        return _info(await self.files.rollback(current_principal(), r.path, r.version, r.owner))
