"""What flows between the syscall layer and an engine: a request in, events out through a handle.

Engines run on their own threads; the gRPC side lives on an asyncio loop. A handle is the meeting
point: the engine puts events into a thread-safe queue, and either an asyncio consumer (`events()`)
or a blocking one (`result()`) reads them.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

from kernos.abi.errors import StatusError


class Finish(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    SNAPSHOT = "snapshot"       # checkpointed to disk and released; Restore continues it
    TOOL_CALLS = "tool_calls"   # a reply that is tool calls (decided from the text, after the engine)


@dataclass
class Shaping:
    """A request's sampling fields beyond temperature, top-p and top-k, with OpenAI's and vLLM's meanings:
    penalties on tokens already seen (repetition: prompt and output, multiplicative; frequency and presence:
    output, additive), a bias per token id, min-p, token ids that end the reply, a floor on its length, and
    whether the end-of-sequence token ends it. The defaults change nothing."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def penalizes(self) -> bool:
        """Whether anything here changes the logits before the grammar and the sampler see them."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def ends(self, eos_ids) -> frozenset[int]:
        """The tokens that end a reply: EOS (unless ignored) and the stop token ids."""
        return frozenset((set() if self.ignore_eos else set(eos_ids)) | set(self.stop_token_ids))

    def fields_set(self) -> list[str]:
        """The names of the fields that differ from their defaults (what an engine must support)."""
        default = Shaping()
        return [k for k in self.__dataclass_fields__ if getattr(self, k) != getattr(default, k)]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.fields_set()}

    @classmethod
    def from_dict(cls, d: dict | None) -> Shaping:
        d = dict(d or {})
        if "logit_bias" in d:
            d["logit_bias"] = {int(k): float(v) for k, v in d["logit_bias"].items()}
        return cls(**d)


@dataclass
class GenRequest:
    request_id: str
    agent_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    priority: int = 0
    arrival: float = field(default_factory=time.monotonic)
    output: object = None       # structured.OutputSpec: tools, tool choice, response format (None: free text)
    matcher: object = None      # its compiled grammar, this request's own (llguidance LLMatcher)
    logprobs: bool = False      # record each generated token's log-probability ...
    top_logprobs: int = 0       # ... and the most likely alternatives (up to 20)
    group: str = ""             # samples of one prompt (n > 1) share this id: the prompt is prefilled once
    group_size: int = 1
    shaping: Shaping = field(default_factory=Shaping)
    prompt_logprobs: bool = False   # score the prompt: each token's log-probability (and top_logprobs alternatives)
    program_id: str = ""            # its agent program ("": none)
    program: object = None          # kernos.scheduler.Program: engines add the tokens they compute for it

    def program_fields(self) -> tuple[str, int, float]:
        """Its program's id, attained service and start, as a RequestView takes them."""
        p = self.program
        return (self.program_id, p.service, p.started) if p is not None else (self.program_id, 0, 0.0)


@dataclass
class TextDelta:
    text: str
    tokens: int                 # tokens generated so far
    index: int = 0              # which sample of the prompt (n > 1)
    logprobs: list = field(default_factory=list)   # the log-probabilities of the tokens this text completes


@dataclass
class Final:
    text: str
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    queue_wait_ms: float
    ttft_ms: float
    total_ms: float
    token_ids: list[int] = field(default_factory=list)
    preemptions: int = 0
    snapshot_id: str = ""
    logprobs: list = field(default_factory=list)   # [(token id, logprob, [(token id, logprob), ...])]
    prompt_logprobs: list = field(default_factory=list)   # the same per prompt token (the first: logprob None)
    closed: bool = False        # its grammar's shortest ending was written as the budget ran out


@dataclass
class Failed:
    message: str


class EngineClosed(StatusError):
    """The engine is draining or stopped and takes no new requests."""

    def __init__(self, message: str):
        super().__init__("UNAVAILABLE", message)


class AdapterInUse(RuntimeError):
    """A new version of an adapter cannot replace the loaded one while requests use it; retry later."""


class RequestTooLarge(StatusError):
    """The request could never fit the engine's cache budget."""

    def __init__(self, message: str):
        super().__init__("RESOURCE_EXHAUSTED", message)


class RequestHandle:
    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = loop
        self._ready = asyncio.Event() if loop is not None else None
        self._cancelled = threading.Event()

    # -- engine side ---------------------------------------------------------------------------------
    def put(self, event) -> None:
        self._q.put(event)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- consumer side -------------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    async def events(self):
        """Yield TextDelta events, then one Final or Failed (asyncio consumers)."""
        assert self._ready is not None, "handle was created without an event loop"
        while True:
            try:
                ev = self._q.get_nowait()
            except queue.Empty:
                await self._ready.wait()
                self._ready.clear()
                continue
            yield ev
            if isinstance(ev, (Final, Failed)):
                return

    def result(self, timeout: float | None = None) -> Final:
        """Block until the request ends (threaded consumers); raise on failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ev = self._q.get(timeout=left)
            if isinstance(ev, Final):
                return ev
            if isinstance(ev, Failed):
                raise RuntimeError(ev.message)
