"""The LLM service: converts requests to the generate use case's terms and its events back to messages."""
from __future__ import annotations

import json

from kernos.proto.v1 import llm_pb2 as pb
from kernos.proto.v1 import llm_pb2_grpc as rpc

from ...llm.types import Finish, Shaping, TextDelta
from ...syscalls.generate import Generate
from ...syscalls.generation import (
    Accepted,
    Generation,
    Reply,
    ToolCallDeltas,
    ToolRun,
    reply_view,
    request_view,
)
from ...syscalls.models import Models
from .interceptor import current_principal, trace_views

_FINISH = {Finish.STOP: pb.FINISH_REASON_STOP, Finish.LENGTH: pb.FINISH_REASON_LENGTH,
           Finish.CANCELLED: pb.FINISH_REASON_CANCELLED, Finish.SNAPSHOT: pb.FINISH_REASON_SNAPSHOT,
           Finish.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS}


def _message(m: pb.ChatMessage) -> dict:
    out = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def generation(r: pb.GenerateRequest) -> Generation:
    s = r.sampling
    return Generation(
        messages=[_message(m) for m in r.messages], prompt=r.prompt, prompt_ids=list(r.prompt_ids), model=r.model,
        adapter=r.adapter, max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None, top_k=s.top_k, stop=list(s.stop),
        seed=s.seed if s.HasField("seed") else None, priority=r.priority, context_id=r.context_id, size=r.ByteSize(),
        tools=[{"name": t.name, "description": t.description, "parameters_json": t.parameters_json,
                "strict": t.strict} for t in r.tools],
        tool_choice=r.tool_choice,
        parallel_tool_calls=r.parallel_tool_calls if r.HasField("parallel_tool_calls") else None,
        response_format=r.response_format.type, schema_json=r.response_format.schema_json,
        strict=r.response_format.strict, kernel_tools=list(r.kernel_tools), tool_execution=r.tool_execution,
        max_tool_rounds=r.max_tool_rounds, n=r.n or 1, logprobs=r.logprobs, top_logprobs=r.top_logprobs,
        first_tool_choice=r.first_tool_choice, shaping=shaping(s), prompt_logprobs=r.prompt_logprobs,
        program_id=r.program_id)


def shaping(s: pb.SamplingParams) -> Shaping:
    return Shaping(frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                   repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
                   logit_bias=dict(s.logit_bias), min_p=s.min_p, stop_token_ids=list(s.stop_token_ids),
                   min_tokens=s.min_tokens, ignore_eos=s.ignore_eos)


def _calls(calls: list[dict]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in calls]


def _choice(c) -> pb.Choice:
    return pb.Choice(index=c.index, text=c.text, finish_reason=_FINISH[c.finish], tool_calls=_calls(c.tool_calls),
                     completion_tokens=c.completion_tokens,
                     logprobs=[_logprob(*x) for x in c.logprobs], closed_at_budget=c.closed)


def _logprob(token: str, token_id: int, logprob: float, top: list) -> pb.TokenLogprob:
    return pb.TokenLogprob(token=token, token_id=token_id, logprob=logprob,
                           top_logprobs=[pb.TopLogprob(token=a, token_id=b, logprob=x) for a, b, x in top])


def _tool_run(run: ToolRun) -> pb.ToolRun:
    c = run.call
    return pb.ToolRun(call=pb.ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]), state=run.state,
                      result_json=json.dumps(run.result) if run.state == "done" else "", error=run.error,
                      duration_ms=run.duration_ms)


def reply_message(r: Reply) -> pb.GenerateReply:
    return pb.GenerateReply(
        request_id=r.request_id, text=r.text, model=r.model, adapter=r.adapter, finish_reason=_FINISH[r.finish],
        usage=pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
        timings=pb.Timings(queue_wait_ms=r.queue_wait_ms, time_to_first_token_ms=r.ttft_ms, total_ms=r.total_ms),
        snapshot_id=r.snapshot_id,
        tool_calls=_calls(r.tool_calls), tool_runs=[_tool_run(x) for x in r.tool_runs],
        choices=[_choice(c) for c in r.choices],
        prompt_logprobs=[pb.PromptLogprob(token=t, token_id=i, logprob=lp, top_logprobs=[
            pb.TopLogprob(token=a, token_id=b, logprob=x) for a, b, x in top]) for t, i, lp, top in r.prompt_logprobs])


async def _chunks(events):
    request_id = ""
    async for ev in events:
        if isinstance(ev, Reply):
            trace_views(reply=reply_view(ev))
        if isinstance(ev, Accepted):
            request_id = ev.request_id
            yield pb.GenerateChunk(request_id=request_id)
        elif isinstance(ev, TextDelta):
            yield pb.GenerateChunk(request_id=request_id, text=ev.text, tokens=ev.tokens, index=ev.index,
                                   logprobs=[_logprob(*x) for x in ev.logprobs])
        elif isinstance(ev, ToolCallDeltas):
            yield pb.GenerateChunk(request_id=request_id, tool_calls=[pb.ToolCallDelta(**d) for d in ev.deltas],
                                   index=ev.choice)
        elif isinstance(ev, ToolRun):
            yield pb.GenerateChunk(request_id=request_id, tool_run=_tool_run(ev))
        else:
            yield pb.GenerateChunk(request_id=request_id, tokens=ev.completion_tokens, done=True,
                                   reply=reply_message(ev))


class LLMServicer(rpc.LLMServicer):
    def __init__(self, generate: Generate, models: Models):
        self.generate = generate
        self.models = models

    async def Generate(self, request, context):
        g, reply = generation(request), None
        trace_views(request=request_view(g))
        async for ev in self.generate.run(current_principal(), g):
            if isinstance(ev, Reply):
                reply = ev
        trace_views(reply=reply_view(reply))
        return reply_message(reply)

    async def GenerateStream(self, request, context):
        g = generation(request)
        trace_views(request=request_view(g))
        async for chunk in _chunks(self.generate.run(current_principal(), g)):
            yield chunk

    async def Restore(self, request, context):
        async for chunk in _chunks(self.generate.restore(current_principal(), request.snapshot_id)):
            yield chunk

    async def Suspend(self, request, context):
        return pb.SuspendReply(state=await self.generate.suspend(current_principal(), request.request_id))

    async def Resume(self, request, context):
        return pb.ResumeReply(state=await self.generate.resume(current_principal(), request.request_id))

    async def Snapshot(self, request, context):
        return pb.SnapshotReply(snapshot_id=await self.generate.snapshot(current_principal(), request.request_id))

    async def ListModels(self, request, context):
        default = self.models.default
        return pb.ListModelsReply(models=[
            pb.ModelInfo(name=m.name, architecture=m.architecture, device=m.device, adapters=m.adapters,
                         context_length=m.context_length, is_default=(m.name == default))
            for m in self.models.served()])
