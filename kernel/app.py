"""The composition root: builds every store, security service, engine and use case from the configuration,
once, and hands each the collaborators it uses. Transports (`api/`) get the use cases from here; nothing
else holds the whole kernel."""
from __future__ import annotations

import logging
import os
import threading
import time

from kernos.memory.context import ContextStore
from kernos.storage.adapters import AdapterStore
from kernos.storage.db import Databases
from kernos.storage.files import FileStore
from kernos.storage.responses import ResponseStore
from kernos.storage.traces import TraceLog

from .cluster.membership import Membership
from .cluster.nodes import Nodes
from .cluster.quotas import SharedQuotas
from .config import KernelConfig
from .llm.core import LLMCore
from .metrics import Metrics
from .security.access import AccessControl
from .security.enrollment import Enrollments
from .security.gate import Gate
from .security.principals import AgentRegistry
from .security.quotas import Limits, Quotas
from .security.registration import Registration
from .syscalls.access import Access
from .syscalls.agents import Agents
from .syscalls.datasets import Datasets, DatasetSpec
from .syscalls.files import Files
from .syscalls.generate import Generate
from .syscalls.lifecycle import Lifecycle
from .syscalls.memory import Memory
from .syscalls.models import Models
from .syscalls.pools import FairPool
from .syscalls.responses import Responses
from .syscalls.snapshots import SnapshotStore
from .syscalls.tuner import FinetuneSpec, Tuner
from .tools.manager import ToolManager
from .tools.registry import ToolStore
from .tuner.continual import Continual
from .tuner.jobs import JobManager
from .tuner.publish import Publisher
from .tuner.shared_jobs import SharedJobs

log = logging.getLogger("kernos.kernel")


class LazyVectorMemory:
    """Long-term vector memory, opened on first use (chromadb and the embedding model take seconds)."""

    def __init__(self, config: KernelConfig):
        self.config = config
        self._memory = None
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            if self._memory is None:
                from kernos.memory.vector import VectorMemory

                http = None
                if self.config.memory.chroma_url:
                    host, port = self.config.memory.chroma_url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
                    http = (host, int(port))
                from kernos.memory.embed import Embedder
                from kernos.memory.fair import FairEmbedder

                m = self.config.memory
                embedder = FairEmbedder(Embedder(), m.embed_chunk, m.embed_pending_per_agent)
                self._memory = VectorMemory(self.config.data_dir / "chroma", embedder, http=http,
                                            max_entries=m.max_entries)
            return self._memory


class ResourceOwners:
    """For access control: a tool's owner and whether it is private; whether a model or "model/adapter" is
    restricted. The tool registry is attached once it exists (it needs access control itself)."""

    def __init__(self, config: KernelConfig, llm: LLMCore):
        self.models = {m.name: m for m in config.effective_models()}
        self.llm = llm
        self.tools: ToolManager | None = None

    def __call__(self, kind: str, name: str) -> tuple[str, bool]:
        if kind == "tool":
            return self.tools.owner(name) if self.tools else ("kernel", False)
        model, _, adapter = name.partition("/")
        served = self.llm.get(model)
        cfg = self.models.get(served.name if served else model)
        if cfg is None:
            return "kernel", False
        if ":" in adapter:                 # a published adapter, OWNER:NAME: private to its owner unless granted
            return adapter.split(":", 1)[0], True
        return "kernel", (adapter in cfg.restricted_adapters) if adapter else cfg.restricted


def _quotas(config: KernelConfig, access: AccessControl, shared=None) -> Quotas:
    def limits(x) -> Limits:
        return Limits(x.requests_per_second, x.tokens_per_minute, x.concurrent_generations)

    q = config.quotas
    return Quotas(limits(q), {a: limits(x) for a, x in q.agents.items()}, {g: limits(x) for g, x in q.groups.items()},
                  access.groups_of, shared)


