"""The Tuner service: outcomes on traced generations, data sets built from them into storage, fine-tuning
jobs, and the adapter store."""
from __future__ import annotations

import asyncio
import json
import math
import re

from pydantic import ValidationError

from kernos.proto.v1 import tuner_pb2 as pb
from kernos.proto.v1 import tuner_pb2_grpc as rpc
from kernos.storage.status import StatusError
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import syscall
from .kernel import Kernel
from .tuner import datasets as ds
from .tuner.config import TrainConfig
from .tuner.jobs import FINAL, Job

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
DATASET_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
MAX_PREFERRED = 64 * 1024
MAX_RAFT_PROMPTS = 2000
MAX_RAG_ITEMS = 10_000


def _eval(d: dict) -> pb.Eval:
    return pb.Eval(loss=d.get("loss"), accuracy=d.get("accuracy"), examples=d.get("examples") or 0)


def job_message(j: Job) -> pb.Job:
    return pb.Job(job_id=j.job_id, owner=j.owner, name=j.name, dataset=j.dataset, model=j.model, state=j.state,
                  step=j.step, total_steps=j.total_steps, loss=j.loss, steps_per_s=j.steps_per_s, eta_s=j.eta_s,
                  base=_eval(j.base), tuned=_eval(j.tuned), adapter=j.adapter, version=j.version, message=j.message,
                  peak_rss_mb=j.peak_rss_mb, created=j.created, started=j.started, finished=j.finished,
                  config_json=json.dumps(j.config), resumed_from_step=j.resumed_from_step)


def _admin(agent) -> bool:
    return agent.agent_id.startswith("admin:")


