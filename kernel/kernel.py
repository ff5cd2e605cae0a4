"""The kernel object: configuration, agent registry, trace log and LLM core, composed once and shared by
the servicers. It knows nothing of gRPC transport; `server.py` does."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from .access import RULES as RULES_AUDITED
from .access import AccessControl
from .agents import AgentRegistry
from .config import KernelConfig
from .llm.core import LLMCore
from .llm.types import AdapterInUse
from .quotas import Limits, Quotas
from .tuner.jobs import Job, JobManager
from .tuner.publish import beats_base
from kernos.memory.context import ContextStore
from kernos.storage.adapters import AdapterStore, AdapterVersion
from kernos.storage.files import FileStore
from kernos.storage.traces import TraceLog, TraceRecord

log = logging.getLogger("kernos.kernel")
VERSION = "0.1.0"


class Kernel:
    def __init__(self, config: KernelConfig):
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.agents = AgentRegistry(config.data_dir / "kernel.db", ttl_s=config.server.agent_ttl_s)
        self.traces = TraceLog(config.data_dir / "traces.db")
        self.access = AccessControl(config.data_dir / "access.db", config.server.admin_token, self._resolve)
        self.audit = TraceLog(config.data_dir / "audit.db")  # every access decision, same guarantees
        q = config.quotas
        self.quotas = Quotas(Limits(q.requests_per_second, q.tokens_per_minute, q.concurrent_generations),
                             {a: Limits(x.requests_per_second, x.tokens_per_minute, x.concurrent_generations)
                              for a, x in q.agents.items()})
        self.files = FileStore(config.data_dir / "files", config.storage.quota_bytes, config.storage.max_file_bytes)
        self.contexts = ContextStore(config.data_dir / "contexts.db")
        from .tools import ToolManager

        self.tools = ToolManager(self, config.tools.confirm_timeout_s)
        self._memory = None
        self._memory_lock = threading.Lock()
        self.llm = LLMCore(config)
        self.access.default_model = self.llm.default
        self.adapters = AdapterStore(config.data_dir / "adapters")
        for v in self.adapters.latest():       # published adapters are served again after a restart
            self._serve_adapter(v)
        t = config.tuner
        self.tuner = JobManager(config.data_dir / "tuner", self._finish_job, max_jobs=t.max_jobs,
                                threads=t.threads or max(1, (os.cpu_count() or 2) // 2), nice=t.nice)
        self.tuner.pump()                      # jobs interrupted by a stop resume from their checkpoints
        self.stopping = False
        self.in_flight = 0
        self.syscalls = 0

    @property
    def memory(self):
        """Long-term vector memory, opened on first use (chromadb and the embedding model take seconds)."""
        with self._memory_lock:
            if self._memory is None:
                from kernos.memory.vector import VectorMemory

                url = self.config.memory.chroma_url
                http = None
                if url:
                    host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
                    http = (host, int(port))
                self._memory = VectorMemory(self.config.data_dir / "chroma", http=http,
                                            max_entries=self.config.memory.max_entries)
            return self._memory

    def _resolve(self, kind: str, name: str) -> tuple[str, bool]:
        """For access control: a tool's owner and whether it is private; whether a model/adapter is restricted."""
        if kind == "tool":
            tool = self.tools.tools.get(name)
            return (tool.owner, not tool.public) if tool else ("kernel", False)
        model, _, adapter = name.partition("/")
        served = self.llm.get(model)
        cfg = {m.name: m for m in self.config.effective_models()}.get(served.name if served else model)
        if cfg is None:
            return "kernel", False
        if ":" in adapter:                 # a published adapter, OWNER:NAME: private to its owner unless granted
            return adapter.split(":", 1)[0], True
        return "kernel", (adapter in cfg.restricted_adapters) if adapter else cfg.restricted

    # -- adapters and fine-tuning jobs ------------------------------------------------------------------
    def _serve_adapter(self, v: AdapterVersion) -> bool:
        served = self.llm.models.get(v.model)
        if served is None or not hasattr(served.engine, "load_adapter"):
            log.warning("adapter %s v%d: model '%s' is not served; not loaded", v.served_name, v.version, v.model)
            return False
        deadline = time.monotonic() + 300
        while True:
            try:
                served.engine.load_adapter(v.served_name, v.path).result(timeout=300)
                return True
            except AdapterInUse:            # the previous version still serves requests
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _finish_job(self, job: Job, result: dict) -> tuple[str, str]:
        """Publish a trained adapter if it beats the base, hot-load it, and make it the default if asked."""
        better, why = beats_base(result["base"], result["tuned"], job.min_improvement)
        if not better:
            return "rejected", why
        v = self.adapters.publish(job.owner, job.name, job.model, Path(result["adapter"]),
                                  {"base": result["base"], "tuned": result["tuned"], "steps": result["step"]},
                                  job.job_id)
        job.adapter, job.version = v.served_name, v.version
        if not self._serve_adapter(v):
            return "published", f"{why}; stored as {v.served_name} v{v.version}, but its model is not served now"
        if job.set_default:
            self.adapters.set_default(job.owner, job.model, v.served_name)
        return "published", f"{why}; serving {job.model}/{v.served_name} v{v.version}" + (
            " as the agent's default" if job.set_default else "")

    def default_adapter(self, agent_id: str, model) -> str | None:
        """The adapter an agent's generation on `model` uses when it names none (still access-checked)."""
        name = self.adapters.default(agent_id, model.name)
        if not name or name not in model.adapters:
            return None
        allowed, _, _ = self.access.decide_named(agent_id, "model", f"{model.name}/{name}")
        return name if allowed else None

    def authenticate(self, token: str | None):
        """The principal behind a token: an operator (admin token) or a registered agent."""
        return self.access.operator(token) or self.agents.authenticate(token)

    def authorize(self, principal, method: str, request) -> str | None:
        """The one access check of every syscall: None to allow, or the PERMISSION_DENIED message. Every
        decision goes to the audit log."""
        from .quotas import QuotaExceeded

        try:
            self.quotas.request(principal.agent_id)
        except QuotaExceeded as e:
            self.audit.record(TraceRecord(principal.agent_id, method, "DENY", {"capability": "rate"},
                                          {"reason": str(e)}, {}))
            raise
        allowed, capability, reason = self.access.decide(principal, method, request)
        if method in RULES_AUDITED or not allowed:
            self.audit.record(TraceRecord(principal.agent_id, method, "ALLOW" if allowed else "DENY",
                                          {"capability": capability}, {"reason": reason}, {}))
        return None if allowed else f"missing capability {capability}: {reason}"

    @staticmethod
    def namespace(agent, requested: str) -> str:
        """The vector-memory namespace a call uses (another agent's only past the access check)."""
        return requested or agent.agent_id

    @contextlib.contextmanager
    def track(self):
        """Count a syscall in flight (the drain waits for these)."""
        self.in_flight += 1
        self.syscalls += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def drain(self, timeout: float) -> bool:
        """Stop accepting generations and let running ones finish within `timeout` (blocking)."""
        self.stopping = True
        clean = self.llm.drain(timeout)
        log.info("engines drained (%s)", "all finished" if clean else "timeout: the rest were cancelled")
        return clean

    def close(self) -> None:
        self.tuner.shutdown()
        self.adapters.close()
        self.audit.close()
        self.access.close()
        self.contexts.close()
        self.files.close()
        self.traces.close()
        self.agents.close()
