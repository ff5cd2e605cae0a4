"""The tuner syscalls: outcomes on traced generations, fine-tuning jobs (queued to the job manager, which
trains in a worker and publishes through `kernos.kernel.tuner.publish`), and an agent's adapters."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from kernos.abi.errors import StatusError
from kernos.storage.adapters import NAME_RE

from ..tuner.combine import CombineError, check_start
from ..tuner.config import TrainConfig
from ..tuner.continual import ContinualSpec
from ..tuner.datasets import prompt_key
from ..tuner.jobs import FINAL, Job
from ..tuner.preference_data import METHODS, check_rows
from .datasets import DATASET_NAME, agent_adapter, served_model


@dataclass
class Outcome:
    """Feedback on one generation: a reward, a success flag, a preferred reply (any of them), a note."""
    request_id: str
    reward: float | None = None
    success: bool | None = None
    note: str = ""
    preferred: str = ""


@dataclass
class FinetuneSpec:
    name: str
    dataset: str
    model: str = ""
    config_json: str = ""
    set_default: bool = False
    min_improvement: float = 0.0
    method: str = ""            # "sft" | "dpo" | "kto"; empty: the data set's own
    start_from: str = ""        # "": the base; "current": the agent's default adapter; NAME: its adapter NAME


def json_model(cls, text: str, field: str, whole: str):
    """`text`, a JSON object, as the pydantic model `cls`; else INVALID_ARGUMENT naming `field` and the bad keys
    (`whole` where the object as a whole is wrong)."""
    try:
        raw = json.loads(text or "{}")
        if not isinstance(raw, dict):
            raise ValueError(f"{field} must be a JSON object")
        return cls(**raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or whole}: {x['msg']}" for x in e.errors()[:5])
        raise StatusError("INVALID_ARGUMENT", f"{field}: {errs}") from None
    except ValueError as e:
        raise StatusError("INVALID_ARGUMENT", f"{field}: {e}") from None


REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
MAX_PREFERRED = 64 * 1024


class Tuner:
    def __init__(self, traces, files, jobs, store, llm, access, config, continual=None):
        self.traces = traces
        self.files = files
        self.jobs = jobs
        self.store = store  # the adapter store
        self.llm = llm
        self.access = access
        self.config = config  # TunerConfig
        self.continual = continual  # kernos.kernel.tuner.continual.Continual

    async def feedback(self, agent, request: Outcome) -> int:
        """Attach an outcome to one of the agent's traced generations; how many outcomes it now has."""
        if not REQUEST_ID.match(request.request_id):
            raise StatusError("INVALID_ARGUMENT", "request_id must be the 32 hex characters of a generation's reply")
        reward = request.reward if request.reward is not None else None
        success = request.success if request.success is not None else None
        if reward is None and success is None and not request.preferred:
            raise StatusError("INVALID_ARGUMENT", "give a reward, a success flag, a preferred reply, or several")
        if reward is not None and not math.isfinite(reward):
            raise StatusError("INVALID_ARGUMENT", "reward must be a finite number")
        if len(request.preferred.encode()) > MAX_PREFERRED or (request.preferred and not request.preferred.strip()):
            raise StatusError("INVALID_ARGUMENT", f"preferred must be non-blank text of at most {MAX_PREFERRED} bytes")
        for _ in range(40):  # the trace writer is asynchronous: a generation just answered may be a moment away
            if await asyncio.to_thread(self.traces.has_generation, agent.agent_id, request.request_id):
                break
            await asyncio.sleep(0.05)
        else:
            raise StatusError("NOT_FOUND", f"no generation '{request.request_id}' of '{agent.agent_id}' in the traces")
        n = await asyncio.to_thread(
            self.traces.add_outcome,
            agent.agent_id,
            request.request_id,
            reward,
            success,
            request.note,
            request.preferred or None,
        )
        return n

    # -- jobs ----------------------------------------------------------------------------------------------
    async def start(self, agent, request: FinetuneSpec) -> Job:
        """Queue a fine-tuning job on one of the agent's data sets."""
        if not NAME_RE.match(request.name):
            raise StatusError("INVALID_ARGUMENT", "adapter names are 1-64 characters of a-z, 0-9, '_', '.', '-'")
        if not DATASET_NAME.match(request.dataset):
            raise StatusError("INVALID_ARGUMENT", "dataset: the name of a data set built with BuildDataset")
        if not 0 <= request.min_improvement < 1:
            raise StatusError("INVALID_ARGUMENT", "min_improvement is a fraction of the base loss, in [0, 1)")
        cfg = json_model(TrainConfig, request.config_json, "config_json", "config")
        model = served_model(self.llm, self.access, agent, request.model)
        path = model.path
        if path is None:
            raise StatusError(
                "FAILED_PRECONDITION", f"model '{model.name}' is not a transformers model; it cannot be fine-tuned"
            )
        active = [j for j in self.jobs.list(agent.agent_id) if j.state not in FINAL]
        if len(active) >= self.config.max_queued_per_agent:
            raise StatusError(
                "RESOURCE_EXHAUSTED",
                f"{len(active)} jobs of '{agent.agent_id}' are queued or running (tuner.max_queued_per_agent)",
            )
        train = await self._rows(agent.agent_id, f"datasets/{request.dataset}.train.jsonl")
        evals = await self._rows(agent.agent_id, f"datasets/{request.dataset}.eval.jsonl")
        if not train:
            raise StatusError("FAILED_PRECONDITION", f"data set '{request.dataset}' has no training examples")
        if not evals:
            raise StatusError(
                "FAILED_PRECONDITION",
                f"data set '{request.dataset}' has no held-out examples: "
                "publishing needs them to compare with the base model",
            )
        method = request.method or await self._method_of(agent.agent_id, request.dataset)
        if method not in ("sft",) + METHODS:
            raise StatusError("INVALID_ARGUMENT", f"method '{method[:32]}': one of 'sft', 'dpo', 'kto', 'grpo'")
        for rows, part in ((train, "train"), (evals, "eval")):
            if method != "sft" and (why := check_rows(rows, method)):
                raise StatusError("FAILED_PRECONDITION", f"datasets/{request.dataset}.{part}.jsonl: {why}")
        if len(train) > self.config.max_examples:
            raise StatusError("RESOURCE_EXHAUSTED", f"{len(train)} examples; the limit is tuner.max_examples")
        start_from, start = "", None
        if request.start_from:
            start_from, start = await asyncio.to_thread(self._start_adapter, agent, model, request.start_from)
        job = Job(
            job_id="",
            owner=agent.agent_id,
            name=request.name,
            dataset=request.dataset,
            model=model.name,
            model_path=str(path),
            config=cfg.model_dump(),
            set_default=request.set_default,
            min_improvement=request.min_improvement,
            method=method,
            start_from=start_from,
        )
        r = self.config.retention
        replay = await self._replay(agent.agent_id, train + evals, r.replay_prompts) if r.enabled else []
        retention = {"generic": r.generic_prompts, "reply_tokens": r.reply_tokens} if r.enabled else None
        return await asyncio.to_thread(self.jobs.submit, job, train, evals, replay, retention, start)

    def _start_adapter(self, agent, model, which: str) -> tuple[str, Path]:
        """The adapter a job continues from ("OWNER:NAME vN", its folder): "current" (the agent's default adapter on
        the model) or one of the agent's own adapters by name (its newest version)."""
        owner, _, short = agent_adapter(self.store.default, agent, model, which).rpartition(":")
        if owner != agent.agent_id:
            raise StatusError("PERMISSION_DENIED", "a job continues from the agent's own adapters only")
        versions = [v for v in self.store.versions(agent.agent_id) if v.name == short and v.model == model.name]
        if not versions:
            raise StatusError("NOT_FOUND", f"no adapter '{short[:64]}' of '{agent.agent_id}' on '{model.name}'")
        v = versions[-1]
        folder = self.store.local(v)
        try:
            check_start(folder)
        except CombineError as e:
            raise StatusError("FAILED_PRECONDITION", f"start_from '{which[:64]}': {e}") from None
        return f"{v.served_name} v{v.version}", folder

    async def _replay(self, agent_id: str, rows: list[dict], n: int) -> list[dict]:
        """Up to `n` of the agent's most recent distinct traced prompts that the data set does not hold (role
        and content of each message), read a page at a time and kept `n` at most."""
        if n <= 0:
            return []

        def plain(messages):
            return [{"role": m.get("role", "user"), "content": m.get("content") or ""} for m in messages]
        taken = {prompt_key(plain(r["messages"][:-1])) for r in rows}

        def scan():
            recent: OrderedDict[str, list[dict]] = OrderedDict()
            for t in self.traces.scan(agent_id, "llm.generate"):
                messages = plain(t.request.get("messages") or [{"role": "user", "content": t.request.get("prompt")}])
                key = prompt_key(messages)
                if key in taken:
                    continue
                recent[key] = messages
                recent.move_to_end(key)
                if len(recent) > n:
                    recent.popitem(last=False)
            return [{"messages": m} for m in recent.values()]
        return await asyncio.to_thread(scan)

    async def _method_of(self, agent_id: str, dataset: str) -> str:
        """A data set's default method: its kind for dpo and kto data sets, else sft."""
        try:
            _, data = await asyncio.to_thread(self.files.read, agent_id, f"datasets/{dataset}.card.json")
            kind = json.loads(data).get("kind")
        except (StatusError, ValueError, AttributeError):
            return "sft"            # a data set written by hand, without a card
        return kind if kind in METHODS else "sft"

    async def _rows(self, agent_id: str, path: str) -> list[dict]:
        _, data = await asyncio.to_thread(self.files.read, agent_id, path)
        rows = []
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise StatusError("INVALID_ARGUMENT", f"{path}:{n}: not JSON") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if (
                not isinstance(msgs, list)
                or not msgs
                or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                    for m in msgs
                )
                or msgs[-1]["role"] != "assistant"
            ):
                raise StatusError("INVALID_ARGUMENT", f"{path}:{n}: needs 'messages' ending with the assistant's reply")
            rows.append(row)
        return rows

    def _job(self, agent, job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise StatusError("INVALID_ARGUMENT", "job_id must be the 16 hex characters StartFinetune returned")
        job = self.jobs.get(job_id)
        if job is None or (job.owner != agent.agent_id and not agent.operator):
            raise StatusError("NOT_FOUND", f"no job '{job_id}'")
        return job

    async def job(self, agent, job_id: str) -> Job:
        return await asyncio.to_thread(self._job, agent, job_id)

    async def list_jobs(self, agent, all_agents: bool) -> list[Job]:
        if all_agents and not agent.operator:
            raise StatusError("PERMISSION_DENIED", "only operators list every agent's jobs")
        return await asyncio.to_thread(self.jobs.list, None if all_agents else agent.agent_id)

    async def cancel(self, agent, job_id: str) -> Job:
        job = await self.job(agent, job_id)
        return await asyncio.to_thread(self.jobs.cancel, job.job_id)

    # -- adapters ------------------------------------------------------------------------------------------
    async def adapters(self, agent) -> list[tuple]:
        """[(AdapterVersion, loaded, is_default)] of the agent's adapters (every agent's, for operators)."""
        versions = await asyncio.to_thread(self.store.versions, None if agent.operator else agent.agent_id)
        newest = {(v.owner, v.name): v.version for v in versions}  # versions come in ascending order
        out = []
        for v in versions:
            served = self.llm.models.get(v.model)
            current = v.version == newest[(v.owner, v.name)]
            loaded = current and bool(served) and v.served_name in served.adapters
            out.append((v, loaded, current and self.store.default(agent.agent_id, v.model) == v.served_name))
        return out

    async def continual_tuning(self, agent, spec_json: str) -> dict | None:
        """Configure the agent's continual tuning (a ContinualSpec as JSON; empty: only read); its state."""
        if spec_json:
            spec = json_model(ContinualSpec, spec_json, "continual", "spec")
            if spec.enabled:
                served_model(self.llm, self.access, agent, spec.model)
            st = await asyncio.to_thread(self.continual.configure, agent.agent_id, spec)
        else:
            st = self.continual.state(agent.agent_id)
        return asdict(st) if st is not None else None

    async def set_default_adapter(self, agent, model_name: str, adapter: str) -> str:
        """Make `adapter` (or none, when empty) the one the agent's generations on the model use by default;
        returns the model's name."""
        model = served_model(self.llm, self.access, agent, model_name)
        if adapter:
            if adapter not in model.adapters:
                raise StatusError(
                    "NOT_FOUND", f"model '{model.name}' serves no adapter '{adapter[:130]}'; loaded: {model.adapters}"
                )
            self.access.authorize_model(agent, model.name, adapter)
        await asyncio.to_thread(self.store.set_default, agent.agent_id, model.name, adapter)
        return model.name
