"""The Memory service: long-term vector memory and working contexts, each agent in its own namespace."""
from __future__ import annotations

import asyncio

import grpc

from kernos.memory.context import Block, Context
from kernos.memory.vector import Record
from kernos.proto.v1 import memory_pb2 as pb
from kernos.proto.v1 import memory_pb2_grpc as rpc
from kernos.storage.status import StatusError
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import SyscallError, invalid, not_found, syscall
from .kernel import Kernel


def _chroma_input_errors() -> tuple[type, ...]:
    from chromadb import errors

    return tuple(getattr(errors, n) for n in ("InvalidArgumentError", "DuplicateIDError") if hasattr(errors, n))


def _item(r: Record) -> pb.MemoryItem:
    return pb.MemoryItem(id=r.id, text=r.text, metadata=r.metadata, created=r.created)


def context_info(c: Context) -> pb.ContextInfo:
    return pb.ContextInfo(context_id=c.context_id, budget_tokens=c.budget_tokens, summarize=c.summarize,
                          blocks=c.blocks, evicted=c.evicted, created=c.created, model=c.model)


def block_msg(b: Block, tokens: int = 0) -> pb.ContextBlock:
    return pb.ContextBlock(block_id=b.block_id, role=b.role, content=b.content, pinned=b.pinned, kind=b.kind,
                           label=b.label, seq=b.seq, tokens=tokens)


class MemoryServicer(rpc.MemoryServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    async def _call(self, kind: str, fn, *args, trace: dict | None = None):
        agent = current_agent()
        try:
            result = await asyncio.to_thread(fn, *args)
        except StatusError as e:  # traced here; @syscall turns it into its status
            self.k.traces.record(TraceRecord(agent.agent_id, kind, e.code, trace or {}, {}, {}))
            raise
        except (ValueError, *_chroma_input_errors()) as e:  # chromadb's own input validation
            self.k.traces.record(TraceRecord(agent.agent_id, kind, "INVALID_ARGUMENT", trace or {}, {}, {}))
            raise SyscallError(grpc.StatusCode.INVALID_ARGUMENT, f"rejected by the vector store: {e}") from None
        self.k.traces.record(TraceRecord(agent.agent_id, kind, "OK", trace or {}, {}, {}))
        return result

    # -- long-term vector memory -------------------------------------------------------------------------
    @syscall
    async def Add(self, request, context):
        ns = self.k.namespace(current_agent(), request.namespace)
        if len(request.items) > 1000:
            raise invalid("at most 1000 items per Add")
        ids = await self._call("memory.add", lambda: self.k.memory.add(
            ns, [i.text for i in request.items], [dict(i.metadata) for i in request.items],
            [i.id for i in request.items]), trace={"count": len(request.items)})
        return pb.AddMemoryReply(ids=ids)

    @syscall
    async def Search(self, request, context):
        ns = self.k.namespace(current_agent(), request.namespace)
        hits = await self._call("memory.search", lambda: self.k.memory.search(
            ns, request.query, request.k or 5, dict(request.where)), trace={"query": request.query[:200]})
        return pb.SearchMemoryReply(hits=[pb.MemoryHit(item=_item(h), distance=h.distance) for h in hits])

    @syscall
    async def Get(self, request, context):
        ns = self.k.namespace(current_agent(), request.namespace)
        if not request.ids:
            raise invalid("give the ids to get")
        recs = await self._call("memory.get", lambda: self.k.memory.get(ns, list(request.ids)))
        return pb.GetMemoryReply(items=[_item(r) for r in recs])

    @syscall
    async def Update(self, request, context):
        ns = self.k.namespace(current_agent(), request.namespace)
        meta = dict(request.metadata) if request.replace_metadata else None
        rec = await self._call("memory.update", lambda: self.k.memory.update(ns, request.id, request.text or None,
                                                                                meta), trace={"id": request.id})
        return _item(rec)

    @syscall
    async def Delete(self, request, context):
        ns = self.k.namespace(current_agent(), request.namespace)
        n = await self._call("memory.delete", lambda: self.k.memory.delete(ns, list(request.ids)))
        return pb.DeleteMemoryReply(deleted=n)

    # -- working contexts --------------------------------------------------------------------------------
    @syscall
    async def CreateContext(self, request, context):
        agent = current_agent()
        model = self.k.llm.get(request.model)
        if model is None:
            raise not_found(f"unknown model '{request.model}'; served models: {sorted(self.k.llm.models)}")
        budget = request.budget_tokens or self.k.config.limits.max_prompt_tokens
        if budget > self.k.config.limits.max_prompt_tokens:
            raise invalid(f"budget_tokens {budget} is over the kernel's limits.max_prompt_tokens "
                          f"({self.k.config.limits.max_prompt_tokens})")
        ctx = await self._call("memory.create_context", self.k.contexts.create, agent.agent_id, request.context_id,
                               budget, request.summarize, model.name, request.system,
                               trace={"context_id": request.context_id})
        return context_info(ctx)

    @syscall
    async def ListContexts(self, request, context):
        ctxs = await self._call("memory.list_contexts", self.k.contexts.list, current_agent().agent_id)
        return pb.ListContextsReply(contexts=[context_info(c) for c in ctxs])

    @syscall
    async def DeleteContext(self, request, context):
        return context_info(await self._call("memory.delete_context", self.k.contexts.delete,
                                             current_agent().agent_id, request.context_id))

    @syscall
    async def ListBlocks(self, request, context):
        agent = current_agent()
        ctx = await self._call("memory.list_blocks", self.k.contexts.get, agent.agent_id, request.context_id)
        blocks = self.k.contexts.blocks(agent.agent_id, request.context_id)
        model = self.k.llm.get(ctx.model)
        per_block = [len(model.encode_chat([b.message()])) if model else 0 for b in blocks]
        total = len(model.encode_chat([b.message() for b in blocks])) if model and blocks else 0
        return pb.ListBlocksReply(blocks=[block_msg(b, n) for b, n in zip(blocks, per_block)], tokens=total)

    @syscall
    async def AddBlock(self, request, context):
        b = await self._call("memory.add_block", self.k.contexts.add_block, current_agent().agent_id,
                             request.context_id, request.role or "system", request.content, request.pinned,
                             request.label)
        return block_msg(b)

    @syscall
    async def EditBlock(self, request, context):
        b = await self._call("memory.edit_block", self.k.contexts.edit_block, current_agent().agent_id,
                             request.context_id, request.block_id,
                             request.content if request.HasField("content") else None,
                             request.pinned if request.HasField("pinned") else None)
        return block_msg(b)

    @syscall
    async def DeleteBlock(self, request, context):
        return block_msg(await self._call("memory.delete_block", self.k.contexts.delete_block,
                                          current_agent().agent_id, request.context_id, request.block_id))
