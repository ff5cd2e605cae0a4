"""The kernel object: configuration, agent registry, trace log and LLM core, composed once and shared by
the servicers. It knows nothing of gRPC transport; `server.py` does."""
from __future__ import annotations

import contextlib
import logging
import time

from .agents import AgentRegistry
from .config import KernelConfig
from .llm.core import LLMCore
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
        self.llm = LLMCore(config)
        self.stopping = False
        self.in_flight = 0
        self.syscalls = 0

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
        self.files.close()
        self.traces.close()
        self.agents.close()
