"""The generate syscall: one use case for every generation, an agent's (Generate, GenerateStream, Restore) or
the kernel's own on an agent's behalf (context summaries, data-set sampling). Split by role, each file read
top to bottom:

- `request.py`: validation and prompt building (the one place a request is checked), grammar compilation;
- `events.py`: running on the model's engine, quota lease and per-agent accounting, reply assembly;
- `tool_loop.py`: the kernel's tool loop (`tool_execution="kernel"`);
- `fanout.py`: n > 1 samples of one prompt;
- `control.py`: cancel, suspend, resume, snapshot and restore of running generations;
- `internal.py`: the kernel's own generations for an agent.

Its input and output types (and their trace views) are `syscalls/generation.py`."""
from __future__ import annotations

from dataclasses import replace

from kernos.abi.errors import invalid, unavailable
from kernos.scheduler import default_program_id

from ...llm.core import LLMCore
from ...llm.types import Finish
from ..contexts import ContextAssembler
from ..generation import Generation, Reply
from ..snapshots import SnapshotStore
from .control import Control
from .events import Runner
from .fanout import siblings
from .internal import Internal
from .request import Requests
from .tool_loop import ToolLoop


class Generate:
    def __init__(self, llm: LLMCore, limits, agents, quotas, access, adapters, traces, lifecycle, contexts, memory,
                 summary_max_tokens: int, snapshots: SnapshotStore, tools=None, observe=None):
        self.llm = llm
        self.lifecycle = lifecycle
        self.requests = Requests(llm, limits, adapters, access)
        self.runner = Runner(quotas, agents, llm.programs, observe)
        self.tool_loop = ToolLoop(tools, traces, limits)
        self.control = Control(llm, self.runner, self.requests, snapshots, limits, access, lifecycle)
        self.internal = Internal(llm, self.runner, traces, limits, self.requests.compile)
        self.contexts = ContextAssembler(contexts, memory, summary_max_tokens, self.internal)

    async def run(self, principal, g: Generation):
        """Yield Accepted, then TextDelta (and ToolCallDeltas) events, then the Reply (Generate and
        GenerateStream). With kernel tools run by the kernel: that per round, with a ToolRun per call run."""
        if not g.program_id:      # by default: its context's program, else its conversation's
            g = replace(g, program_id=default_program_id(g.messages, g.context_id))
        if g.tool_execution not in ("", "client", "kernel"):
            raise invalid(f"tool_execution must be 'client' or 'kernel', got '{g.tool_execution[:32]}'")
        if g.kernel_tools or g.tool_execution == "kernel":
            g, names = await self.tool_loop.offer(principal, g)
            if g.tool_execution == "kernel":
                async for ev in self.tool_loop.run(principal, g, names, self._run_once):
                    yield ev
                return
        async for ev in self._run_once(principal, g):
            yield ev

    async def _run_once(self, principal, g: Generation):
        if self.lifecycle.stopping:
            raise unavailable("the kernel is shutting down")
        context_id = g.context_id
        if context_id:  # the context's blocks plus the new messages, within its budget
            model_name, messages = await self.contexts.assemble(principal, g, self.llm)
            g = replace(g, messages=messages, model=model_name, context_id="", prompt="")
        model, req = self.requests.prepare(g, principal)
        await self.requests.compile(model, req)
        others = await siblings(model, req, g.n, self.requests.compile)
        async for ev in self.runner.events(principal, model, req, model.engine.submit, refuse=True, siblings=others):
            if isinstance(ev, Reply) and context_id and ev.finish in (Finish.STOP, Finish.LENGTH):
                await self.contexts.record_reply(principal, context_id, ev.text)
            yield ev

    # -- control of running generations ------------------------------------------------------------------------
    def restore(self, principal, snapshot_id: str):
        """Continue a snapshotted generation: the same events as `run`."""
        return self.control.restore(principal, snapshot_id)

    async def cancel(self, principal, request_id: str) -> None:
        await self.control.cancel(principal, request_id)

    async def suspend(self, principal, request_id: str) -> str:
        return await self.control.suspend(principal, request_id)

    async def resume(self, principal, request_id: str) -> str:
        return await self.control.resume(principal, request_id)

    async def snapshot(self, principal, request_id: str) -> str:
        return await self.control.snapshot(principal, request_id)
