"""Who runs a tool call next when every slot is taken. Two freshly registered agents with 4 slow calls each once
held every tool slot, and a third agent's `python` call waited 44.8 s behind their queued calls (a FIFO thread
pool). Here a call takes a slot only within three caps: the kernel's (`max_concurrent_calls`), its agent's
(`max_calls_per_agent`) and each of its groups' (`max_calls_per_group`: names that registered themselves share the
registration group, so new names do not multiply an agent's share). When a slot frees, the waiting call whose
agent has started the fewest calls in the last minute goes first (least attained service; ties: the earliest): an
agent's extra calls queue behind its own, and a quiet agent's call takes the very next slot it may take."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque

WINDOW_S = 60.0


class FairSlots:
    def __init__(self, total: int, per_agent: int, per_group: int, groups_of=None):
        self.total = total
        self.per_agent = per_agent
        self.per_group = per_group
        self.groups_of = groups_of or (lambda agent: ())
        self.running = 0
        self._agents: dict[str, int] = {}
        self._groups: dict[str, int] = {}
        self._waiting: list[tuple[int, str, asyncio.Future]] = []
        self._order = itertools.count()
        self._started: dict[str, deque] = {}      # agent -> when its calls took a slot (the last minute)

    def _attained(self, agent: str, now: float) -> int:
        q = self._started.get(agent)
        while q and now - q[0] > WINDOW_S:
            q.popleft()
        if q is not None and not q:
            del self._started[agent]
        return len(q) if q else 0

    def _fits(self, agent: str, groups) -> bool:
        return (self.running < self.total and self._agents.get(agent, 0) < self.per_agent
                and all(self._groups.get(g, 0) < self.per_group for g in groups))

    def _take(self, agent: str, groups) -> None:
        now = time.monotonic()
        if len(self._started) > 1000:             # forget agents quiet for a minute
            for a in list(self._started):
                self._attained(a, now)
        self._started.setdefault(agent, deque()).append(now)
        self.running += 1
        self._agents[agent] = self._agents.get(agent, 0) + 1
        for g in groups:
            self._groups[g] = self._groups.get(g, 0) + 1

    async def acquire(self, agent: str) -> tuple[str, ...]:
        """Wait for a slot; returns what to hand `release` (the groups it counted against)."""
        groups = tuple(self.groups_of(agent))
        if not self._waiting and self._fits(agent, groups):
            self._take(agent, groups)
            return groups
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((next(self._order), agent, fut))
        self._grant()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():      # granted just as the caller left: give it back
                self.release(agent, fut.result())
            else:
                self._waiting = [w for w in self._waiting if w[2] is not fut]
            raise

    def release(self, agent: str, groups: tuple[str, ...]) -> None:
        self.running -= 1
        self._agents[agent] -= 1
        if not self._agents[agent]:
            del self._agents[agent]
        for g in groups:
            self._groups[g] -= 1
            if not self._groups[g]:
                del self._groups[g]
        self._grant()

    def _grant(self) -> None:
        now = time.monotonic()
        while self._waiting and self.running < self.total:
            eligible = [(self._attained(a, now), order, a, f) for order, a, f in self._waiting
                        if not f.done() and self._fits(a, tuple(self.groups_of(a)))]
            if not eligible:
                break
            _, order, agent, fut = min(eligible, key=lambda e: e[:2])
            self._waiting = [w for w in self._waiting if w[0] != order]
            groups = tuple(self.groups_of(agent))
            self._take(agent, groups)
            fut.set_result(groups)
