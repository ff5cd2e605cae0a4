"""The engine interface (no torch here): what the syscall layer needs from any engine."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from kernos.abi.errors import StatusError
from kernos.scheduler import RequestView

from .types import GenRequest, RequestHandle, Shaping

ALL_SHAPING = frozenset(Shaping.__dataclass_fields__)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    batch_rows: int = 0            # sum of batch sizes over decode steps
    cache_bytes: int = 0
    context_switches: int = 0       # preemptions
    switch_seconds: float = 0.0     # time spent preempting and resuming
    preempted_by_reason: dict = field(default_factory=dict)
    strategy_counts: dict = field(default_factory=dict)   # "swap" / "recompute" -> count
    resident_bytes: int = 0         # KV kept between calls (resident contexts and prefixes)
    resident_entries: int = 0
    prefix_lookups: int = 0         # prefills that looked for a resident prefix
    prefix_hits: int = 0            # ... and found one
    prefix_tokens_reused: int = 0   # prompt tokens not prefilled thanks to a resident prefix
    draft_tokens: int = 0           # prompt lookup: tokens drafted ...
    draft_accepted: int = 0         # ... and accepted (each saved a decode step)
    pauses: dict = field(default_factory=dict)   # KV through tool pauses: pinned / reused / expired / swapped / dropped
    recent: deque = field(default_factory=lambda: deque(maxlen=512))  # (time, tokens) per step
    queue_waits: deque = field(default_factory=lambda: deque(maxlen=256))  # ms from arrival to first admission

    def queue_wait_ms(self) -> float:
        waits = list(self.queue_waits)
        return sum(waits) / len(waits) if waits else 0.0

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        pts = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if len(pts) < 2:
            return 0.0
        span = max(now - pts[0][0], 1e-6)
        return sum(n for _, n in pts) / span


class Engine(ABC):
    """Runs generation requests for one model. Thread-safe `submit`; events arrive on the handle."""

    name: str
    # The fields of a request's `Shaping` this engine applies (a request that sets another is refused, naming it)
    shaping: frozenset[str] = frozenset()
    scores = False          # whether it scores a prompt (GenRequest.prompt_logprobs)

    @abstractmethod
    def submit(self, request: GenRequest, handle: RequestHandle) -> None: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def drain(self, timeout: float) -> bool:
        """Stop taking requests, let in-flight ones finish within `timeout`, cancel the rest, stop.
        Returns True when everything finished in time."""

    def suspend(self, request_id: str):
        """Preempt and park a request; returns a concurrent Future of its state."""
        raise self._cannot("suspend")

    def resume(self, request_id: str):
        raise self._cannot("resume")

    def checkpoint(self, request_id: str, directory):
        raise self._cannot("snapshot")

    @property
    def policy_name(self) -> str:
        """Its scheduling policy, as operators see it."""
        return "none"

    @property
    def cache_budget_bytes(self) -> int:
        """Bytes its KV cache (and Mamba states) may hold; 0: no limit or not known."""
        return 0

    def _cannot(self, what: str) -> StatusError:
        return StatusError("FAILED_PRECONDITION", f"model '{self.name}' cannot {what} generations")

    def pause(self, request_id: str, program_id: str, ttl_s: float) -> None:
        """The reply of `request_id` ended in tool calls: its program pauses about `ttl_s` seconds. An engine that
        can keep the KV it computed for the program's follow-up does so (the own engine); others leave it to their
        own cache (vLLM's prefix cache: least recently used blocks, no pins)."""

    @abstractmethod
    def snapshot(self) -> tuple[EngineStats, list[tuple[RequestView, str]]]:
        """Counters and the live requests with their state ("waiting" | "running")."""
