"""Working contexts in a generation: the context's blocks and the new messages are assembled within its
token budget, evicting the oldest turns to long-term memory (and, when the context asks for it, folding
them into a summary block that the model writes: a generation of the kernel's, accounted to the agent)."""
from __future__ import annotations

import asyncio

from kernos.abi.errors import invalid, not_found
from kernos.memory.context import ContextError, ContextStore, plan
from kernos.memory.fair import as_owner

ROLES = {"system", "user", "assistant"}


class ContextAssembler:
    def __init__(self, contexts: ContextStore, memory, summary_max_tokens: int, generate_internal):
        self.contexts = contexts
        self.memory = memory                 # () -> the long-term vector memory
        self.summary_max_tokens = summary_max_tokens
        self.generate_internal = generate_internal

    async def assemble(self, principal, g, llm) -> tuple[str, list[dict]]:
        """(the context's model, the conversation to generate from); records the new messages as turns."""
        aid, cid = principal.agent_id, g.context_id
        if g.prompt or g.prompt_ids:
            raise invalid("a context takes chat messages, not a raw prompt")
        if not g.messages:
            raise invalid("give the new messages to add to the context")
        for i, m in enumerate(g.messages):
            if m["role"] not in ROLES or not m["content"].strip():
                raise invalid(f"messages[{i}]: role must be one of {sorted(ROLES)} and content non-empty")
        ctx = await asyncio.to_thread(self.contexts.get, aid, cid)
        model = llm.get(ctx.model)
        if model is None:
            raise not_found(f"context '{cid}' uses model '{ctx.model}', which is not served now")
        if g.model and g.model != ctx.model:
            raise invalid(f"context '{cid}' is bound to model '{ctx.model}'")
        new = [{"role": m["role"], "content": m["content"]} for m in g.messages]

        def count(messages):
            return len(model.encode_chat(messages))
        summarized = False
        while True:
            blocks = await asyncio.to_thread(self.contexts.blocks, aid, cid)
            try:
                messages, evicted, _ = plan(blocks, new, count, ctx.budget_tokens)
            except ContextError:
                if await asyncio.to_thread(self._shrink_summary, aid, cid):
                    continue
                raise
            if not evicted:
                break
            await self._evict(principal, ctx, model, evicted, summarize=ctx.summarize and not summarized)
            summarized = True
        for m in new:
            await asyncio.to_thread(self.contexts.add_block, aid, cid, m["role"], m["content"], False, "", "turn")
        return ctx.model, messages

    async def record_reply(self, principal, context_id: str, text: str) -> None:
        if text.strip():
            await asyncio.to_thread(self.contexts.add_block, principal.agent_id, context_id, "assistant", text,
                                    False, "", "turn")

    def _shrink_summary(self, aid: str, cid: str) -> bool:
        """Halve the summary block (drop it when short); False when there is none to give up."""
        for b in self.contexts.blocks(aid, cid):
            if b.kind == "summary":
                if len(b.content) < 80:
                    self.contexts.delete_block(aid, cid, b.block_id)
                else:
                    self.contexts.edit_block(aid, cid, b.block_id, content=b.content[:len(b.content) // 2])
                return True
        return False

    async def _evict(self, principal, ctx, model, evicted, summarize: bool) -> None:
        aid = principal.agent_id
        texts = [f"{b.role}: {b.content}" for b in evicted]
        # Into long-term memory first, then out of the context: a crash between the two duplicates, never loses.
        await asyncio.to_thread(as_owner(aid, lambda: self.memory().add(aid, texts, [
            {"kind": "evicted_turn", "context": ctx.context_id, "role": b.role} for b in evicted])))
        if summarize:
            blocks = await asyncio.to_thread(self.contexts.blocks, aid, ctx.context_id)
            old = next((b.content for b in blocks if b.kind == "summary"), "")
            # A summary may use at most a quarter of the budget: it must never crowd out the conversation.
            cap = max(8, min(self.summary_max_tokens, ctx.budget_tokens // 4))
            reply = await self.generate_internal(principal, [
                {"role": "system", "content": "Summarize the conversation below in a few sentences. Keep facts, "
                                              "names, numbers and decisions."},
                {"role": "user", "content": (old + "\n" if old else "") + "\n".join(texts)}], cap,
                cause="context.summary", model=model.name)
            summary = reply.text
            ids = model.encode_prompt(summary)
            if len(ids) > cap:  # decoding and re-encoding need not round-trip exactly
                summary = model.tokenizer.decode(ids[:cap])
            if summary.strip():
                await asyncio.to_thread(self.contexts.set_summary, aid, ctx.context_id,
                                        "Summary of the earlier conversation: " + summary.strip())
        await asyncio.to_thread(self.contexts.evict, aid, ctx.context_id, evicted)
