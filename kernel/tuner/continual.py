"""Continual tuning: an agent's fine-tuning that runs by itself, round after round.

Per agent that enabled it (`s.tuner.continual(...)`), a loop in the kernel:
1. idle: waits until `min_feedback` new outcomes (rewards, success flags, corrections) have arrived since the
   last round, then builds a data set of the configured kind from the agent's traces and queues a job on it;
2. training: the job trains in a worker; the publish rule and the retention gate decide as for any job. A
   rejected or failed job ends the round;
3. canary: a published candidate serves a `canary_share` of the agent's calls that name no adapter (the rest
   keep the current default); once each arm has `canary_calls` calls with live rewards (feedback on them:
   the reward, success counting 1 and failure 0), the candidate is promoted to the agent's default if its
   mean reward is no more than `max_drop` below the current one's, else rolled back (the current default
   stays).
Every step is in the agent's state (`s.tuner.continual()`, `kernos finetune continual`), the audit log
(`tuner.continual.round` records) and `/metrics`."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kernos.abi.errors import StatusError
from kernos.abi.trace import TraceRecord
from kernos.storage.db import Where, connect, upsert

from .config import TrainConfig
from .jobs import FINAL

log = logging.getLogger("kernos.tuner")
MAX_HISTORY = 50


class ContinualSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    kind: Literal["sft", "dpo", "kto", "grpo"] = "sft"
    reward: str = Field("", description="grpo: the reward spec (regex:..., json, exact, tool:NAME, ...)")
    model: str = ""
    min_feedback: int = Field(20, ge=1, le=1_000_000, description="new outcomes that start a round")
    min_reward: float | None = None
    eval_fraction: float = Field(0.2, gt=0, le=0.5)
    canary_share: float = Field(0.2, gt=0, lt=1, description="share of the agent's calls the candidate serves")
    canary_calls: int = Field(10, ge=1, le=100_000, description="rewarded calls per arm before deciding")
    max_drop: float = Field(0.0, ge=0, description="promote unless the candidate's mean reward is lower by more")
    config: dict = Field(default_factory=dict, description="the jobs' hyper-parameters (TrainConfig)")
    continue_from_current: bool = Field(False, description="once the agent has a default adapter, each round "
                                        "continues from it (its job's start_from) and a grpo round samples from it: "
                                        "on-policy rounds")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "grpo" and not self.reward:
            raise ValueError("kind 'grpo' needs reward")
        TrainConfig(**self.config)
        return self


@dataclass
class ContinualState:
    agent_id: str
    spec: dict
    phase: str = "idle"             # idle | training | canary
    round: int = 0
    job_id: str = ""
    model: str = ""
    candidate: str = ""             # the adapter in canary
    current: str = ""               # the default it is compared with ("": the base model)
    since: float = 0.0              # the canary's start
    mark: int = 0                   # outcomes counted when the last round started
    arms: dict = field(default_factory=dict)     # canary: {"candidate": [calls, mean], "current": [...]}
    message: str = ""
    history: list = field(default_factory=list)  # finished rounds, newest last
    updated: float = field(default_factory=time.time)


class Continual:
    """The loop (`run`), the agents' states, and the canary's routing (`default`, in place of the adapter
    store's, for the generate use case)."""

    def __init__(self, path: Where, store, traces, registry, audit=None, tick_s: float = 10.0, mine=None):
        """`mine(agent_id)`: in a cluster, whether this node is the agent's home; only the home runs its rounds
        (the states are shared, so a new home goes on where the old one was)."""
        self.store, self.traces, self.registry, self.audit, self.tick_s = store, traces, registry, audit, tick_s
        self.mine = mine
        self._owned: set[str] = set()
        self.build_dataset = self.start_job = self.jobs = None     # the use cases, once they exist (`bind`)
        self._lock = threading.Lock()
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(path, synchronous="FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS continual (agent_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        self.states = {a: ContinualState(**json.loads(r))
                       for a, r in self._db.execute("SELECT agent_id, record FROM continual")}

    def bind(self, build_dataset, start_job, jobs) -> None:
        """build_dataset(agent, **DatasetSpec fields) and start_job(agent, **FinetuneSpec fields): the use cases'
        coroutines; jobs: the job manager."""
        self.build_dataset, self.start_job, self.jobs = build_dataset, start_job, jobs

    # -- the syscall ---------------------------------------------------------------------------------------
    def configure(self, agent_id: str, spec: ContinualSpec) -> ContinualState:
        with self._lock:
            st = self.states.get(agent_id) or ContinualState(agent_id, {}, mark=self._outcomes(agent_id))
            st.spec = spec.model_dump()
            st.message = "enabled" if spec.enabled else "disabled"
            if not spec.enabled and st.phase == "canary":
                self._finish(st, "stopped", "continual tuning disabled during the canary; the default is unchanged")
            self._save(st)
            return st

    def state(self, agent_id: str) -> ContinualState | None:
        with self._lock:
            return self.states.get(agent_id)

    # -- routing -------------------------------------------------------------------------------------------
    def default(self, agent_id: str, model: str) -> str | None:
        """The adapter a call that names none gets: in a canary, the candidate for its share of calls."""
        st = self.states.get(agent_id)
        if st is not None and st.phase == "canary" and st.model == model and \
                random.random() < st.spec["canary_share"]:
            return st.candidate
        return self.store.default(agent_id, model)

    # -- the loop ------------------------------------------------------------------------------------------
    def _take_over(self) -> None:
        """A cluster: the states of the agents this node is now home to, as the database has them (their old home
        wrote them last); the others' kept only for reading."""
        rows = {a: r for a, r in self._db.execute("SELECT agent_id, record FROM continual")}
        owned = {a for a in rows if self.mine(a)}
        with self._lock:
            for agent_id, record in rows.items():
                if agent_id not in owned or agent_id not in self._owned:
                    self.states[agent_id] = ContinualState(**json.loads(record))
        self._owned = owned

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if self.mine is not None:
                await asyncio.to_thread(self._take_over)
            for agent_id in list(self.states):
                st = self.states[agent_id]
                if not st.spec.get("enabled") or (self.mine is not None and agent_id not in self._owned):
                    continue
                try:
                    await self.step(st)
                except StatusError as e:
                    self._finish(st, "skipped", f"{e.code}: {e.message}")
                except Exception as e:  # noqa: BLE001 - one agent's round must not stop the others'
                    log.exception("continual tuning of %s", agent_id)
                    self._finish(st, "failed", f"{type(e).__name__}: {e}")

    async def step(self, st: ContinualState) -> None:
        spec = ContinualSpec(**st.spec)
        agent = self.registry.get(st.agent_id)
        if agent is None:
            return
        if st.phase == "idle":
            n = await asyncio.to_thread(self._outcomes, st.agent_id)
            if n - st.mark < spec.min_feedback:
                self._update(st, message=f"waiting for feedback: {n - st.mark} of {spec.min_feedback} new outcomes")
                return
            st.round, st.mark = st.round + 1, n
            name = f"continual-{st.round}"
            current = "current" if spec.continue_from_current and st.model and \
                self.store.default(st.agent_id, st.model) else ""
            card, *_ = await self.build_dataset(agent, name=name, kind=spec.kind, eval_fraction=spec.eval_fraction,
                                                min_reward=spec.min_reward, reward=spec.reward, model=spec.model,
                                                adapter=current if spec.kind == "grpo" else "")
            job = await self.start_job(agent, name=name, dataset=name, model=spec.model,
                                       config_json=json.dumps(spec.config), start_from=current)
            self._update(st, phase="training", job_id=job.job_id, model=job.model,
                         message=f"round {st.round}: training {name} on {card['train']} examples")
            self._audit(st, "train", {"job_id": job.job_id, "dataset": name, "examples": card["train"]})
        elif st.phase == "training":
            job = self.jobs.get(st.job_id)
            if job is None or job.state not in FINAL:
                return
            if job.state != "published":
                self._finish(st, job.state, job.message)
                return
            current = self.store.default(st.agent_id, job.model) or ""
            self._update(st, phase="canary", candidate=job.adapter, current=current, since=time.time(),
                         arms={}, message=f"canary: {job.adapter} serves {spec.canary_share:.0%} of the calls")
            self._audit(st, "canary", {"candidate": job.adapter, "current": current})
        elif st.phase == "canary":
            arms = await asyncio.to_thread(self._arms, st)
            self._update(st, arms=arms)
            (nc, mc), (nb, mb) = arms["candidate"], arms["current"]
            if min(nc, nb) < spec.canary_calls:
                return
            if mc >= mb - spec.max_drop:
                self.store.set_default(st.agent_id, st.model, st.candidate)
                self._finish(st, "promoted", f"{st.candidate} mean reward {mc:.3f} over {nc} calls against "
                                             f"{mb:.3f} over {nb}: now the default")
            else:
                self._finish(st, "rolled_back", f"{st.candidate} mean reward {mc:.3f} over {nc} calls against "
                                                f"{mb:.3f} over {nb}: the default stays {st.current or 'the base'}")

    # -- internals -----------------------------------------------------------------------------------------
    def _outcomes(self, agent_id: str) -> int:
        return sum(len(v) for v in self.traces.outcomes(agent_id).values())

    def _arms(self, st: ContinualState) -> dict:
        """Calls since the canary began that named no adapter, by the adapter that served them: [rewarded calls,
        mean reward] of the candidate and of the current default."""
        served = {}
        for t in self.traces.scan(st.agent_id, "llm.generate"):
            if t.ts >= st.since and not t.request.get("adapter") and t.response.get("model") == st.model:
                served[t.response.get("request_id")] = t.response.get("adapter") or ""
        scores: dict[str, list[float]] = {"candidate": [], "current": []}
        for rid, outs in self.traces.outcomes(st.agent_id).items():
            arm = {st.candidate: "candidate", st.current: "current"}.get(served.get(rid, None))
            vals = [o["reward"] for o in outs if o.get("reward") is not None] + \
                   [1.0 if o["success"] else 0.0 for o in outs if o.get("success") is not None]
            if arm and vals and rid in served:
                scores[arm].append(sum(vals) / len(vals))
        return {k: [len(v), sum(v) / len(v) if v else 0.0] for k, v in scores.items()}

    def _finish(self, st: ContinualState, outcome: str, detail: str) -> None:
        with self._lock:
            st.history = (st.history + [{"round": st.round, "outcome": outcome, "detail": detail, "job_id": st.job_id,
                                         "candidate": st.candidate, "arms": st.arms, "at": time.time()}])[-MAX_HISTORY:]
            st.phase, st.candidate, st.arms, st.message = "idle", "", {}, f"round {st.round}: {outcome}: {detail}"
            self._save(st)
        self._audit(st, outcome, {"detail": detail})

    def _update(self, st: ContinualState, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(st, k, v)
            self._save(st)

    def _save(self, st: ContinualState) -> None:
        st.updated = time.time()
        self.states[st.agent_id] = st
        with self._db:
            self._db.execute(upsert("continual", ("agent_id", "record"), ("agent_id",)),
                             (st.agent_id, json.dumps(asdict(st))))

    def _audit(self, st: ContinualState, step: str, detail: dict) -> None:
        log.info("continual tuning of %s, round %d: %s %s", st.agent_id, st.round, step, detail)
        if self.audit is not None:
            reason = f"round {st.round}: {step}: " + ", ".join(f"{k} {v}" for k, v in detail.items())
            self.audit.record(TraceRecord(st.agent_id, "tuner.continual.round", "OK",
                                          {"capability": "tuner", "step": step, "round": st.round},
                                          {"reason": reason[:1000]}, {}))

    def counts(self) -> dict[str, int]:
        """Finished rounds by outcome, over all agents (for /metrics)."""
        out: dict[str, int] = {}
        for st in list(self.states.values()):
            for h in st.history:
                out[h["outcome"]] = out.get(h["outcome"], 0) + 1
        return out

    def close(self) -> None:
        self._db.close()
