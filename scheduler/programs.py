"""Agent programs: an agent's run of related LLM calls (a conversation, a tool loop) as a kernel object.

A call names its program (`program_id` on the LLM syscall) or gets one by default: its kernel context, or its
conversation's opening (the messages up to the first user turn), so a client resending its growing messages
stays one program without saying so. Per program the kernel tracks its attained service (tokens computed for it:
prompt tokens prefilled, reply tokens decoded, in flight too), its calls, and its tool pauses: a reply that ends
in tool calls opens a pause, the program's next call closes it, and the pause's length is observed per tool.
Those observations predict how long a program will be away (`Programs.predict_pause`): the engine keeps the
program's KV resident that long (Continuum's time-to-live), and the program policy orders calls by the
program's service (Autellix's PLAS). Pure Python, no torch; shared by every engine and the syscall layer, its
counters touched from the engine threads and the event loop alike (each update one attribute write).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

MAX_ID = 128


@dataclass(eq=False)
class Program:
    program_id: str
    agent_id: str
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    service: int = 0              # tokens computed for it: prompt tokens prefilled + tokens decoded
    calls: int = 0                # calls submitted
    running: int = 0              # calls in flight
    pauses: int = 0               # tool pauses closed by a follow-up call
    pause_s: float = 0.0          # their total length
    paused_since: float = 0.0     # monotonic; 0 while not paused
    paused_tools: tuple[str, ...] = ()

    def computed(self, tokens: int) -> None:
        """`tokens` were computed for it (an engine thread)."""
        self.service += tokens

    @property
    def state(self) -> str:
        return "running" if self.running else "paused" if self.paused_since else "idle"


def default_program_id(messages: list[dict], context_id: str = "") -> str:
    """A call's program when it names none: its kernel context, else its conversation's opening (the messages up
    to and including the first user turn: the same in every later call of that conversation), else none."""
    if context_id:
        return f"context:{context_id}"
    opening = []
    for m in messages:
        opening.append([m.get("role", ""), m.get("content", "")])
        if m.get("role") == "user":
            digest = hashlib.sha256(json.dumps(opening, ensure_ascii=False).encode()).hexdigest()[:24]
            return f"conv:{digest}"
    return ""


class Programs:
    """The kernel's program table. Programs idle past `idle_s` are forgotten; tool pause lengths are kept per
    tool name (the last `history` of each)."""

    def __init__(self, idle_s: float = 3600.0, history: int = 32, default_pause_s: float = 5.0,
                 max_programs: int = 100_000):
        self.idle_s = idle_s
        self.default_pause_s = default_pause_s
        self.max_programs = max_programs
        self._programs: dict[tuple[str, str], Program] = {}
        self._pauses: dict[str, deque] = defaultdict(lambda: deque(maxlen=history))
        self._lock = threading.Lock()

    def begin(self, agent_id: str, program_id: str, now: float | None = None) -> Program | None:
        """A call of the agent's program starts (None: the call belongs to no program). Closes the program's
        tool pause, observing its length for each tool it waited on."""
        if not program_id:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            key = (agent_id, program_id)
            p = self._programs.get(key)
            if p is None:
                p = self._programs[key] = Program(program_id, agent_id, started=now, last_seen=now)
            if p.paused_since:
                gap = max(0.0, now - p.paused_since)
                for tool in p.paused_tools or ("",):
                    self._pauses[tool].append(gap)
                p.pauses += 1
                p.pause_s += gap
                p.paused_since, p.paused_tools = 0.0, ()
            p.calls += 1
            p.running += 1
            p.last_seen = now
        return p

    def end(self, p: Program | None, tool_calls: list[str] = (), now: float | None = None) -> float:
        """A call of `p` ended; with tool calls (their names) it pauses until its next call. Returns the pause
        predicted (seconds; 0 without one)."""
        if p is None:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            p.running = max(0, p.running - 1)
            p.last_seen = now
            if not tool_calls:
                return 0.0
            p.paused_since, p.paused_tools = now, tuple(tool_calls)
            return self._predict(p.paused_tools)

    def predict_pause(self, tools: list[str]) -> float:
        with self._lock:
            return self._predict(tuple(tools))

    def _predict(self, tools: tuple[str, ...]) -> float:
        """How long a pause on these tools (run side by side) will last: per tool, the 90th percentile of its
        observed pauses (the default until one is seen), the longest of them."""
        out = 0.0
        for tool in tools or ("",):
            seen = sorted(self._pauses.get(tool) or ())
            out = max(out, seen[min(len(seen) - 1, int(0.9 * len(seen)))] if seen else self.default_pause_s)
        return out

    def get(self, agent_id: str, program_id: str) -> Program | None:
        with self._lock:
            return self._programs.get((agent_id, program_id))

    def list(self, agent_id: str | None = None, now: float | None = None) -> list[Program]:
        with self._lock:
            self._expire(time.monotonic() if now is None else now)
            return [p for (a, _), p in self._programs.items() if agent_id is None or a == agent_id]

    def _expire(self, now: float) -> None:
        stale = [k for k, p in self._programs.items() if not p.running and now - p.last_seen > self.idle_s]
        for k in stale:
            del self._programs[k]
        if len(self._programs) > self.max_programs:        # a flood of one-call programs: the oldest idle go
            idle = sorted((p.last_seen, k) for k, p in self._programs.items() if not p.running)
            for _, k in idle[:len(self._programs) - self.max_programs]:
                del self._programs[k]
