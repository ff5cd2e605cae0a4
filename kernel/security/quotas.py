"""Per-agent rate limits: requests per second (every syscall), LLM tokens per minute (prompt + generated),
concurrent generations. Exceeding one gets RESOURCE_EXHAUSTED with a retry hint (seconds, also in the
`retry-after-ms` trailing metadata).

Two checks, each in one place: the request rate at the gate every syscall passes (`Gate.admit`), and a
generation's admission and accounting in the generate use case, as one lease (`generation()`): admitted
on entry (concurrency, tokens per minute), its generated tokens counted on exit. The kernel's own
generations on an agent's behalf (summaries, data-set sampling) are accounted the same way but never
refused: the agent's syscall that caused them was already admitted."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from kernos.storage.status import StatusError


@dataclass(frozen=True)
class Limits:
    requests_per_second: float = 0     # 0: no limit
    tokens_per_minute: int = 0
    concurrent_generations: int = 0


class QuotaExceeded(StatusError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__("RESOURCE_EXHAUSTED", message, retry_after_s)


class Lease:
    """One generation's hold on its agent's quota; `completed(n)` records the tokens it generated."""

    def __init__(self):
        self.completion_tokens = 0

    def completed(self, tokens: int) -> None:
        self.completion_tokens = tokens


class Quotas:
    def __init__(self, default: Limits, per_agent: dict[str, Limits] | None = None):
        self.default = default
        self.per_agent = dict(per_agent or {})
        self._requests: dict[str, deque] = defaultdict(deque)   # agent -> request times (last second)
        self._tokens: dict[str, deque] = defaultdict(deque)     # agent -> (time, tokens) (last minute)
        self._running: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def limits(self, agent_id: str) -> Limits:
        return self.per_agent.get(agent_id, self.default)

    def request(self, agent_id: str, now: float | None = None) -> None:
        """Count one syscall; raise if over requests_per_second."""
        lim = self.limits(agent_id).requests_per_second
        if not lim:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._requests[agent_id]
            while q and now - q[0] >= 1.0:
                q.popleft()
            if len(q) >= lim:
                raise QuotaExceeded(f"'{agent_id}' is over its {lim:g} requests per second",
                                    max(0.0, 1.0 - (now - q[0])))
            q.append(now)

    @contextlib.contextmanager
    def generation(self, agent_id: str, prompt_tokens: int, refuse: bool = True):
        """Admit a generation (unless `refuse` is False: accounted, never refused) for the `with` block and
        count what it generated when the block ends, however it ends."""
        self.start_generation(agent_id, prompt_tokens, refuse=refuse)
        lease = Lease()
        try:
            yield lease
        finally:
            self.end_generation(agent_id, lease.completion_tokens)

    def start_generation(self, agent_id: str, prompt_tokens: int, now: float | None = None,
                         refuse: bool = True) -> None:
        """Admission of a generation: concurrency and the token budget of the last minute."""
        lim = self.limits(agent_id)
        now = time.monotonic() if now is None else now
        with self._lock:
            if not refuse:
                if lim.tokens_per_minute:
                    self._tokens[agent_id].append((now, prompt_tokens))
                self._running[agent_id] += 1
                return
            if lim.concurrent_generations and self._running[agent_id] >= lim.concurrent_generations:
                raise QuotaExceeded(f"'{agent_id}' already runs {self._running[agent_id]} generations (its limit)", 1.0)
            if lim.tokens_per_minute:
                q = self._tokens[agent_id]
                while q and now - q[0][0] >= 60.0:
                    q.popleft()
                used = sum(n for _, n in q)
                if used + prompt_tokens > lim.tokens_per_minute:
                    need = used + prompt_tokens - lim.tokens_per_minute
                    freed, wait = 0, 60.0
                    for t, n in q:  # when enough of the window expires
                        freed += n
                        if freed >= need:
                            wait = 60.0 - (now - t)
                            break
                    raise QuotaExceeded(f"'{agent_id}' used {used} of its {lim.tokens_per_minute} tokens per minute; "
                                        f"this prompt needs {prompt_tokens}", max(0.0, wait))
                q.append((now, prompt_tokens))
            self._running[agent_id] += 1

    def end_generation(self, agent_id: str, completion_tokens: int, now: float | None = None) -> None:
        with self._lock:
            self._running[agent_id] = max(0, self._running[agent_id] - 1)
            if self.limits(agent_id).tokens_per_minute and completion_tokens:
                self._tokens[agent_id].append((time.monotonic() if now is None else now, completion_tokens))
