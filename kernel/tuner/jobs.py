"""Fine-tuning jobs: a durable queue (SQLite), worker processes, progress, cancel and resume.

A job's life: queued -> running -> published | rejected (did not beat the base) | failed | cancelled.
Each running job is one worker process (`worker.py`), niced so that the serving threads win the CPU,
watched by one supervisor thread that turns its JSON lines into the job's progress. When the kernel stops,
running workers checkpoint and the jobs go back to `queued`; at the next start they resume from their
checkpoint. A finished worker leaves `result.json`, so a kernel that dies between the end of training and
the publication publishes at its next start without training again.

In a cluster (`db` a PostgreSQL schema, `shared` a `SharedJobs`) the jobs are one table for every node: each
row names the node running it and lists its folder's files in the object store (inputs at once, then each whole
checkpoint); a node adopts the jobs of a node whose lease expired and resumes them from their checkpoints."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kernos.storage.db import Where, connect, upsert
from kernos.storage.durable import fsync_tree

from .shared_jobs import SharedJobs

log = logging.getLogger("kernos.tuner")


STATES = ("queued", "running", "published", "rejected", "failed", "cancelled")
FINAL = {"published", "rejected", "failed", "cancelled"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, dataset TEXT NOT NULL,
    model TEXT NOT NULL, state TEXT NOT NULL, record TEXT NOT NULL, created REAL NOT NULL,
    node TEXT NOT NULL DEFAULT '', files TEXT NOT NULL DEFAULT '{}'   -- a cluster: who runs it, its folder's blobs
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs(owner, created);
"""


MAX_POINTS = 2000


@dataclass
class Job:
    job_id: str
    owner: str
    name: str  # the adapter's name
    dataset: str
    model: str
    model_path: str
    config: dict
    set_default: bool = False
    min_improvement: float = 0.0
    method: str = "sft"  # sft | dpo | kto | grpo
    start_from: str = ""  # the adapter it continued from ("OWNER:NAME vN"; "": the base)
    state: str = "queued"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    steps_per_s: float = 0.0
    eta_s: float | None = None
    base: dict = field(default_factory=dict)  # evaluation before: loss, accuracy, examples
    tuned: dict = field(default_factory=dict)  # and after
    retention: dict = field(default_factory=dict)  # the adapter against the base off its task (tuner.retention)
    adapter: str = ""  # the served name once published: OWNER:NAME
    version: int = 0
    message: str = ""
    peak_rss_mb: float = 0.0
    cancel_requested: bool = False
    resumed_from_step: int = 0
    loss_history: list = field(default_factory=list)  # [[step, loss]], thinned to at most MAX_POINTS
    created: float = field(default_factory=time.time)
    started: float = 0.0
    finished: float = 0.0


