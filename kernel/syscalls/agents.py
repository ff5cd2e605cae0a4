"""The kernel syscalls: agents register (a name bound to a token, under the registration policy), beat, exit
(ending a session, not the ownership of the name) and are listed; operators and agents read the kernel's
statistics.

Least exposure: an agent sees its own live requests and fine-tuning jobs in the statistics (the model-wide
counters stay whole), and lists only itself and the agents it shares a group with; operators see all."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

VERSION = "0.1.0"


@dataclass
class ModelLoad:
    """One served model's engine as seen now: its counters and its live requests with their states."""
    model: object              # ServedModel
    stats: object              # EngineStats
    live: list                 # [(RequestView, state)] that the caller may see
    policy: str
    cache_budget_bytes: int
    preempted: int = 0         # all requests, whoever they belong to
    suspended: int = 0


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
    programs: list = field(default_factory=list)   # kernos.scheduler.Program: the caller's (operators: all)
    node_id: str = ""                              # a cluster's node: this one, and every node (operators)
    nodes: list = field(default_factory=list)      # (kernel.cluster.nodes.Node, alive)
    forwarded: int = 0
    served_for_unreachable: int = 0


class Agents:
    def __init__(self, agents, registration, llm, jobs, lifecycle, access, cluster=None):
        self.agents = agents
        self.cluster = cluster
        self.registration = registration
        self.access = access
        self.llm = llm
        self.jobs = jobs
        self.lifecycle = lifecycle

    async def register(self, name: str, description: str, labels: dict[str, str], credential: str | None = None,
                       peer: str = ""):
        """(agent, token): the token is shown once. `credential`: the token the call carried (the agent's own,
        an operator's or an enrollment token); `peer`: the client's address, for the per-address limit."""
        return await asyncio.to_thread(self.registration.register, name, description, labels, credential, peer)

    async def heartbeat(self, principal) -> float:
        return time.time()          # authenticating the call already marked the agent alive

    async def exit(self, principal) -> None:
        if not principal.operator:
            await asyncio.to_thread(self.agents.exit, principal)

    def _visible(self, principal):
        """The agent ids `principal` may see: everyone for operators; else itself and its groups' members (not the
        registration group's)."""
        if principal.operator:
            return None
        # The registration group is a shared budget of every self-registered name, not a team: not a way to see
        groups = self.access.groups_of(principal.agent_id) - {self.registration.config.group}
        members = self.access.groups() if groups else {}
        return {principal.agent_id} | {a for g in groups for a in members.get(g, [])}

    async def list(self, principal, include_exited: bool):
        visible = await asyncio.to_thread(self._visible, principal)
        agents = await asyncio.to_thread(self.agents.list, include_exited)
        return [a for a in agents if visible is None or a.agent_id in visible]

    async def stats(self, principal) -> KernelStats:
        mine = None if principal.operator else principal.agent_id
        models = []
        for m in self.llm.models.values():
            st, live = m.engine.snapshot()
            models.append(ModelLoad(m, st, [(v, s) for v, s in live if mine is None or v.agent_id == mine],
                                    m.engine.policy_name, m.engine.cache_budget_bytes,
                                    sum(1 for _, s in live if s == "preempted"),
                                    sum(1 for _, s in live if s == "suspended")))
        jobs = await asyncio.to_thread(self.jobs.list, mine)
        stats = KernelStats(VERSION, time.time() - self.lifecycle.started, self.agents.active_count(),
                            self.lifecycle.syscalls, self.lifecycle.in_flight, self.llm.default, models, jobs,
                            self.llm.programs.list(mine))
        if self.cluster is not None:
            c = self.cluster
            stats.node_id, stats.forwarded, stats.served_for_unreachable = c.node_id, c.forwarded, c.served_for_dead
            if principal.operator:
                stats.nodes = [(n, c.alive(n)) for n in await asyncio.to_thread(c.nodes_now)]
        return stats
