"""The Kernel service: converts to and from the agents use case (register, heartbeat, exit, list, stats)."""
from __future__ import annotations

import time

from kernos.proto.v1 import kernel_pb2 as pb
from kernos.proto.v1 import kernel_pb2_grpc as rpc

from ...security.registration import peer_address
from ...syscalls.agents import Agents, ModelLoad
from .interceptor import current_principal, token_from_metadata
from .tuner import job_message


def _agent_info(a) -> pb.AgentInfo:
    return pb.AgentInfo(agent_id=a.agent_id, name=a.agent_id, description=a.description, labels=a.labels,
                        state=a.state, registered_at=a.registered_at, last_seen=a.last_seen, syscalls=a.syscalls,
                        prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens)


def _model_stats(load: ModelLoad) -> pb.ModelStats:
    m, st, live = load.model, load.stats, load.live
    now = time.monotonic()
    return pb.ModelStats(
        name=m.name, architecture=m.architecture, device=m.device, dtype=m.dtype, adapters=m.adapters,
        parameters=m.parameters, running=st.running, waiting=st.waiting, completed=st.completed,
        cancelled=st.cancelled, prompt_tokens=st.prompt_tokens, generated_tokens=st.generated_tokens,
        decode_steps=st.decode_steps, tokens_per_s=st.tokens_per_s(),
        mean_batch_size=st.batch_rows / st.decode_steps if st.decode_steps else 0.0, cache_bytes=st.cache_bytes,
        policy=load.policy, context_switches=st.context_switches, switch_ms=st.switch_seconds * 1e3,
        swaps=st.strategy_counts.get("swap", 0), recomputes=st.strategy_counts.get("recompute", 0),
        preempted=load.preempted, suspended=load.suspended,
        cache_budget_bytes=load.cache_budget_bytes, preempted_by_reason=st.preempted_by_reason,
        queue_wait_ms=st.queue_wait_ms(), resident_bytes=st.resident_bytes, resident_entries=st.resident_entries,
        prefix_lookups=st.prefix_lookups, prefix_hits=st.prefix_hits, prefix_tokens_reused=st.prefix_tokens_reused,
        tool_pauses=st.pauses, draft_tokens=st.draft_tokens, draft_accepted=st.draft_accepted,
        requests=[pb.RequestStats(request_id=v.request_id, agent_id=v.agent_id, model=m.name, state=state,
                                  prompt_tokens=v.prompt_tokens, generated_tokens=v.generated,
                                  age_ms=(now - v.arrival) * 1e3, preemptions=v.preemptions, priority=v.priority,
                                  cache_bytes=v.cache_bytes, program_id=v.program_id) for v, state in live])


def _program_stats(p, now: float) -> pb.ProgramStats:
    return pb.ProgramStats(program_id=p.program_id, agent_id=p.agent_id, state=p.state, service_tokens=p.service,
                           calls=p.calls, tool_pauses=p.pauses, tool_pause_s=p.pause_s, age_s=now - p.started,
                           paused_on=list(p.paused_tools))


def _node_info(n, alive: bool) -> pb.NodeInfo:
    now = time.time()
    return pb.NodeInfo(node_id=n.node_id, grpc_address=n.grpc_address, http_address=n.http_address,
                       models=n.models, state=n.state, alive=alive, heartbeat_age_s=max(0.0, now - n.heartbeat),
                       uptime_s=max(0.0, now - n.started))


class KernelServicer(rpc.KernelServicer):
    def __init__(self, agents: Agents):
        self.agents = agents

    async def Register(self, r, context):
        agent, token = await self.agents.register(r.name, r.description, dict(r.labels),
                                                  token_from_metadata(context.invocation_metadata()),
                                                  peer_address(context.peer() or ""))
        return pb.RegisterReply(agent_id=agent.agent_id, token=token)

    async def Heartbeat(self, r, context):
        return pb.HeartbeatReply(server_time=await self.agents.heartbeat(current_principal()))

    async def Exit(self, r, context):
        await self.agents.exit(current_principal())
        return pb.ExitReply()

    async def ListAgents(self, r, context):
        agents = await self.agents.list(current_principal(), r.include_exited)
        return pb.ListAgentsReply(agents=[_agent_info(a) for a in agents])

    async def Stats(self, r, context):
        s = await self.agents.stats(current_principal())
        return pb.StatsReply(version=s.version, uptime_s=s.uptime_s, active_agents=s.active_agents,
                             syscalls=s.syscalls, in_flight=s.in_flight, default_model=s.default_model,
                             models=[_model_stats(m) for m in s.models], tuner_jobs=[job_message(j) for j in s.jobs],
                             programs=[_program_stats(p, time.monotonic()) for p in s.programs],
                             node_id=s.node_id, nodes=[_node_info(n, alive) for n, alive in s.nodes],
                             forwarded=s.forwarded, served_for_unreachable=s.served_for_unreachable)
