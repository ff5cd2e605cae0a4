"""The memory syscalls: long-term vector memory in a namespace (the caller's own, or another agent's past
the gate's grant check), and the caller's working contexts with their blocks. Store calls run off the
event loop."""
from __future__ import annotations

from kernos.abi.errors import invalid, not_found
from kernos.memory.context import Block, Context, ContextStore

from .pools import FairPool


class Memory:
    def __init__(self, memory, contexts: ContextStore, llm, limits, pool: FairPool):
        self.memory = memory          # () -> the long-term vector memory, opened on first use
        self.pool = pool              # memory's own threads, shared fairly between agents
        self.contexts = contexts
        self.llm = llm
        self.limits = limits

    def _run(self, principal, fn, *args):
        return self.pool.run(principal.agent_id, fn, *args)

    async def _vector(self, principal, fn):
        return await self._run(principal, lambda: fn(self.memory()))

    async def embed(self, principal, texts: list[str]) -> list[list[float]]:
        """The memory's embedding of each text (the model long-term memory searches with)."""
        from kernos.abi.errors import invalid

        if not texts or len(texts) > 2048 or any(not isinstance(t, str) or not t for t in texts):
            raise invalid("input must be 1 to 2048 non-empty strings")
        if sum(len(t) for t in texts) > 4 << 20:
            raise invalid("input is over 4 MiB of text")
        return await self._vector(principal, lambda m: m.embed(texts))

    @staticmethod
    def namespace(principal, requested: str) -> str:
        return requested or principal.agent_id

    # -- long-term vector memory -------------------------------------------------------------------------
    async def add(self, principal, items: list[tuple[str, dict, str]], namespace: str = "") -> list[str]:
        """items: (text, metadata, id or "")."""
        if len(items) > 1000:
            raise invalid("at most 1000 items per Add")
        ns = self.namespace(principal, namespace)
        return await self._vector(principal, lambda m: m.add(ns, [t for t, _, _ in items], [d for _, d, _ in items],
                                                  [i for _, _, i in items]))

    async def search(self, principal, query: str, k: int = 5, where: dict | None = None, namespace: str = ""):
        ns = self.namespace(principal, namespace)
        return await self._vector(principal, lambda m: m.search(ns, query, k or 5, dict(where or {})))

    async def get(self, principal, ids: list[str], namespace: str = ""):
        if not ids:
            raise invalid("give the ids to get")
        ns = self.namespace(principal, namespace)
        return await self._vector(principal, lambda m: m.get(ns, list(ids)))

    async def update(self, principal, id_: str, text: str | None, metadata: dict | None, namespace: str = ""):
        ns = self.namespace(principal, namespace)
        return await self._vector(principal, lambda m: m.update(ns, id_, text, metadata))

    async def delete(self, principal, ids: list[str], namespace: str = "") -> int:
        ns = self.namespace(principal, namespace)
        return await self._vector(principal, lambda m: m.delete(ns, list(ids)))

    # -- working contexts --------------------------------------------------------------------------------
    async def create_context(self, principal, context_id: str, budget_tokens: int, summarize: bool, model: str,
                             system: str) -> Context:
        served = self.llm.get(model)
        if served is None:
            raise not_found(f"unknown model '{model}'; served models: {sorted(self.llm.models)}")
        most = self.limits.prompt_limit(served.context_length)
        budget = budget_tokens or self.limits.prompt_limit(served.context_length, self.limits.default_max_tokens)
        if budget > most:
            raise invalid(f"budget_tokens {budget} is over the longest prompt '{served.name}' takes ({most}: its "
                          f"context length less one token of reply, at most limits.max_prompt_tokens)")
        return await self._run(principal, self.contexts.create, principal.agent_id, context_id, budget, summarize,
                                       served.name, system)

    async def list_contexts(self, principal) -> list[Context]:
        return await self._run(principal, self.contexts.list, principal.agent_id)

    async def delete_context(self, principal, context_id: str) -> Context:
        return await self._run(principal, self.contexts.delete, principal.agent_id, context_id)

    async def blocks(self, principal, context_id: str) -> tuple[list[tuple[Block, int]], int]:
        """The context's blocks with the tokens each adds to the assembled prompt (so they sum to it, template
        overhead in the first), and the assembled prompt's size in tokens."""
        aid = principal.agent_id

        def do():
            ctx = self.contexts.get(aid, context_id)
            blocks = self.contexts.blocks(aid, context_id)
            model = self.llm.get(ctx.model)
            if model is None or not blocks:
                return [(b, 0) for b in blocks], 0
            messages = [b.message() for b in blocks]
            sizes = [len(model.encode_chat(messages[: i + 1])) for i in range(len(messages))]
            return list(zip(blocks, [b - a for a, b in zip([0] + sizes, sizes)])), sizes[-1]
        return await self._run(principal, do)

    async def add_block(self, principal, context_id: str, role: str, content: str, pinned: bool, label: str) -> Block:
        return await self._run(principal, self.contexts.add_block, principal.agent_id, context_id, role or "system",
                                       content, pinned, label)

    async def edit_block(self, principal, context_id: str, block_id: str, content: str | None,
                         pinned: bool | None) -> Block:
        return await self._run(principal, self.contexts.edit_block, principal.agent_id, context_id, block_id, content,
                                       pinned)

    async def delete_block(self, principal, context_id: str, block_id: str) -> Block:
        return await self._run(principal, self.contexts.delete_block, principal.agent_id, context_id, block_id)
