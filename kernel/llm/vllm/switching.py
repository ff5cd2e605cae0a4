"""Context switching of generations on vLLM: suspend and snapshot abort the vLLM request and keep the tokens;
resume and restore start a new vLLM request whose prompt is the prompt plus those tokens (a recompute, cheap with
prefix caching). A grammar's state cannot be handed to vLLM, so a structured generation is not switched here
(FAILED_PRECONDITION, with the reason). Mixed into `VllmEngine`; runs on its loop."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from kernos.abi.errors import StatusError

from ..engine import snapshot as snapshot_format
from ..engine.detokenizer import Detokenizer
from ..tool_calls import repeat_watch
from ..types import EngineClosed, Finish, GenRequest, RequestHandle


@dataclass
class Run:
    """One generation while the kernel knows it: its tokens so far survive vLLM requests (suspend, resume)."""

    req: GenRequest
    handle: RequestHandle
    detok: Detokenizer
    lora: object = None
    ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    lp_sent: int = 0                # log-probabilities already sent with a text delta
    prompt_logprobs: list = field(default_factory=list)    # with req.prompt_logprobs: the prompt's, scored
    repeats: object = None          # tool_calls.RepeatWatch: a reply of several calls ends at a repeated one
    state: str = "waiting"          # waiting | running | suspended
    task: asyncio.Task | None = None
    attempt: int = 0
    stopping: str = ""              # why its task is being cancelled: cancel | suspend | snapshot
    first_token_at: float = 0.0
    queue_wait_ms: float = -1.0
    enqueued: float = 0.0
    preemptions: int = 0


class Switching:
    def suspend(self, request_id: str) -> Future:
        return self._call(self._suspend(request_id, "suspend"))

    def resume(self, request_id: str) -> Future:
        return self._call(self._resume(request_id))

    def checkpoint(self, request_id: str, directory: Path) -> Future:
        return self._call(self._checkpoint(request_id, directory))

    def restore(self, directory: Path, request: GenRequest, handle: RequestHandle) -> None:
        """Continue a snapshot (see `checkpoint`): a new vLLM request over its prompt and tokens."""
        state = snapshot_format.read_state(directory)
        if not self._accepting or self._loop is None:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        run = Run(request, handle, Detokenizer(self.tokenizer, request.stop), enqueued=request.arrival,
                  repeats=repeat_watch(request))
        run.ids, run.preemptions = list(state["ids"]), state.get("preemptions", 0)
        run.detok.restore(run.ids, state.get("emitted", 0))
        run.logprobs = [(t, lp, [tuple(x) for x in top]) for t, lp, top in state.get("logprobs", [])]
        self._loop.call_soon_threadsafe(self._admit, run)

    @staticmethod
    def snapshot_request(directory: Path, request_id: str) -> GenRequest:
        return snapshot_format.request(directory, request_id)

    def _refuse_structured(self, run: Run, what: str) -> None:
        if run.req.output is not None and run.req.output.constrained:
            raise StatusError("FAILED_PRECONDITION", f"model '{self.name}' runs on vLLM, which cannot {what} a "
                                                     "generation with tools or a response format (its grammar's "
                                                     "state cannot be handed back to vLLM)")

    async def _suspend(self, request_id: str, why: str) -> str:
        run = self._find(request_id)
        self._refuse_structured(run, why)
        if run.state != "suspended":
            await self._stop_task(run, why)
            if request_id not in self._live:       # it finished meanwhile
                raise StatusError("NOT_FOUND", f"generation '{request_id}' has already finished")
            run.state, run.enqueued = "suspended", time.monotonic()
            run.preemptions += 1
            self.stats.context_switches += 1
            self.stats.preempted_by_reason[why] = self.stats.preempted_by_reason.get(why, 0) + 1
            self.stats.strategy_counts["recompute"] = self.stats.strategy_counts.get("recompute", 0) + 1
        return "preempted"

    async def _resume(self, request_id: str) -> str:
        run = self._find(request_id)
        if run.state == "suspended":
            self._launch(run)
        return run.state

    async def _unpark_all(self) -> None:
        for run in list(self._live.values()):
            if run.state == "suspended":
                self._launch(run)

    async def _checkpoint(self, request_id: str, directory: Path) -> Path:
        run = self._find(request_id)
        self._refuse_structured(run, "snapshot")
        await self._suspend(request_id, "snapshot")
        state = {**snapshot_format.request_state(run.req, self.name), "engine": "vllm", "ids": run.ids,
                 "emitted": len(run.detok.text), "preemptions": run.preemptions, "has_cache": False,
                 "logprobs": run.logprobs}
        await asyncio.to_thread(snapshot_format.write_folder, directory, state)
        self._finish(run, Finish.SNAPSHOT, snapshot_id=directory.name)
        return directory
