"""The Memory service: converts to and from the memory use case."""
from __future__ import annotations

from kernos.memory.context import Block, Context
from kernos.memory.vector import Record
from kernos.proto.v1 import memory_pb2 as pb
from kernos.proto.v1 import memory_pb2_grpc as rpc

from ...syscalls.memory import Memory
from .interceptor import current_principal


def _item(r: Record) -> pb.MemoryItem:
    return pb.MemoryItem(id=r.id, text=r.text, metadata=r.metadata, created=r.created)


def context_info(c: Context) -> pb.ContextInfo:
    return pb.ContextInfo(context_id=c.context_id, budget_tokens=c.budget_tokens, summarize=c.summarize,
                          blocks=c.blocks, evicted=c.evicted, created=c.created, model=c.model)


def block_msg(b: Block, tokens: int = 0) -> pb.ContextBlock:
    return pb.ContextBlock(block_id=b.block_id, role=b.role, content=b.content, pinned=b.pinned, kind=b.kind,
                           label=b.label, seq=b.seq, tokens=tokens)


class MemoryServicer(rpc.MemoryServicer):
    def __init__(self, memory: Memory):
        self.memory = memory

    async def Add(self, r, context):
        items = [(i.text, dict(i.metadata), i.id) for i in r.items]
        return pb.AddMemoryReply(ids=await self.memory.add(current_principal(), items, r.namespace))

    async def Search(self, r, context):
        hits = await self.memory.search(current_principal(), r.query, r.k, dict(r.where), r.namespace)
        return pb.SearchMemoryReply(hits=[pb.MemoryHit(item=_item(h), distance=h.distance) for h in hits])

    async def Get(self, r, context):
        return pb.GetMemoryReply(items=[_item(x) for x in await self.memory.get(current_principal(), list(r.ids),
                                                                                r.namespace)])

    async def Update(self, r, context):
        meta = dict(r.metadata) if r.replace_metadata else None
        return _item(await self.memory.update(current_principal(), r.id, r.text or None, meta, r.namespace))

    async def Delete(self, r, context):
        return pb.DeleteMemoryReply(deleted=await self.memory.delete(current_principal(), list(r.ids), r.namespace))

    async def CreateContext(self, r, context):
        return context_info(await self.memory.create_context(current_principal(), r.context_id, r.budget_tokens,
                                                             r.summarize, r.model, r.system))

    async def ListContexts(self, r, context):
        return pb.ListContextsReply(contexts=[context_info(c) for c in
                                              await self.memory.list_contexts(current_principal())])

    async def DeleteContext(self, r, context):
        return context_info(await self.memory.delete_context(current_principal(), r.context_id))

    async def ListBlocks(self, r, context):
        blocks, total = await self.memory.blocks(current_principal(), r.context_id)
        return pb.ListBlocksReply(blocks=[block_msg(b, n) for b, n in blocks], tokens=total)

    async def AddBlock(self, r, context):
        return block_msg(await self.memory.add_block(current_principal(), r.context_id, r.role, r.content, r.pinned,
                                                     r.label))

    async def EditBlock(self, r, context):
        return block_msg(await self.memory.edit_block(current_principal(), r.context_id, r.block_id,
                                                      r.content if r.HasField("content") else None,
                                                      r.pinned if r.HasField("pinned") else None))

    async def DeleteBlock(self, r, context):
        return block_msg(await self.memory.delete_block(current_principal(), r.context_id, r.block_id))