class TunerServicer(rpc.TunerServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    # -- outcomes ------------------------------------------------------------------------------------------
    @syscall
    async def Feedback(self, request, context):
        agent = current_agent()
        if not REQUEST_ID.match(request.request_id):
            raise StatusError("INVALID_ARGUMENT", "request_id must be the 32 hex characters of a generation's reply")
        reward = request.reward if request.HasField("reward") else None
        success = request.success if request.HasField("success") else None
        if reward is None and success is None and not request.preferred:
            raise StatusError("INVALID_ARGUMENT", "give a reward, a success flag, a preferred reply, or several")
        if reward is not None and not math.isfinite(reward):
            raise StatusError("INVALID_ARGUMENT", "reward must be a finite number")
        if len(request.preferred.encode()) > MAX_PREFERRED or (request.preferred and not request.preferred.strip()):
            raise StatusError("INVALID_ARGUMENT", f"preferred must be non-blank text of at most {MAX_PREFERRED} bytes")
        for _ in range(40):  # the trace writer is asynchronous: a generation just answered may be a moment away
            if await asyncio.to_thread(self.k.traces.has_generation, agent.agent_id, request.request_id):
                break
            await asyncio.sleep(0.05)
        else:
            raise StatusError("NOT_FOUND", f"no generation '{request.request_id}' of '{agent.agent_id}' in the traces")
        n = await asyncio.to_thread(self.k.traces.add_outcome, agent.agent_id, request.request_id, reward, success,
                                    request.note, request.preferred or None)
        return pb.FeedbackReply(outcomes=n)

    # -- data sets -----------------------------------------------------------------------------------------
    @syscall
    async def BuildDataset(self, request, context):
        agent = current_agent()
        if not DATASET_NAME.match(request.name):
            raise StatusError("INVALID_ARGUMENT", "data set names are 1-64 characters of a-z, 0-9, '_', '.', '-'")
        frac = request.eval_fraction or 0.1
        if not 0 <= frac <= 0.5:
            raise StatusError("INVALID_ARGUMENT", "eval_fraction must be between 0 and 0.5")
        min_reward = request.min_reward if request.HasField("min_reward") else None
        if min_reward is not None and not math.isfinite(min_reward):
            raise StatusError("INVALID_ARGUMENT", "min_reward must be a finite number")
        pairs = []
        if request.kind == "sft":
            episodes = await self._episodes(agent.agent_id)
            train, evals, card = ds.build_sft(episodes, min_reward, frac)
            pairs = ds.build_pairs(episodes)
        elif request.kind == "raft":
            train, evals, card = await self._raft(agent, request, min_reward, frac)
        elif request.kind == "rag":
            train, evals, card = await self._rag(agent, request, frac)
        else:
            raise StatusError("INVALID_ARGUMENT", f"kind '{request.kind[:32]}': one of 'sft', 'raft', 'rag'")
        card["name"] = request.name

        def jsonl(rows):
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        base = f"datasets/{request.name}"
        write = self.k.files.write
        info = await asyncio.to_thread(write, agent.agent_id, f"{base}.train.jsonl", jsonl(train), {"kind": "dataset"})
        await asyncio.to_thread(write, agent.agent_id, f"{base}.eval.jsonl", jsonl(evals), {"kind": "dataset"})
        card["files"] = {"train": f"{base}.train.jsonl", "eval": f"{base}.eval.jsonl", "version": info.version}
        if pairs:
            await asyncio.to_thread(write, agent.agent_id, f"{base}.pairs.jsonl", jsonl(pairs), {"kind": "dataset"})
            card["files"]["pairs"] = f"{base}.pairs.jsonl"
            card["pairs"] = len(pairs)
        await asyncio.to_thread(write, agent.agent_id, f"{base}.card.json", json.dumps(card, indent=2).encode(),
                                {"kind": "dataset-card"})
        self.k.traces.record(TraceRecord(agent.agent_id, "tuner.build_dataset", "OK",
                                         {"name": request.name, "kind": request.kind},
                                         {"train": len(train), "eval": len(evals)}, {}))
        return pb.DatasetInfo(name=request.name, train=len(train), eval=len(evals), version=info.version,
                              card_json=json.dumps(card))

    async def _episodes(self, agent_id: str) -> list[ds.Episode]:
        traces = await asyncio.to_thread(self.k.traces.query, agent_id, "llm.generate", 1_000_000)
        outcomes = await asyncio.to_thread(self.k.traces.outcomes, agent_id)
        return ds.episodes_from_traces(traces, outcomes)

    def _model(self, agent, name: str):
        model = self.k.llm.get(name)
        if model is None:
            raise StatusError("NOT_FOUND", f"unknown model '{name[:64]}'; served models: {sorted(self.k.llm.models)}")
        allowed, capability, reason = self.k.access.decide_named(agent.agent_id, "model", model.name)
        if not allowed:
            raise StatusError("PERMISSION_DENIED", f"missing capability {capability}: {reason}")
        return model

    async def _raft(self, agent, request, min_reward, frac):
        k = request.samples or 4
        if not 1 <= k <= 32:
            raise StatusError("INVALID_ARGUMENT", "samples must be between 1 and 32")
        temperature = request.temperature or 0.8
        if not 0 < temperature <= 2:
            raise StatusError("INVALID_ARGUMENT", "temperature must be in (0, 2]")
        max_tokens = request.max_tokens or 64
        if max_tokens > self.k.config.limits.max_tokens_cap:
            raise StatusError("INVALID_ARGUMENT", f"max_tokens is over limits.max_tokens_cap ({self.k.config.limits.max_tokens_cap})")
        model = self._model(agent, request.model)
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
        sem = asyncio.Semaphore(max(1, self.k.config.engine.max_batch_size))   # fill the batch, no more
        lim = self.k.config.limits.max_prompt_tokens

        async def sample(messages, i):
            async with sem:
                final = await self.k.llm.complete(model, agent.agent_id, messages, max_tokens, temperature=temperature,
                                                  seed=i, max_prompt_tokens=lim)
            self.k.agents.add_tokens(agent, final.prompt_tokens, final.completion_tokens)
            return final.text
        answers = await asyncio.gather(*(sample(messages, i) for _, messages in prompts for i in range(k)))
        samples = {key: (messages, list(answers[j * k:(j + 1) * k])) for j, (key, messages) in enumerate(prompts)}
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
        p = request.oracle_fraction if request.HasField("oracle_fraction") else 0.8
        if not 0 <= p <= 1:
            raise StatusError("INVALID_ARGUMENT", "oracle_fraction must be between 0 and 1")
        ns = agent.agent_id
        memory = self.k.memory
        oracles = await asyncio.to_thread(memory.get, ns, list(dict.fromkeys(it.oracle_id for it in items)))
        text = {r.id: r.text for r in oracles}
        pool = [(r.id, r.text) for r in await asyncio.to_thread(memory.documents, ns)]
        if len(pool) < n_distract + 1:
            raise StatusError("FAILED_PRECONDITION", f"memory holds {len(pool)} documents; {n_distract} distractors "
                                                     "plus the oracle need more")
        rag = [ds.RagItem(it.question, it.oracle_id, text[it.oracle_id], it.answer) for it in items]
        return ds.build_rag(rag, pool, n_distract, p, request.seed, frac)

    # -- jobs ----------------------------------------------------------------------------------------------
    @syscall
    async def StartFinetune(self, request, context):
        agent = current_agent()
        from kernos.storage.adapters import NAME_RE

        if not NAME_RE.match(request.name):
            raise StatusError("INVALID_ARGUMENT", "adapter names are 1-64 characters of a-z, 0-9, '_', '.', '-'")
        if not DATASET_NAME.match(request.dataset):
            raise StatusError("INVALID_ARGUMENT", "dataset: the name of a data set built with BuildDataset")
        if not 0 <= request.min_improvement < 1:
            raise StatusError("INVALID_ARGUMENT", "min_improvement is a fraction of the base loss, in [0, 1)")
        try:
            raw = json.loads(request.config_json or "{}")
            if not isinstance(raw, dict):
                raise ValueError("config_json must be a JSON object")
            cfg = TrainConfig(**raw)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}" for x in e.errors()[:5])
            raise StatusError("INVALID_ARGUMENT", f"config_json: {errs}") from None
        except ValueError as e:
            raise StatusError("INVALID_ARGUMENT", f"config_json: {e}") from None
        model = self._model(agent, request.model)
        path = getattr(getattr(model.engine, "lm", None), "path", None)
        if path is None:
            raise StatusError("FAILED_PRECONDITION", f"model '{model.name}' is not a transformers model; it cannot be fine-tuned")
        active = [j for j in self.k.tuner.list(agent.agent_id) if j.state not in FINAL]
        if len(active) >= self.k.config.tuner.max_queued_per_agent:
            raise StatusError("RESOURCE_EXHAUSTED", f"{len(active)} jobs of '{agent.agent_id}' are queued or running "
                                                    f"(tuner.max_queued_per_agent)")
        train = await self._rows(agent.agent_id, f"datasets/{request.dataset}.train.jsonl")
        evals = await self._rows(agent.agent_id, f"datasets/{request.dataset}.eval.jsonl")
        if not train:
            raise StatusError("FAILED_PRECONDITION", f"data set '{request.dataset}' has no training examples")
        if not evals:
            raise StatusError("FAILED_PRECONDITION", f"data set '{request.dataset}' has no held-out examples: "
                                                     "publishing needs them to compare with the base model")
        if len(train) > self.k.config.tuner.max_examples:
            raise StatusError("RESOURCE_EXHAUSTED", f"{len(train)} examples; the limit is tuner.max_examples")
        job = Job(job_id="", owner=agent.agent_id, name=request.name, dataset=request.dataset, model=model.name,
                  model_path=str(path), config=cfg.model_dump(), set_default=request.set_default,
                  min_improvement=request.min_improvement)
        job = await asyncio.to_thread(self.k.tuner.submit, job, train, evals)
        self.k.traces.record(TraceRecord(agent.agent_id, "tuner.start", "OK",
                                         {"name": request.name, "dataset": request.dataset, "model": model.name},
                                         {"job_id": job.job_id}, {}))
        return job_message(job)

    async def _rows(self, agent_id: str, path: str) -> list[dict]:
        _, data = await asyncio.to_thread(self.k.files.read, agent_id, path)
        rows = []
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise StatusError("INVALID_ARGUMENT", f"{path}:{n}: not JSON") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                    for m in msgs) or msgs[-1]["role"] != "assistant":
                raise StatusError("INVALID_ARGUMENT", f"{path}:{n}: needs 'messages' ending with the assistant's reply")
            rows.append(row)
        return rows

    def _job(self, agent, job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise StatusError("INVALID_ARGUMENT", "job_id must be the 16 hex characters StartFinetune returned")
        job = self.k.tuner.get(job_id)
        if job is None or (job.owner != agent.agent_id and not _admin(agent)):
            raise StatusError("NOT_FOUND", f"no job '{job_id}'")
        return job

    @syscall
    async def GetJob(self, request, context):
        return job_message(self._job(current_agent(), request.job_id))

    @syscall
    async def ListJobs(self, request, context):
        agent = current_agent()
        if request.all_agents and not _admin(agent):
            raise StatusError("PERMISSION_DENIED", "only operators list every agent's jobs")
        jobs = self.k.tuner.list(None if request.all_agents else agent.agent_id)
        return pb.JobList(jobs=[job_message(j) for j in jobs])

    @syscall
    async def CancelJob(self, request, context):
        agent = current_agent()
        job = self._job(agent, request.job_id)
        job = await asyncio.to_thread(self.k.tuner.cancel, job.job_id)
        return job_message(job)

    # -- adapters ------------------------------------------------------------------------------------------
    @syscall
    async def ListAdapters(self, request, context):
        agent = current_agent()
        versions = await asyncio.to_thread(self.k.adapters.versions, None if _admin(agent) else agent.agent_id)
        newest = {(v.owner, v.name): v.version for v in versions}     # versions come in ascending order
        out = []
        for v in versions:
            served = self.k.llm.models.get(v.model)
            current = v.version == newest[(v.owner, v.name)]
            out.append(pb.Adapter(name=v.served_name, owner=v.owner, version=v.version, model=v.model,
                                  base=_eval(v.metrics.get("base", {})), tuned=_eval(v.metrics.get("tuned", {})),
                                  job_id=v.job_id, created=v.created,
                                  loaded=current and bool(served) and v.served_name in served.adapters,
                                  is_default=current and self.k.adapters.default(agent.agent_id, v.model) == v.served_name))
        return pb.AdapterList(adapters=out)

    @syscall
    async def SetDefaultAdapter(self, request, context):
        agent = current_agent()
        model = self._model(agent, request.model)
        if request.adapter:
            if request.adapter not in model.adapters:
                raise StatusError("NOT_FOUND", f"model '{model.name}' serves no adapter '{request.adapter[:130]}'; "
                                               f"loaded: {model.adapters}")
            allowed, capability, reason = self.k.access.decide_named(agent.agent_id, "model",
                                                                     f"{model.name}/{request.adapter}")
            if not allowed:
                raise StatusError("PERMISSION_DENIED", f"missing capability {capability}: {reason}")
        await asyncio.to_thread(self.k.adapters.set_default, agent.agent_id, model.name, request.adapter)
        return pb.DefaultAdapterReply(model=model.name, adapter=request.adapter)
