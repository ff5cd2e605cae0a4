"""Scheduling policies: between two decode steps an engine asks its policy which waiting requests to
start (or resume) and which running ones to preempt.

Policies see only `RequestView`s (ids, agent, priority, times, sizes), never tensors, so they are
testable without a model (as in vLLM's v1 scheduler, the policy is a plain object; the engine loop
and the model runner live elsewhere). Limits are enforced here, the same way for every policy: batch
size, tokens in flight, and cache bytes.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class RequestView:
    request_id: str
    agent_id: str
    priority: int
    arrival: float              # monotonic seconds when the request was submitted
    prompt_tokens: int
    max_tokens: int
    generated: int = 0
    enqueued: float = 0.0       # when it last entered the waiting queue (arrival, or its last preemption)
    quantum_steps: int = 0      # decode steps since it was last admitted
    cache_bytes: int = 0        # bytes its cache holds now (running) or will hold when admitted (waiting)
    preemptions: int = 0
    first_token_at: float = 0.0 # monotonic seconds of its first generated token; 0 before it (for observers)
    program_id: str = ""        # its agent program ("": a call of its own)
    program_service: int = 0    # tokens computed for its program so far, this call's included
    program_started: float = 0.0  # monotonic seconds of its program's first call (0: none)

    @property
    def service(self) -> int:
        """Attained service of what this call belongs to: its program's, or (alone) its own tokens."""
        return self.program_service if self.program_id else self.tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass(frozen=True)
class Budget:
    max_batch_size: int
    max_tokens_in_flight: int = 0   # 0: no limit; counts prompt + generated tokens of running requests
    cache_bytes: int = 0            # 0: no limit


@dataclass
class Decision:
    admit: list[str] = field(default_factory=list)
    preempt: list[tuple[str, str]] = field(default_factory=list)  # (request_id, reason)


