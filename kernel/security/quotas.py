"""Per-agent and per-group rate limits: requests per second (every syscall), LLM tokens per minute (prompt + generated),
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

from kernos.abi.errors import StatusError


@dataclass(frozen=True)
class Limits:
    requests_per_second: float = 0     # 0: no limit
    tokens_per_minute: int = 0
    concurrent_generations: int = 0


class QuotaExceeded(StatusError):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__("RESOURCE_EXHAUSTED", message, retry_after_s)


class Lease:
    """One generation's hold on its agent's (and groups') quotas; `completed(n)` records the tokens it
    generated."""

    def __init__(self, subjects):
        self.subjects = subjects
        self.completion_tokens = 0

    def completed(self, tokens: int) -> None:
        self.completion_tokens = tokens


class Quotas:
    """Every limit applies to a subject: the agent itself (default limits or its override) and each of its
    groups that has a group quota (one budget its members share). A call passes only if every subject has room,
    and then counts against all of them."""

    def __init__(self, default: Limits, per_agent: dict[str, Limits] | None = None,
                 per_group: dict[str, Limits] | None = None, groups_of=None, shared=None):
        """`shared` (a cluster's `SharedQuotas`): groups' budgets are counted there, across the nodes."""
        self.shared = shared
        self.default = default
        self.per_agent = dict(per_agent or {})
        self.per_group = dict(per_group or {})
        self.groups_of = groups_of or (lambda agent_id: ())
        self._requests: dict[str, deque] = defaultdict(deque)   # subject -> request times (last second)
        self._tokens: dict[str, deque] = defaultdict(deque)     # subject -> (time, tokens) (last minute)
        self._running: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def limits(self, agent_id: str) -> Limits:
        return self.per_agent.get(agent_id, self.default)

    def subjects(self, agent_id: str) -> list[tuple[str, str, Limits]]:
        """(key, name for messages, limits): the agent, then its quota'd groups. Group keys cannot clash with
        agent names (those have no ':')."""
        out = [(agent_id, f"'{agent_id}'", self.limits(agent_id))]
        if self.per_group:
            out += [(f"group:{g}", f"group '{g}'", self.per_group[g])
                    for g in sorted(self.groups_of(agent_id)) if g in self.per_group]
        return out

    def usage(self, agent_id: str, now: float | None = None) -> list[dict]:
        """Each subject's limits and what it uses now: requests in the last second, tokens in the last minute,
        running generations (for the console)."""
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            for key, who, lim in self.subjects(agent_id):
                out.append({"subject": key, "requests_per_second": lim.requests_per_second,
                            "tokens_per_minute": lim.tokens_per_minute,
                            "concurrent_generations": lim.concurrent_generations,
                            "requests_last_second": sum(1 for t in self._requests.get(key, ()) if now - t < 1.0),
                            "tokens_last_minute": sum(n for t, n in self._tokens.get(key, ()) if now - t < 60.0),
                            "running": self._running.get(key, 0)})
                if self._is_shared(key):
                    out[-1].update(self.shared.usage(key))
        return out

    def _is_shared(self, key: str) -> bool:
        return self.shared is not None and key.startswith("group:")

    def request(self, agent_id: str, now: float | None = None) -> None:
        """Count one syscall; raise if the agent or one of its groups is over requests_per_second."""
        now = time.monotonic() if now is None else now
        subjects = [(k, who, lim.requests_per_second) for k, who, lim in self.subjects(agent_id)
                    if lim.requests_per_second]
        if not subjects:
            return
        shared = [s for s in subjects if self._is_shared(s[0])]
        subjects = [s for s in subjects if not self._is_shared(s[0])]
        with self._lock:
            for key, who, lim in subjects:
                q = self._requests[key]
                while q and now - q[0] >= 1.0:
                    q.popleft()
                if len(q) >= lim:
                    raise QuotaExceeded(f"{who} is over its {lim:g} requests per second",
                                        max(0.0, 1.0 - (now - q[0])))
        for key, who, lim in shared:
            self.shared.request(key, who, lim)
        with self._lock:
            for key, _, _ in subjects:
                self._requests[key].append(now)

    @contextlib.contextmanager
    def generation(self, agent_id: str, prompt_tokens: int, refuse: bool = True):
        """Admit a generation (unless `refuse` is False: accounted, never refused) for the `with` block and
        count what it generated when the block ends, however it ends."""
        lease = self.start_generation(agent_id, prompt_tokens, refuse=refuse)
        try:
            yield lease
        finally:
            self.end_generation(lease, lease.completion_tokens)

    def start_generation(self, agent_id: str, prompt_tokens: int, now: float | None = None,
                         refuse: bool = True) -> Lease:
        """Admission of a generation: concurrency and the token budget of the last minute, for the agent and
        each of its quota'd groups."""
        now = time.monotonic() if now is None else now
        subjects = self.subjects(agent_id)
        local = [s for s in subjects if not self._is_shared(s[0])]
        with self._lock:
            if refuse:
                for key, who, lim in local:
                    self._check(key, who, lim, prompt_tokens, now)
        started = []
        try:
            for key, who, lim in subjects:
                if self._is_shared(key):
                    self.shared.start_generation(key, who, lim.concurrent_generations, lim.tokens_per_minute,
                                                 prompt_tokens, refuse)
                    started.append((key, lim))
        except StatusError:
            for key, lim in started:        # what the groups before the refusing one counted is given back
                self.shared.end_generation(key, lim.tokens_per_minute, -prompt_tokens)
            raise
        with self._lock:
            for key, _, lim in local:
                if lim.tokens_per_minute:
                    self._tokens[key].append((now, prompt_tokens))
                self._running[key] += 1
        return Lease([(key, lim) for key, _, lim in subjects])

    def _check(self, key: str, who: str, lim: Limits, prompt_tokens: int, now: float) -> None:
        if lim.concurrent_generations and self._running[key] >= lim.concurrent_generations:
            raise QuotaExceeded(f"{who} already runs {self._running[key]} generations (its limit)", 1.0)
        if lim.tokens_per_minute:
            q = self._tokens[key]
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
                raise QuotaExceeded(f"{who} used {used} of its {lim.tokens_per_minute} tokens per minute; "
                                    f"this prompt needs {prompt_tokens}", max(0.0, wait))

    def end_generation(self, lease: Lease, completion_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for key, lim in lease.subjects:
            if self._is_shared(key):
                self.shared.end_generation(key, lim.tokens_per_minute, completion_tokens)
        with self._lock:
            for key, lim in lease.subjects:
                if self._is_shared(key):
                    continue
                self._running[key] = max(0, self._running[key] - 1)
                if lim.tokens_per_minute and completion_tokens:
                    self._tokens[key].append((now, completion_tokens))
