"""Data sets from an agent's traces into its storage: `sft` (successful or corrected episodes), `dpo`
(preferred/rejected pairs from corrections and differently scored replies), `kto` (replies labelled good or
bad by their feedback), `raft` (reward-ranked samples of the current model, generated through the generate
use case on the agent's behalf) and `rag` (oracle documents from the agent's memory plus distractors). The
builders themselves are pure functions in `kernos.kernel.tuner.datasets` and `.preference_data`."""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, field

from kernos.abi.errors import StatusError

from ..tuner import datasets as ds
from ..tuner import preference_data as pd


@dataclass
class RagQuestion:
    question: str
    oracle_id: str          # the memory entry that answers it
    answer: str


@dataclass
class DatasetSpec:
    """What BuildDataset asks for; the fields of kinds other than `kind` are ignored."""
    name: str
    kind: str = "sft"
    eval_fraction: float = 0.0          # 0: the default, 0.1
    min_reward: float | None = None
    samples: int = 0                    # raft
    reward_regex: str = ""
    temperature: float = 0.0
    model: str = ""
    max_tokens: int = 0
    items: list[RagQuestion] = field(default_factory=list)   # rag
    distractors: int = 0
    oracle_fraction: float | None = None
    seed: int = 0


KINDS = ("sft", "dpo", "kto", "raft", "rag")
DATASET_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")
MAX_RAFT_PROMPTS = 2000
MAX_RAG_ITEMS = 10_000


def served_model(llm, access, principal, name: str):
    """The model `name` names (the default when empty), if `principal` may use it."""
    model = llm.get(name)
    if model is None:
        raise StatusError("NOT_FOUND", f"unknown model '{name[:64]}'; served models: {sorted(llm.models)}")
    access.authorize_model(principal, model.name, None)
    return model