class Policy:
    """Shared mechanics; subclasses define the order of waiting requests and when one may displace another."""

    name = "base"

    def rank(self, r: RequestView, now: float) -> tuple:
        """Sort key among waiting requests: lower runs first."""
        raise NotImplementedError

    def may_preempt(self, candidate: RequestView, victim: RequestView, now: float) -> bool:
        """Whether `candidate` (waiting) may displace `victim` (running)."""
        return False

    def victim_order(self, running: list[RequestView], now: float) -> list[RequestView]:
        """Running requests, the first to be preempted first."""
        return sorted(running, key=lambda r: self.rank(r, now), reverse=True)

    def record(self, agent_id: str, tokens: int, now: float) -> None:
        """Accounting hook: `tokens` were generated for `agent_id`."""

    def prefilled(self, agent_id: str, tokens: float, now: float) -> None:
        """Prompt tokens computed for `agent_id`, in decoded tokens' worth (the engine weighs them by cost)."""
        self.record(agent_id, tokens, now)

    def decoded(self, agent_ids, now: float) -> None:
        """One decode step made a token for each of these requests' agents (an engine passes them on unread)."""
        counts: dict[str, int] = {}
        for agent in agent_ids:
            counts[agent] = counts.get(agent, 0) + 1
        for agent, n in counts.items():
            self.record(agent, n, now)

    # How an engine that orders requests only when it admits them (vLLM) honours this policy: "fcfs" (arrival
    # order), "rank" (by `admission_priority`), or "" (it cannot: the policy needs time slices between steps).
    admission = "rank"

    def admission_priority(self, r: RequestView, now: float) -> int:
        """The request's place at admission for such an engine: lower runs first (ties: arrival)."""
        return 0

    def schedule(self, waiting: Sequence[RequestView], running: Sequence[RequestView], budget: Budget,
                 now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        decision = Decision()
        active = list(running)
        # Memory pressure: running caches grew past the budget; preempt until they fit again.
        while budget.cache_bytes and active and sum(r.cache_bytes for r in active) > budget.cache_bytes:
            victim = self.victim_order(active, now)[0]
            active.remove(victim)
            decision.preempt.append((victim.request_id, "memory"))
        started = {r.request_id for r in running}  # only these may be preempted, never one admitted just now
        for cand in sorted(waiting, key=lambda r: self.rank(r, now)):
            while not _fits(cand, active, budget):
                victims = [v for v in self.victim_order(active, now)
                           if v.request_id in started and self.may_preempt(cand, v, now)]
                if not victims:
                    break
                active.remove(victims[0])
                decision.preempt.append((victims[0].request_id, self.preempt_reason))
            if not _fits(cand, active, budget):
                break  # keep order: nothing ranked lower jumps ahead of a request that does not fit yet
            active.append(cand)
            decision.admit.append(cand.request_id)
        return decision

    preempt_reason = "policy"


def _fits(cand: RequestView, active: list[RequestView], budget: Budget) -> bool:
    if len(active) + 1 > budget.max_batch_size:
        return False
    if budget.max_tokens_in_flight and sum(r.tokens for r in active) + cand.tokens > budget.max_tokens_in_flight:
        return False
    if budget.cache_bytes and sum(r.cache_bytes for r in active) + cand.cache_bytes > budget.cache_bytes:
        return False
    return True


class FifoPolicy(Policy):
    admission = "fcfs"

    """First come, first served; a running request is never displaced."""

    name = "fifo"

    def rank(self, r, now):
        return (r.arrival,)


class RoundRobinPolicy(Policy):
    """Each admitted request runs for `quantum` decode steps; then, if others wait, it goes to the back of
    the queue (preempted) and the head of the queue runs."""

    name = "round_robin"
    preempt_reason = "quantum"

    admission = ""          # a time slice per request: only an engine that steps itself can give it

    def __init__(self, quantum: int = 32):
        if quantum <= 0:
            raise ValueError("round-robin quantum must be > 0 decode steps")
        self.quantum = quantum

    def rank(self, r, now):
        return (r.enqueued or r.arrival, r.arrival)

    def may_preempt(self, candidate, victim, now):
        return victim.quantum_steps >= self.quantum

    def victim_order(self, running, now):
        return sorted(running, key=lambda r: -r.quantum_steps)


class PriorityPolicy(Policy):
    """Highest priority first. A waiting request gains `aging_per_s` priority per second it has waited, so a
    stream of high-priority work cannot starve a low-priority request forever. A waiting request whose
    effective priority beats a running one's base priority by more than `preempt_margin` displaces it
    (running requests do not age: they are being served)."""

    name = "priority"
    preempt_reason = "priority"

    def __init__(self, aging_per_s: float = 1.0, preempt_margin: float = 1.0):
        self.aging_per_s = aging_per_s
        self.preempt_margin = preempt_margin

    def effective(self, r: RequestView, now: float) -> float:
        return r.priority + self.aging_per_s * max(0.0, now - (r.enqueued or r.arrival))

    def admission_priority(self, r, now):
        return -r.priority      # aging applies while a request waits in Kernos's own queue only

    def rank(self, r, now):
        return (-self.effective(r, now), r.arrival)

    def may_preempt(self, candidate, victim, now):
        return self.effective(candidate, now) > victim.priority + self.preempt_margin

    def victim_order(self, running, now):
        return sorted(running, key=lambda r: (r.priority, -r.arrival))


class FairSharePolicy(Policy):
    """Weighted fair share of computed tokens per agent over a sliding window (decoded ones, and prompt tokens at
    what they cost against a decoded one, as the engine measures it): the agent that received the
    least (per unit of weight) goes first, and a running request of a heavy agent that has used its quantum
    yields to a waiting request of a lighter one."""

    name = "fair_share"
    preempt_reason = "fair_share"

    def __init__(self, window_s: float = 60.0, weights: dict[str, float] | None = None, quantum: int = 16):
        self.window_s = window_s
        self.weights = dict(weights or {})
        self.quantum = quantum
        self._events: dict[str, deque] = defaultdict(deque)   # agent -> (time, tokens)
        self._totals: dict[str, int] = defaultdict(int)

    def record(self, agent_id, tokens, now):
        self._events[agent_id].append((now, tokens))
        self._totals[agent_id] += tokens

    def usage(self, agent_id: str, now: float) -> float:
        ev = self._events[agent_id]
        while ev and now - ev[0][0] > self.window_s:
            self._totals[agent_id] -= ev.popleft()[1]
        return self._totals[agent_id] / self.weights.get(agent_id, 1.0)

    def admission_priority(self, r, now):
        return int(self.usage(r.agent_id, now))       # tokens in the window per unit of weight

    def rank(self, r, now):
        return (self.usage(r.agent_id, now), r.enqueued or r.arrival)

    def may_preempt(self, candidate, victim, now):
        return (victim.quantum_steps >= self.quantum and victim.agent_id != candidate.agent_id
                and self.usage(victim.agent_id, now) > self.usage(candidate.agent_id, now))

    def victim_order(self, running, now):
        return sorted(running, key=lambda r: (-self.usage(r.agent_id, now), -r.quantum_steps))


class ProgramPolicy(FairSharePolicy):
    """Program-level least attained service (Autellix's PLAS): a call is ranked by the service its whole agent
    program has had (tokens computed for every call of it so far), not by its own, so a program's later calls
    (tool follow-ups) do not queue behind the first calls of newer, longer programs, and short programs finish
    first. Service is bucketed into levels that double in width (`level_tokens`, then 3x, 7x, ...), so calls of
    programs of like size keep arrival order and one token does not reorder the queue. On top: priority first,
    then (within a level) the agent's fair share of recent tokens, then arrival. A call waiting longer than
    `max_wait_s` ranks before all others (oldest first), the starvation bound. A running call that has used its
    quantum yields to a waiting one of a lower level or a higher priority (or a starved one).

    `order = "arrival"` ranks by when the program's first call came instead of its service (program-level FCFS,
    as Continuum): the calls of the program that started first go first, so programs of like length finish in
    the order they came rather than all together."""

    name = "program"
    preempt_reason = "program"

    def __init__(self, level_tokens: int = 512, max_wait_s: float = 30.0, quantum: int = 16,
                 window_s: float = 60.0, weights: dict[str, float] | None = None, order: str = "service"):
        if level_tokens <= 0 or max_wait_s <= 0:
            raise ValueError("program policy: level_tokens and max_wait_s must be > 0")
        if order not in ("service", "arrival"):
            raise ValueError(f"program policy: order must be 'service' or 'arrival', got {order!r}")
        super().__init__(window_s, weights, quantum)
        self.level_tokens = level_tokens
        self.max_wait_s = max_wait_s
        self.order = order

    def level(self, r: RequestView) -> int:
        return int(math.log2(1 + r.service / self.level_tokens))

    def place(self, r: RequestView) -> float:
        """Its program's place: its service level, or (order "arrival") when the program began."""
        if self.order == "arrival":
            return r.program_started or r.arrival
        return self.level(r)

    def starved(self, r: RequestView, now: float) -> bool:
        return now - (r.enqueued or r.arrival) > self.max_wait_s

    def admission_priority(self, r, now):
        if self.order == "arrival":
            return -1000 * r.priority         # vLLM: ties keep arrival order
        return self.level(r) - 1000 * r.priority     # vLLM orders by this once, at admission

    def rank(self, r, now):
        if self.starved(r, now):
            return (0, r.enqueued or r.arrival)
        return (1, -r.priority, self.place(r), self.usage(r.agent_id, now), r.enqueued or r.arrival)

    def may_preempt(self, candidate, victim, now):
        if victim.quantum_steps < self.quantum:
            return False
        if candidate.priority != victim.priority:
            return candidate.priority > victim.priority
        return self.starved(candidate, now) or self.place(candidate) < self.place(victim)

    def victim_order(self, running, now):
        return sorted(running, key=lambda r: (r.priority, -self.place(r), -r.quantum_steps))


POLICIES = {p.name: p for p in (FifoPolicy, RoundRobinPolicy, PriorityPolicy, FairSharePolicy, ProgramPolicy)}


def make_policy(name: str, **options) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scheduling policy '{name}'; known: {sorted(POLICIES)}") from None
    return cls(**options)
