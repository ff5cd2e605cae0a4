"""The Kernel service: register / heartbeat / exit, list agents, stats."""
from __future__ import annotations

import time

from kernos.proto.v1 import kernel_pb2 as pb
from kernos.proto.v1 import kernel_pb2_grpc as rpc
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .tuner_servicer import job_message
from .errors import syscall
from .kernel import VERSION, Kernel


def _agent_info(a) -> pb.AgentInfo:
    return pb.AgentInfo(agent_id=a.agent_id, name=a.agent_id, description=a.description, labels=a.labels,
                        state=a.state, registered_at=a.registered_at, last_seen=a.last_seen, syscalls=a.syscalls,
                        prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens)


class KernelServicer(rpc.KernelServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    def _trace(self, kind: str, request: dict | None = None, response: dict | None = None) -> None:
        agent = current_agent()
        self.k.traces.record(TraceRecord(agent.agent_id, kind, "OK", request or {}, response or {}, {}))

    @syscall
    async def Register(self, request, context):
        with self.k.track():
            agent, token = self.k.agents.register(request.name, request.description, dict(request.labels))
            self.k.traces.record(TraceRecord(agent.agent_id, "kernel.register", "OK",
                                             {"name": request.name, "labels": dict(request.labels)}, {}, {}))
            return pb.RegisterReply(agent_id=agent.agent_id, token=token)

    @syscall
    async def Heartbeat(self, request, context):
        self._trace("kernel.heartbeat")
        return pb.HeartbeatReply(server_time=time.time())

    @syscall
    async def Exit(self, request, context):
        agent = current_agent()
        self._trace("kernel.exit")
        self.k.agents.exit(agent)
        return pb.ExitReply()

    @syscall
    async def ListAgents(self, request, context):
        self._trace("kernel.list_agents", {"include_exited": request.include_exited})
        return pb.ListAgentsReply(agents=[_agent_info(a) for a in self.k.agents.list(request.include_exited)])

    @syscall
    async def Stats(self, request, context):
        self._trace("kernel.stats")
        models = []
        for m in self.k.llm.models.values():
            st, live = m.engine.snapshot()
            now = time.monotonic()
            models.append(pb.ModelStats(
                name=m.name, architecture=m.architecture, device=m.device, dtype=m.dtype, adapters=m.adapters,
                parameters=m.parameters, running=st.running, waiting=st.waiting, completed=st.completed, cancelled=st.cancelled,
                prompt_tokens=st.prompt_tokens, generated_tokens=st.generated_tokens, decode_steps=st.decode_steps,
                tokens_per_s=st.tokens_per_s(), mean_batch_size=st.batch_rows / st.decode_steps if st.decode_steps else 0.0,
                cache_bytes=st.cache_bytes, policy=getattr(getattr(m.engine, "policy", None), "name", "none"),
                context_switches=st.context_switches, switch_ms=st.switch_seconds * 1e3,
                swaps=st.strategy_counts.get("swap", 0), recomputes=st.strategy_counts.get("recompute", 0),
                preempted=sum(1 for _, state in live if state == "preempted"),
                suspended=sum(1 for _, state in live if state == "suspended"),
                cache_budget_bytes=getattr(getattr(m.engine, "budget", None), "cache_bytes", 0),
                preempted_by_reason=st.preempted_by_reason, queue_wait_ms=st.queue_wait_ms(),
                requests=[pb.RequestStats(request_id=v.request_id, agent_id=v.agent_id, model=m.name, state=state,
                                          prompt_tokens=v.prompt_tokens, generated_tokens=v.generated,
                                          age_ms=(now - v.arrival) * 1e3, preemptions=v.preemptions,
                                          priority=v.priority, cache_bytes=v.cache_bytes) for v, state in live],
            ))
        return pb.StatsReply(version=VERSION, uptime_s=time.time() - self.k.started,
                             active_agents=self.k.agents.active_count(), syscalls=self.k.syscalls,
                             in_flight=self.k.in_flight, models=models, default_model=self.k.llm.default,
                             tuner_jobs=[job_message(j) for j in self.k.tuner.list()])