class Datasets:
    def __init__(self, traces, files, memory, llm, access, generate, limits, max_batch_size: int):
        self.traces = traces
        self.files = files
        self.memory = memory  # () -> the long-term vector memory
        self.llm = llm
        self.access = access
        self.generate = generate
        self.limits = limits
        self.max_batch_size = max_batch_size

    async def build(self, agent, request: DatasetSpec) -> tuple[dict, int, int, int]:
        """(card, train examples, eval examples, version) of the data set built into the agent's storage."""
        if not DATASET_NAME.match(request.name):
            raise StatusError("INVALID_ARGUMENT", "data set names are 1-64 characters of a-z, 0-9, '_', '.', '-'")
        frac = request.eval_fraction or 0.1
        if not 0 <= frac <= 0.5:
            raise StatusError("INVALID_ARGUMENT", "eval_fraction must be between 0 and 0.5")
        min_reward = request.min_reward if request.min_reward is not None else None
        if min_reward is not None and not math.isfinite(min_reward):
            raise StatusError("INVALID_ARGUMENT", "min_reward must be a finite number")
        pairs = []
        if request.kind == "sft":
            episodes = await self._episodes(agent.agent_id)
            train, evals, card = ds.build_sft(episodes, min_reward, frac)
            pairs = ds.build_pairs(episodes)
        elif request.kind == "dpo":
            train, evals, card = pd.build_dpo(await self._episodes(agent.agent_id), frac)
        elif request.kind == "kto":
            train, evals, card = pd.build_kto(await self._episodes(agent.agent_id), min_reward, frac)
        elif request.kind == "raft":
            train, evals, card = await self._raft(agent, request, min_reward, frac)
        elif request.kind == "rag":
            train, evals, card = await self._rag(agent, request, frac)
        else:
            raise StatusError("INVALID_ARGUMENT", f"kind '{request.kind[:32]}': one of {', '.join(map(repr, KINDS))}")
        card["name"] = request.name

        def jsonl(rows):
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()

        base = f"datasets/{request.name}"
        write = self.files.write
        info = await asyncio.to_thread(write, agent.agent_id, f"{base}.train.jsonl", jsonl(train), {"kind": "dataset"})
        await asyncio.to_thread(write, agent.agent_id, f"{base}.eval.jsonl", jsonl(evals), {"kind": "dataset"})
        card["files"] = {"train": f"{base}.train.jsonl", "eval": f"{base}.eval.jsonl", "version": info.version}
        if pairs:
            await asyncio.to_thread(write, agent.agent_id, f"{base}.pairs.jsonl", jsonl(pairs), {"kind": "dataset"})
            card["files"]["pairs"] = f"{base}.pairs.jsonl"
            card["pairs"] = len(pairs)
        await asyncio.to_thread(
            write, agent.agent_id, f"{base}.card.json", json.dumps(card, indent=2).encode(), {"kind": "dataset-card"}
        )
        return card, len(train), len(evals), info.version

    async def _episodes(self, agent_id: str) -> list[ds.Episode]:
        outcomes = await asyncio.to_thread(self.traces.outcomes, agent_id)
        return await asyncio.to_thread(
            lambda: ds.episodes_from_traces(self.traces.scan(agent_id, "llm.generate"), outcomes))

    async def _raft(self, agent, request, min_reward, frac):
        k = request.samples or 4
        if not 1 <= k <= 32:
            raise StatusError("INVALID_ARGUMENT", "samples must be between 1 and 32")
        temperature = request.temperature or 0.8
        if not 0 < temperature <= 2:
            raise StatusError("INVALID_ARGUMENT", "temperature must be in (0, 2]")
        max_tokens = request.max_tokens or 64
        if max_tokens > self.limits.max_tokens_cap:
            raise StatusError(
                "INVALID_ARGUMENT", f"max_tokens is over limits.max_tokens_cap ({self.limits.max_tokens_cap})"
            )
        model = served_model(self.llm, self.access, agent, request.model)
        episodes = await self._episodes(agent.agent_id)
        if request.reward_regex:
            try:
                reward = ds.regex_reward(request.reward_regex[:1000])
            except re.error as e:
                raise StatusError("INVALID_ARGUMENT", f"reward_regex: {e}") from None
            source = f"regex {request.reward_regex[:200]!r}"
        else:
            reward, source = ds.feedback_reward(episodes), "stored feedback on identical replies"
        prompts = ds.distinct_prompts(episodes)[:MAX_RAFT_PROMPTS]
        sem = asyncio.Semaphore(max(1, self.max_batch_size))  # fill the batch, no more

        async def sample(messages, i):
            async with sem:
                reply = await self.generate.internal(
                    agent, messages, max_tokens, cause="tuner.raft", model=model.name, temperature=temperature, seed=i
                )
            return reply.text

        answers = await asyncio.gather(*(sample(messages, i) for _, messages in prompts for i in range(k)))
        samples = {key: (messages, list(answers[j * k : (j + 1) * k])) for j, (key, messages) in enumerate(prompts)}
        train, evals, card = ds.build_raft(samples, reward, min_reward, frac)
        card.update(model=model.name, reward=source, temperature=temperature, max_tokens=max_tokens)
        return train, evals, card

    async def _rag(self, agent, request, frac):
        items = list(request.items)
        if not 1 <= len(items) <= MAX_RAG_ITEMS:
            raise StatusError("INVALID_ARGUMENT", f"rag needs 1 to {MAX_RAG_ITEMS} items (question, oracle_id, answer)")
        for i, it in enumerate(items):
            if not it.question.strip() or not it.answer.strip() or not it.oracle_id:
                raise StatusError("INVALID_ARGUMENT", f"items[{i}]: question, oracle_id and answer are all required")
        n_distract = request.distractors or 3
        if not 1 <= n_distract <= 16:
            raise StatusError("INVALID_ARGUMENT", "distractors must be between 1 and 16")
        p = request.oracle_fraction if request.oracle_fraction is not None else 0.8
        if not 0 <= p <= 1:
            raise StatusError("INVALID_ARGUMENT", "oracle_fraction must be between 0 and 1")
        ns = agent.agent_id
        memory = self.memory()
        oracles = await asyncio.to_thread(memory.get, ns, list(dict.fromkeys(it.oracle_id for it in items)))
        text = {r.id: r.text for r in oracles}
        pool = [(r.id, r.text) for r in await asyncio.to_thread(memory.documents, ns)]
        if len(pool) < n_distract + 1:
            raise StatusError(
                "FAILED_PRECONDITION",
                f"memory holds {len(pool)} documents; {n_distract} distractors plus the oracle need more",
            )
        rag = [ds.RagItem(it.question, it.oracle_id, text[it.oracle_id], it.answer) for it in items]
        return ds.build_rag(rag, pool, n_distract, p, request.seed, frac)
