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

from ..llm.structured import OutputSpec, output_spec
from ..tuner import datasets as ds
from ..tuner import grpo_data as gd
from ..tuner import judge, rewards
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
    reward: str = ""                    # grpo, raft: a reward spec (kernos.kernel.tuner.rewards)
    adapter: str = ""                   # grpo, raft: sample from it ("current": the agent's default), not the base


KINDS = ("sft", "dpo", "kto", "grpo", "raft", "rag")
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


def agent_adapter(defaults, agent, model, which: str) -> str:
    """The served adapter ("OWNER:NAME") that `which` means for the agent on `model`: "current" its default
    adapter there (FAILED_PRECONDITION when it has none), a plain NAME its own, "OWNER:NAME" as given."""
    if which != "current":
        return which if ":" in which else f"{agent.agent_id}:{which}"
    name = defaults(agent.agent_id, model.name)
    if not name:
        raise StatusError("FAILED_PRECONDITION", f"'{agent.agent_id}' has no default adapter on '{model.name}' "
                                                 "('current' names it)")
    return name


class Datasets:
    def __init__(self, traces, files, memory, llm, access, generate, limits, max_batch_size: int, tools=None,
                 defaults=None):
        self.traces = traces
        self.files = files
        self.memory = memory  # () -> the long-term vector memory
        self.llm = llm
        self.access = access
        self.generate = generate
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.tools = tools      # the tool manager: reward tools run through it (jailed, as the agent)
        self.defaults = defaults or (lambda agent_id, model: None)   # an agent's default adapter on a model

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
        elif request.kind == "grpo":
            train, evals, card = await self._grpo(agent, request, min_reward, frac)
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

    def _sampling(self, agent, request, temperature: float, least: int = 1):
        """(samples per prompt, temperature, max_tokens, model, adapter) of a sampling data set, checked (adapter:
        the served adapter it samples from, None for the base)."""
        k = request.samples or 4
        if not least <= k <= 32:
            raise StatusError("INVALID_ARGUMENT", f"samples must be between {least} and 32")
        temperature = request.temperature or temperature
        if not 0 < temperature <= 2:
            raise StatusError("INVALID_ARGUMENT", "temperature must be in (0, 2]")
        max_tokens = request.max_tokens or 64
        if max_tokens > self.limits.max_tokens_cap:
            raise StatusError(
                "INVALID_ARGUMENT", f"max_tokens is over limits.max_tokens_cap ({self.limits.max_tokens_cap})"
            )
        model = served_model(self.llm, self.access, agent, request.model)
        return k, temperature, max_tokens, model, self._sampled_adapter(agent, model, request.adapter)

    def _sampled_adapter(self, agent, model, which: str) -> str | None:
        """The served adapter samples come from: None (the base), the agent's default ("current") or its NAME."""
        if not which:
            return None
        name = agent_adapter(self.defaults, agent, model, which)
        if name not in model.adapters:
            raise StatusError("NOT_FOUND", f"model '{model.name}' serves no adapter '{name[:130]}'")
        self.access.authorize_model(agent, model.name, name)
        return name

    async def _sample(self, agent, model, prompts, k: int, temperature: float, max_tokens: int, cause: str,
                      adapter: str | None = None, tools: dict | None = None) -> list[list[ds.Sample]]:
        """k sampled replies (ds.Sample) of the base model (or `adapter`) per (key, messages) prompt, filling the
        batch and no more; a prompt whose request offered tools (`tools`: key -> them) is sampled with them."""
        sem = asyncio.Semaphore(max(1, self.max_batch_size))
        offered = {key: self._offered(t["tools"], t["tool_choice"]) for key, t in (tools or {}).items()}

        async def sample(key, messages, i):
            async with sem:
                reply = await self.generate.internal(
                    agent, messages, max_tokens, cause=cause, model=model.name, temperature=temperature, seed=i,
                    adapter=adapter, output=offered.get(key))
            return ds.Sample.of(reply.text, reply.tool_calls)

        answers = await asyncio.gather(*(sample(key, messages, i) for key, messages in prompts for i in range(k)))
        return [list(answers[j * k : (j + 1) * k]) for j in range(len(prompts))]

    def _offered(self, tools: list[dict], choice: str):
        """The output spec of a traced request's tools and tool choice (its calls constrained and parsed as
        serving's are); None when they no longer pass the kernel's checks."""
        try:
            return output_spec([{"name": t.get("name", ""), "description": t.get("description", ""),
                                 "parameters_json": t.get("parameters_json", ""), "strict": t.get("strict", False)}
                                for t in tools], choice, None, "text", "", self.limits.max_schema_bytes,
                               max_schema_repeats=self.limits.max_schema_repeats)
        except StatusError:
            return None

    def _reward(self, agent, spec: str):
        """(kind, argument) of a reward spec, checked now: a bad spec or an unknown reward tool fails the call."""
        try:
            kind, arg = rewards.parse(spec[:4000])
        except rewards.RewardError as e:
            raise StatusError("INVALID_ARGUMENT", str(e)) from None
        if kind == "tool":
            if self.tools is None:
                raise StatusError("FAILED_PRECONDITION", "this kernel runs no tools: reward tools cannot run")
            self.tools.resolve(agent, arg)
        if kind == "judge" and arg[0]:
            served_model(self.llm, self.access, agent, arg[0])     # a judge the agent may not use, or none
        return kind, arg

    async def _scored(self, agent, kind, arg, prompts, answers, refs, errors: list) -> list[list[float | None]]:
        """Each sampled answer's reward (None: the reward tool failed on it, the error appended to `errors`)."""
        if kind == "judge":
            calls = asyncio.Semaphore(max(1, self.max_batch_size))

            async def judged(messages, group):
                async with calls:
                    return await self._judged(agent, arg, messages, group, errors)
            return list(await asyncio.gather(*(judged(m, group) for (_, m), group in zip(prompts, answers))))
        sem = asyncio.Semaphore(4)

        async def score(messages, answer, ref):
            if kind != "tool":
                return rewards.builtin(kind, arg, answer, ref)
            async with sem:
                return await self._tool_reward(agent, arg, messages, answer, ref, errors)
        flat = await asyncio.gather(*(score(m, a, refs.get(key)) for (key, m), group in zip(prompts, answers)
                                      for a in group))
        k = len(answers[0]) if answers else 0
        return [list(flat[j * k : (j + 1) * k]) for j in range(len(answers))]

    async def _verified(self, agent, request, min_reward, k, temperature, max_tokens, model, adapter, cause):
        """Prompts of the agent's traces, k samples of each, and their rewards by `request.reward`: (prompts,
        answers, scores, the prompts' tools, card fields)."""
        kind, arg = self._reward(agent, request.reward)
        if kind == "judge" and not arg[0]:
            arg = (model.name, arg[1])              # the judge: the sampled model unless one is named
        episodes = await self._episodes(agent.agent_id)
        refs = gd.reference_calls(episodes, min_reward) if kind == "tool_call" else gd.references(episodes, min_reward)
        prompts = ds.distinct_prompts(episodes)[:MAX_RAFT_PROMPTS]
        tools = ds.prompt_tools(episodes)
        no_reference = 0
        if rewards.needs_reference(kind):
            no_reference = sum(1 for key, _ in prompts if key not in refs)
            prompts = [(key, m) for key, m in prompts if key in refs]
        answers = await self._sample(agent, model, prompts, k, temperature, max_tokens, cause, adapter, tools)
        errors: list[str] = []
        scores = await self._scored(agent, kind, arg, prompts, answers, refs, errors)
        return prompts, answers, scores, tools, {"reward": request.reward[:200], "no_reference": no_reference,
                                          "reward_errors": len(errors), "reward_error_examples": errors[:3]}

    async def _grpo(self, agent, request, min_reward, frac):
        if not request.reward:
            raise StatusError("INVALID_ARGUMENT", "grpo needs reward: regex:PATTERN, json, json_schema:SCHEMA, exact, "
                                                  "contains, tool_call, tool:NAME or judge[:MODEL[:RUBRIC]]")
        k, temperature, max_tokens, model, adapter = self._sampling(agent, request, 1.0, least=2)
        prompts, answers, scores, tools, fields = await self._verified(agent, request, min_reward, k, temperature,
                                                                       max_tokens, model, adapter, "tuner.grpo")
        groups = [(key, m, list(zip(group, sc))) for (key, m), group, sc in zip(prompts, answers, scores)]
        train, evals, card = gd.build_grpo(groups, frac, tools)
        card.update(model=model.name, sampled_from=adapter or "base", temperature=temperature,
                    max_tokens=max_tokens, **fields)
        return train, evals, card

    async def _judged(self, agent, arg, messages, replies: list[ds.Sample], errors: list) -> list[float | None]:
        """A judge's scores of one group of replies (all None when its verdict cannot be read: the error counted)."""
        model, rubric = arg
        try:
            reply = await self.generate.internal(
                agent, judge.prompt(messages, [r.shown() for r in replies], rubric), judge.max_tokens(len(replies)),
                cause="tuner.judge",
                model=model, output=OutputSpec(response_format="json_schema", schema=judge.schema(len(replies))))
            return judge.verdict(reply.text, len(replies))
        except (judge.JudgeError, StatusError) as e:
            errors.append(str(e)[:200])
            return [None] * len(replies)

    async def _tool_reward(self, agent, name: str, messages, answer: ds.Sample, ref, errors: list) -> float | None:
        """The agent's reward tool on one sample (jailed, as the agent): its number, or None with the error."""
        args = json.dumps({"messages": messages, "reply": answer.text, "tool_calls": answer.tool_calls,
                           "reference": ref})
        try:
            call = await self.tools.call(agent, name, args)
        except StatusError as e:
            errors.append(f"{e.code}: {e.message[:200]}")
            return None
        if call.state == "pending":
            errors.append(f"{name} needs an operator's confirmation: a reward tool must not be irreversible")
            self.tools.deny(call.call_id, "a reward tool call is never confirmed")
            return None
        if call.state != "done":
            errors.append(f"{call.state}: {str(call.error)[:200]}")
            return None
        value = rewards.tool_result(call.result)
        if value is None:
            errors.append(f"{name} returned {str(call.result)[:100]!r}, not a number or {{'reward': number}}")
        return value

    async def _raft(self, agent, request, min_reward, frac):
        k, temperature, max_tokens, model, adapter = self._sampling(agent, request, 0.8)
        fields = {}
        if request.reward:          # a verifiable reward (as grpo's): scored per sample, a failed score counts 0
            prompts, answers, scores, tools, fields = await self._verified(agent, request, min_reward, k, temperature,
                                                                           max_tokens, model, adapter, "tuner.raft")
            table = {(key, a): r or 0.0 for (key, _), group, sc in zip(prompts, answers, scores)
                     for a, r in zip(group, sc)}

            def reward(messages, answer):
                return table[(ds.prompt_key(messages), answer)]
            source = request.reward[:200]
        else:
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
            tools = ds.prompt_tools(episodes)
            answers = await self._sample(agent, model, prompts, k, temperature, max_tokens, "tuner.raft", adapter,
                                         tools)
        samples = {key: (messages, group) for (key, messages), group in zip(prompts, answers)}
        train, evals, card = ds.build_raft(samples, reward, min_reward, frac, tools)
        card.update({**fields, "model": model.name, "sampled_from": adapter or "base", "temperature": temperature,
                     "max_tokens": max_tokens,
                     "reward": source})
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
