"""Running a generation on its model's engine: submit it (and the other samples of its prompt), lease its tokens
from the agent's quota, turn the engine's events into the use case's (Accepted; text and tool-call deltas
tagged with their sample; one Reply), account the tokens to the agent, and keep it findable while it runs
(`live`: request id -> (agent id, model, handle)) for the control calls. The engine reports tokens per
request; accounting per agent happens here."""
from __future__ import annotations

import asyncio

from kernos.abi.errors import StatusError

from ...llm.core import ServedModel
from ...llm.tool_calls import ToolCallStream
from ...llm.types import Failed, Final, Finish, GenRequest, RequestHandle, TextDelta
from ..generation import Accepted, Choice, Reply, ToolCallDeltas


async def merged(handles: list[RequestHandle]):
    """(index, event) from several handles as they come; one handle is read directly."""
    if len(handles) == 1:
        async for ev in handles[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        async for ev in h.events():
            await queue.put((i, ev))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        ended = 0
        while ended < len(handles):
            i, ev = await queue.get()
            if isinstance(ev, (Final, Failed)):
                ended += 1
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


class Runner:
    def __init__(self, quotas, agents, programs, observe=None):
        self.quotas = quotas
        self.agents = agents
        self.programs = programs                      # kernos.scheduler.Programs: the kernel's program table
        self.observe = observe or (lambda *a: None)   # metrics: a finished generation's latencies
        self.live: dict[str, tuple[str, ServedModel, RequestHandle]] = {}

    async def events(self, principal, model: ServedModel, req: GenRequest, submit, refuse: bool,
                      siblings: list[GenRequest] | None = None):
        """Submit a request (and the other samples of its prompt, n > 1) and turn the engine's events into the
        use case's: Accepted; TextDelta / ToolCallDeltas tagged with their sample's index; one Reply."""
        reqs = [req] + list(siblings or [])
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(r, loop) for r in reqs]
        with self.quotas.generation(principal.agent_id, len(req.prompt_ids), refuse=refuse) as lease:
            program = self.programs.begin(principal.agent_id, req.program_id)
            try:
                for r, h in zip(reqs, handles):
                    r.program = program
                    result = submit(r, h)
                    if asyncio.iscoroutine(result):
                        await result
                    self.live[r.request_id] = (principal.agent_id, model, h)
            except BaseException:
                self.programs.end(program)
                raise
            streams = [ToolCallStream(r.output) for r in reqs]   # tool calls out of the text (else text as is)
            finals: list[Final | None] = [None] * len(reqs)
            try:
                yield Accepted(req.request_id)
                async for i, ev in merged(handles):
                    if isinstance(ev, TextDelta):
                        text, deltas = streams[i].feed(ev.text)
                        if text or ev.logprobs:
                            yield TextDelta(text, ev.tokens, i, logprobs(model, ev.logprobs))
                        if deltas:
                            yield ToolCallDeltas(deltas, i)
                    elif isinstance(ev, Failed):
                        raise StatusError("INTERNAL", ev.message)
                    else:
                        finals[i] = ev
                        self.observe(model.name, ev, reqs[i].request_id, principal.agent_id)
                        _, _, rest = streams[i].finish()
                        if rest:
                            yield TextDelta(rest, ev.completion_tokens, i)
                completion = sum(f.completion_tokens for f in finals)
                lease.completed(completion)
                self.agents.add_tokens(principal, finals[0].prompt_tokens, completion)
                out = reply(model, req, finals, streams)
                if out.finish == Finish.TOOL_CALLS and program is not None:
                    ttl = self.programs.end(program, [c["name"] for c in out.tool_calls])
                    model.engine.pause(req.request_id, program.program_id, ttl)   # its KV kept through the pause
                    program = None
                yield out
            except (asyncio.CancelledError, GeneratorExit):
                for h in handles:
                    h.cancel()  # the client went away: free the batch slots
                raise
            finally:
                self.programs.end(program)
                for r in reqs:
                    self.live.pop(r.request_id, None)


def logprobs(model: ServedModel, raw: list) -> list:
    """The engine's (token id, logprob, [(id, logprob)]) as (token, id, logprob, [(token, id, logprob)])."""
    return [(model.token_text(t), t, lp, [(model.token_text(a), a, b) for a, b in top]) for t, lp, top in raw]


def reply(model: ServedModel, req: GenRequest, finals: list[Final], streams: list[ToolCallStream]) -> Reply:
    choices = []
    for i, (final, calls) in enumerate(zip(finals, streams)):
        text = "".join(calls.content) if calls.enabled else final.text
        finish = Finish.TOOL_CALLS if calls.calls and final.finish == Finish.STOP else final.finish
        choices.append(Choice(i, text, finish, list(calls.calls), final.completion_tokens,
                              logprobs(model, final.logprobs), final.closed))
    first, head = finals[0], choices[0]
    return Reply(req.request_id, head.text, model.name, req.adapter or "", head.finish, first.prompt_tokens,
                 sum(c.completion_tokens for c in choices), first.queue_wait_ms, first.ttft_ms,
                 max(f.total_ms for f in finals), first.snapshot_id, head.tool_calls,
                 prompt_logprobs=logprobs(model, first.prompt_logprobs), choices=choices)
