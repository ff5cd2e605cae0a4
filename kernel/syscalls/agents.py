"""The kernel syscalls: agents register (a name and a token), beat, exit and are listed; operators and agents
read the kernel's statistics."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

VERSION = "0.1.0"


@dataclass
class ModelLoad:
    """One served model's engine as seen now: its counters and its live requests with their states."""
    model: object              # ServedModel
    stats: object              # EngineStats
    live: list                 # [(RequestView, state)]
    policy: str
    cache_budget_bytes: int


@dataclass
class KernelStats:
    version: str
    uptime_s: float
    active_agents: int
    syscalls: int
    in_flight: int
    default_model: str
    models: list[ModelLoad]
    jobs: list


class Agents:
    def __init__(self, agents, llm, jobs, lifecycle):
        self.agents = agents
        self.llm = llm
        self.jobs = jobs
        self.lifecycle = lifecycle

    async def register(self, name: str, description: str, labels: dict[str, str]):
        """(agent, token): the token is shown once."""
        return await asyncio.to_thread(self.agents.register, name, description, labels)

    async def heartbeat(self, principal) -> float:
        return time.time()          # authenticating the call already marked the agent alive

    async def exit(self, principal) -> None:
        if not principal.operator:
            await asyncio.to_thread(self.agents.exit, principal)

    async def list(self, include_exited: bool):
        return await asyncio.to_thread(self.agents.list, include_exited)

    async def stats(self) -> KernelStats:
        models = []
        for m in self.llm.models.values():
            st, live = m.engine.snapshot()
            models.append(ModelLoad(m, st, live, getattr(getattr(m.engine, "policy", None), "name", "none"),
                                    getattr(getattr(m.engine, "budget", None), "cache_bytes", 0)))
        jobs = await asyncio.to_thread(self.jobs.list)
        return KernelStats(VERSION, time.time() - self.lifecycle.started, self.agents.active_count(),
                           self.lifecycle.syscalls, self.lifecycle.in_flight, self.llm.default, models, jobs)