class JobManager:
    """`finish(job, result) -> (state, message)` publishes a trained adapter (or rejects it); it runs on the
    job's supervisor thread."""

    def __init__(self, root: Path, finish, max_jobs: int = 1, threads: int = 0, nice: int = 10,
                 db: Where | None = None, shared: SharedJobs | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.finish = finish
        self.max_jobs = max_jobs
        self.threads = threads
        self.nice = nice
        self.shared = shared
        self.node = shared.node_id if shared is not None else ""
        self._db = connect(db or self.root / "jobs.db", synchronous="FULL")
        self._db.executescript(_SCHEMA)
        for column in ("node", "files"):                   # a data dir of an older kernel
            if column not in self._db.columns("jobs"):
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT NOT NULL DEFAULT "
                                 + ("''" if column == "node" else "'{}'"))
        self._lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self._files: dict[str, dict] = {}                    # job -> its folder's manifest (a cluster)
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._closing = False
        for (record,) in self._db.execute("SELECT record FROM jobs WHERE node=? ORDER BY created", (self.node,)):
            job = Job(**json.loads(record))
            if job.state == "running":  # the kernel stopped under it: resume from its checkpoint
                job.state, job.message = "queued", "resuming after a kernel restart"
                self._save(job)
            self.jobs[job.job_id] = job

    # -- public ------------------------------------------------------------------------------------------
    def submit(self, job: Job, train_rows: list[dict], eval_rows: list[dict], replay: list[dict] | None = None,
               retention: dict | None = None, start: Path | None = None) -> Job:
        """Queue a job; `replay` (prompts of the agent's other traces) and `retention` ({"generic",
        "reply_tokens"}; None: not measured) are what the worker measures retention on; `start`: the folder of
        the adapter it continues from (copied into the job's folder as `start/`)."""
        job.job_id = job.job_id or secrets.token_hex(8)
        d = self.dir(job)
        d.mkdir(parents=True)
        if start is not None:
            shutil.copytree(start, d / "start")
        for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows), ("replay.jsonl", replay or [])):
            (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (d / "job.json").write_text(
            json.dumps(
                {
                    "model_path": job.model_path,
                    "config": job.config,
                    "method": job.method,
                    "retention": retention,
                    # a job may ask for fewer threads than the kernel's tuner.threads, never more (one asked for 28)
                    "threads": min(job.config.get("threads") or self.threads, self.threads),
                }
            )
        )
        fsync_tree(d)
        if self.shared is not None:                        # another node can take it over from the first step
            self._files[job.job_id] = self.shared.upload(job.job_id, d) or {}
        with self._lock:
            self.jobs[job.job_id] = job
            self._save(job)
        self.pump()
        return job

    def adopt(self) -> list[str]:
        """A cluster: take over the unfinished jobs of nodes whose lease expired (one node wins each, by one
        statement), fetch their folders and queue them to resume from their checkpoints. Called at heartbeats."""
        if self.shared is None or self._closing:
            return []
        taken = []
        rows = self._db.execute("SELECT job_id, node, record, files FROM jobs WHERE state IN ('queued', 'running') "
                                "AND node <> ?", (self.node,)).fetchall()
        for job_id, node, record, files in rows:
            if not self.shared.orphaned(node):
                continue
            won = self._db.execute("UPDATE jobs SET node=?, state='queued' WHERE job_id=? AND node=? RETURNING "
                                   "job_id", (self.node, job_id, node)).fetchone()
            if won is None:
                continue                                   # another node took it first
            job = Job(**json.loads(record))
            d = self.dir(job)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            self.shared.fetch(json.loads(files), d)
            job.state, job.message = "queued", f"resuming on {self.node}: node {node} stopped answering"
            with self._lock:
                self.jobs[job_id], self._files[job_id] = job, json.loads(files)
                self._save(job)
            taken.append(job_id)
            log.info("tuner job %s: adopted from node %s", job_id, node)
        if taken:
            self.pump()
        return taken

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None and self.shared is not None:       # running (or run) on another node
            row = self._db.execute("SELECT record FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            job = Job(**json.loads(row[0])) if row else None
        return job

    def list(self, owner: str | None = None) -> list[Job]:
        with self._lock:
            mine = [j for j in self.jobs.values() if owner is None or j.owner == owner]
        if self.shared is None:
            return mine
        seen = {j.job_id for j in mine}                    # and the cluster's other nodes' jobs, as recorded
        q = "SELECT record FROM jobs WHERE node <> ?" + (" AND owner=?" if owner else "")
        others = [Job(**json.loads(r)) for (r,) in self._db.execute(q, (self.node, owner) if owner else (self.node,))]
        return mine + [j for j in others if j.job_id not in seen]

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.jobs[job_id]
            if job.state in FINAL:
                return job
            job.cancel_requested = True
            if job.state == "queued":
                job.state, job.message, job.finished = "cancelled", "cancelled before it started", time.time()
            else:
                (self.dir(job) / "cancel").touch()
                proc = self._procs.get(job_id)
                if proc and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                job.message = "cancelling at the next step"
            self._save(job)
            return job

    def pump(self) -> None:
        """Start queued jobs while fewer than max_jobs run."""
        with self._lock:
            if self._closing:
                return
            running = sum(1 for j in self.jobs.values() if j.state == "running")
            for job in sorted(self.jobs.values(), key=lambda j: j.created):
                if running >= self.max_jobs:
                    break
                if job.state == "queued":
                    job.state, job.started = "running", job.started or time.time()
                    self._save(job)
                    t = threading.Thread(target=self._supervise, args=(job,), name=f"tuner-{job.job_id}", daemon=True)
                    self._threads[job.job_id] = t
                    t.start()
                    running += 1

    def shutdown(self, timeout: float = 30.0) -> None:
        """Checkpoint and stop running workers; their jobs resume at the next start."""
        with self._lock:
            self._closing = True
            procs = list(self._procs.values())
            threads = list(self._threads.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.poll() is None:
                p.kill()

    def dir(self, job: Job) -> Path:
        return self.root / "jobs" / job.job_id

    # -- internals ---------------------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        with self._lock, self._db:
            self._db.execute(
                upsert("jobs", ("job_id", "owner", "name", "dataset", "model", "state", "record", "created", "node",
                                "files"), ("job_id",)),
                (
                    job.job_id,
                    job.owner,
                    job.name,
                    job.dataset,
                    job.model,
                    job.state,
                    json.dumps(asdict(job)),
                    job.created,
                    self.node,
                    json.dumps(self._files.get(job.job_id, {})),
                ),
            )

    def _supervise(self, job: Job) -> None:
        d = self.dir(job)
        try:
            if (d / "result.json").exists():  # trained before a crash; publish without training again
                self._finish(job, json.loads((d / "result.json").read_text()))
                return
            # No preexec_fn: forking a threaded process (gRPC) and running Python before exec can crash; the
            # worker renices itself and asks for a parent-death signal (it checkpoints on SIGTERM).
            env = dict(
                os.environ,
                PYTHONUNBUFFERED="1",
                _KERNOS_WORKER_PARENT=str(os.getpid()),
                _KERNOS_WORKER_NICE=str(self.nice),
            )
            cmd = [sys.executable, "-m", "kernos.kernel.tuner.worker", str(d)]
            with open(d / "worker.log", "ab") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=d, text=True)
            with self._lock:
                self._procs[job.job_id] = proc
            last_save = 0.0
            failure = ""
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    failure = self._apply(job, ev) or failure
                    save = time.monotonic() - last_save > 1.0 or ev.get("event") != "progress"
                if save and self.shared is not None:       # its last whole checkpoint, for another node
                    files = self.shared.upload(job.job_id, d)
                    if files is not None:
                        self._files[job.job_id] = files
                if save:
                    with self._lock:
                        self._save(job)
                        last_save = time.monotonic()
            code = proc.wait()
            with self._lock:
                self._procs.pop(job.job_id, None)
            if code == 0 and (d / "result.json").exists():
                self._finish(job, json.loads((d / "result.json").read_text()))
            elif job.cancel_requested:
                self._end(job, "cancelled", f"cancelled at step {job.step} of {job.total_steps}")
            elif self._closing:
                with self._lock:
                    job.state, job.message = (
                        "queued",
                        f"paused at step {job.step} by a kernel shutdown; resumes at restart",
                    )
                    self._save(job)
            else:
                tail = (d / "worker.log").read_text(errors="replace")[-800:] if (d / "worker.log").exists() else ""
                self._end(job, "failed", failure or f"worker exited with status {code}: {tail}")
        except Exception as e:  # noqa: BLE001 - a job's failure must not take the kernel down
            log.exception("tuner job %s", job.job_id)
            self._end(job, "failed", f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._threads.pop(job.job_id, None)
            self.pump()

    def _apply(self, job: Job, ev: dict) -> str:
        kind = ev.get("event")
        job.peak_rss_mb = max(job.peak_rss_mb, float(ev.get("rss_mb") or 0))
        if kind == "progress":
            job.step, job.total_steps = ev["step"], ev["total"]
            job.loss, job.steps_per_s, job.eta_s = ev["loss"], ev["steps_per_s"], ev["eta_s"]
            if ev["loss"] is not None and (not job.loss_history or job.loss_history[-1][0] < ev["step"]):
                job.loss_history.append([ev["step"], ev["loss"]])
                if len(job.loss_history) > MAX_POINTS:      # keep the curve's shape, not every step
                    job.loss_history = job.loss_history[::2] + ([job.loss_history[-1]]
                                                                if len(job.loss_history) % 2 == 0 else [])
            job.message = "training"
        elif kind == "eval":
            target = job.base if ev["phase"] == "base" else job.tuned
            target.update({k: ev.get(k) for k in ("loss", "accuracy", "examples")})
            job.message = "evaluated the base model" if ev["phase"] == "base" else "evaluated the adapter"
        elif kind == "retention":
            job.retention = {k: ev.get(k) for k in ("replay", "generic")}
            job.message = "measured retention against the base model"
        elif kind == "resumed":
            job.step, job.total_steps = ev["step"], ev["total"]
            job.message = f"resumed from the checkpoint at step {ev['step']}"
            job.resumed_from_step = ev["step"]
        elif kind == "failed":
            return ev.get("message", "failed")
        return ""

    def _finish(self, job: Job, result: dict) -> None:
        with self._lock:
            job.step, job.total_steps = result["step"], result["total"]
            job.base, job.tuned = dict(result["base"]), dict(result["tuned"])
            job.retention = dict(result.get("retention") or {})
        state, message = self.finish(job, result)
        self._end(job, state, message)

    def _end(self, job: Job, state: str, message: str) -> None:
        with self._lock:
            job.state, job.message, job.finished, job.eta_s = state, message, time.time(), None
            self._save(job)
        log.info("tuner job %s (%s/%s): %s: %s", job.job_id, job.owner, job.name, state, message)
