"""The kernel object: configuration, agent registry, trace log and LLM core, composed once and shared by
the servicers. It knows nothing of gRPC transport; `server.py` does."""
from __future__ import annotations

import contextlib
import logging
import threading
import time

from .agents import AgentRegistry
from .config import KernelConfig
from .llm.core import LLMCore
from kernos.memory.context import ContextStore
from kernos.storage.files import FileStore
from kernos.storage.traces import TraceLog

log = logging.getLogger("kernos.kernel")
VERSION = "0.1.0"


class Kernel:
    def __init__(self, config: KernelConfig):
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.agents = AgentRegistry(config.data_dir / "kernel.db", ttl_s=config.server.agent_ttl_s)
        self.traces = TraceLog(config.data_dir / "traces.db")
        self.files = FileStore(config.data_dir / "files", config.storage.quota_bytes, config.storage.max_file_bytes)
        self.contexts = ContextStore(config.data_dir / "contexts.db")
        self._memory = None
        self._memory_lock = threading.Lock()
        self.llm = LLMCore(config)
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

    def namespace(self, agent, requested: str) -> str:
        """The vector-memory namespace a call may use: the agent's own. Sharing another agent's namespace
        needs an access grant (the access-control layer plugs in here)."""
        if requested and requested != agent.agent_id:
            from .errors import SyscallError
            import grpc
            raise SyscallError(grpc.StatusCode.PERMISSION_DENIED,
                               f"namespace '{requested[:64]}' belongs to another agent and no grant allows it")
        return agent.agent_id

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
        self.contexts.close()
        self.files.close()
        self.traces.close()
        self.agents.close()
