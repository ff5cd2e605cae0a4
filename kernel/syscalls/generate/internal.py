"""Generations the kernel runs on an agent's behalf (a context's summary, a data set's samples): the model's
base, the newest tokens of the prompt that fit, no quota refusal; accounted to the agent and traced
here as `llm.internal` (an agent's own generations are traced by the edge)."""
from __future__ import annotations

import time
import uuid

from kernos.abi.errors import StatusError, not_found
from kernos.abi.trace import TraceRecord

from ...llm.core import LLMCore
from ...llm.types import GenRequest
from ..generation import Reply
from .events import Runner


class Internal:
    def __init__(self, llm: LLMCore, runner: Runner, traces, limits, compile):
        self.llm = llm
        self.compile = compile      # a request's grammar, as every request's is compiled (time limit, clear errors)
        self.runner = runner
        self.traces = traces
        self.limits = limits

    async def __call__(
        self,
        principal,
        messages: list[dict],
        max_tokens: int,
        *,
        cause: str,
        model: str = "",
        temperature: float = 0.0,
        seed: int | None = None,
        output=None,
        adapter: str | None = None,
    ) -> Reply:
        """A generation the kernel runs for `principal` (a summary, a data-set sample): its base model, the
        newest tokens of the prompt that leave `max_tokens` of the window; accounted to the agent and traced as
        'llm.internal'. `output` (a structured.OutputSpec) constrains the reply as a request's would; `adapter`: a
        served adapter (the caller's own or granted, checked by the caller) instead of the base."""
        served = self.llm.get(model)
        if served is None:
            raise not_found(f"unknown model '{model}'")
        ids = served.encode_chat(messages, output)[-self.limits.prompt_limit(served.context_length, max_tokens) :]
        req = GenRequest(
            request_id=uuid.uuid4().hex,
            agent_id=principal.agent_id,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            output=output,
            adapter=adapter,
        )
        await self.compile(served, req)
        t0 = time.monotonic()
        reply, status = None, "INTERNAL"
        try:
            async for ev in self.runner.events(principal, served, req, served.engine.submit, refuse=False):
                if isinstance(ev, Reply):
                    reply, status = ev, "OK"
        finally:
            self.traces.record(
                TraceRecord(
                    principal.agent_id,
                    "llm.internal",
                    status,
                    {
                        "cause": cause,
                        "model": served.name,
                        "messages": messages,
                        "max_tokens": max_tokens,
                        "temperature": temperature,
                        "seed": seed,
                        "adapter": adapter or "",
                    },
                    {"request_id": req.request_id, "text": reply.text, "completion_tokens": reply.completion_tokens}
                    if reply
                    else {},
                    {"syscall_ms": (time.monotonic() - t0) * 1e3},
                )
            )
        if reply is None:
            raise StatusError("INTERNAL", "the engine closed the request without a result")
        return reply