class Kernel:
    def __init__(self, config: KernelConfig):
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        # stores: SQLite files and folders under the data dir, or a cluster's PostgreSQL and object store
        c = config.cluster
        dbs = self.dbs = Databases(data, c.database)
        keep = (config.storage.trace_max_age_s, config.storage.trace_max_per_agent)
        self.traces = TraceLog(dbs("traces.db"), *keep)
        self.audit = TraceLog(dbs("audit.db"), *keep)   # every access decision, same guarantees and retention
        self.files = FileStore(data / "files", config.storage.quota_bytes, config.storage.max_file_bytes,
                               dbs("files/files.db"), c.blobs("files"))
        self.contexts = ContextStore(dbs("contexts.db"))
        # a cluster's node: joins once it listens (the daemon); an agent's calls go to its home node
        self.cluster = Membership(Nodes(dbs("cluster.db"), c.name(data), c.lease_s), c.heartbeat_s, c.forward) \
            if c.database else None
        self.forwarder = None
        self.adapter_store = AdapterStore(data / "adapters", dbs("adapters/adapters.db"), c.blobs("adapters"))
        self.vector = LazyVectorMemory(config)
        self.llm = LLMCore(config.effective_models(), config.default_model_name(), config.engine,
                           config.scheduler.make, data)
        # security
        owners = ResourceOwners(config, self.llm)
        self.registry = AgentRegistry(dbs("kernel.db"), ttl_s=config.server.agent_ttl_s)
        self.access_control = AccessControl(dbs("access.db"), config.server.admin_token, owners, self.audit)
        self.enrollments = Enrollments(dbs("access.db"))
        self.registration = Registration(self.registry, self.access_control, self.enrollments, config.registration,
                                         (config.aios.prefix,))
        shared = SharedQuotas(dbs("quotas.db"), self.cluster.node_id, self.cluster.node_ids) \
            if self.cluster else None
        self.quotas = _quotas(config, self.access_control, shared)
        self.gate = Gate(self.registry, self.access_control, self.quotas)
        # tools, fine-tuning jobs
        self.tools = owners.tools = ToolManager(self.vector, self.access_control, config.tools,
                                            ToolStore(dbs("tools.db")))
        self.publisher = Publisher(self.llm, self.adapter_store, self.config.tuner.retention)
        self.continual = Continual(dbs("tuner/continual.db"), self.adapter_store, self.traces, self.registry,
                                   self.audit, config.tuner.continual_tick_s,
                                   self.cluster.is_home if self.cluster is not None else None)
        self.publisher.serve_published()      # published adapters are served again after a restart
        t = config.tuner
        shared_jobs = SharedJobs(c.blobs("jobs"), self.cluster.node_id, self.cluster.node_ids) \
            if self.cluster is not None and c.objects else None
        self.jobs = JobManager(data / "tuner", self.publisher.finish_job, max_jobs=t.max_jobs,
                               threads=t.threads or max(1, (os.cpu_count() or 2) // 2), nice=t.nice,
                               db=dbs("tuner/jobs.db"), shared=shared_jobs)
        self.jobs.pump()                      # jobs interrupted by a stop resume from their checkpoints
        # use cases
        lim = config.limits
        snapshots = SnapshotStore(data / "snapshots", lim.max_snapshots_per_agent, lim.snapshot_ttl_s,
                                  dbs("snapshots/snapshots.db"), c.blobs("snapshots") if c.database else None)
        self.generate = Generate(self.llm, config.limits, self.registry, self.quotas, self.access_control,
                                 self.continual, self.traces, self.lifecycle, self.contexts, self.vector,
                                 config.memory.summary_max_tokens, snapshots, self.tools, self.metrics.observe)
        self.responses = Responses(ResponseStore(dbs("responses.db")), self.generate)
        self.models = Models(self.llm, self.access_control)
        self.agents = Agents(self.registry, self.registration, self.llm, self.jobs, self.lifecycle,
                             self.access_control, self.cluster)
        st, mem = config.storage, config.memory
        self.storage = Files(self.files, self.vector, FairPool("storage", st.workers, st.workers_per_agent),
                             st.max_indexed_bytes, {g: q.storage_bytes for g, q in config.quotas.groups.items()},
                             self.access_control)
        self.memory = Memory(self.vector, self.contexts, self.llm, config.limits,
                             FairPool("memory", mem.workers, mem.workers_per_agent))
        self.access = Access(self.access_control)
        self.datasets = Datasets(self.traces, self.files, self.vector, self.llm, self.access_control, self.generate,
                                 config.limits, config.engine.max_batch_size, self.tools, self.adapter_store.default)
        self.tuner = Tuner(self.traces, self.files, self.jobs, self.adapter_store, self.llm, self.access_control,
                           config.tuner, self.continual)
        self.continual.bind(lambda agent, **spec: self.datasets.build(agent, DatasetSpec(**spec)),
                            lambda agent, **spec: self.tuner.start(agent, FinetuneSpec(**spec)), self.jobs)
        self.metrics.attach(self)

    def aios_bridge(self):
        """The agents of AIOS's `/query` (`server.aios_compat`): each AIOS name its own Kernos agent."""
        from .security.bridge import BridgedAgents

        cfg = self.config.aios
        return BridgedAgents(self.registry, self.access_control, self.dbs("bridge.db"), "aios", cfg.prefix, cfg.group,
                             cfg.capabilities, cfg.max_agents, cfg.new_agents_per_minute,
                             legacy=self.config.data_dir / "aios_agents.json")

    def flush(self) -> None:
        self.registry.flush()

    def drain(self, timeout: float) -> bool:
        """Stop accepting generations and let running ones finish within `timeout` (blocking)."""
        self.lifecycle.stopping = True
        deadline = time.monotonic() + timeout
        clean = self.llm.drain(timeout)
        self.tools.drain(deadline)            # tool calls get what is left of the drain, then their jails die
        log.info("engines drained (%s)", "all finished" if clean else "timeout: the rest were cancelled")
        return clean

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.leave()
            self.quotas.shared.close()
        self.jobs.shutdown()
        self.tools.close()
        self.continual.close()
        self.adapter_store.close()
        self.audit.close()
        self.access_control.close()
        self.enrollments.close()
        self.contexts.close()
        self.files.close()
        self.traces.close()
        self.registry.close()
