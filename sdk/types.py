"""Typed results of syscalls (pydantic models), converted from the wire messages."""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel

from kernos.proto.v1 import access_pb2, kernel_pb2, llm_pb2, memory_pb2, storage_pb2, tools_pb2, tuner_pb2


class ToolCall(BaseModel):
    """A call the model made: `arguments` is a JSON object as a string (`args` parses it)."""
    id: str
    name: str
    arguments: str

    @property
    def args(self) -> dict:
        return json.loads(self.arguments or "{}")


class ToolCallDelta(BaseModel):
    """A piece of a tool call while streaming: the first of call `index` has its id and name, later ones
    fragments of its arguments."""
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


class ToolRun(BaseModel):
    """A call the kernel ran for the model (tool_execution="kernel")."""
    call: ToolCall
    state: str                          # done | error | denied
    result: Any = None
    error: str = ""
    duration_ms: float = 0.0

    @classmethod
    def from_proto(cls, r) -> "ToolRun":
        return cls(call=ToolCall(id=r.call.id, name=r.call.name, arguments=r.call.arguments), state=r.state,
                   result=json.loads(r.result_json) if r.result_json else None, error=r.error,
                   duration_ms=r.duration_ms)


class TopLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob] = []

    @classmethod
    def from_proto(cls, x) -> "TokenLogprob":
        return cls(token=x.token, token_id=x.token_id, logprob=x.logprob, top_logprobs=[
            TopLogprob(token=y.token, token_id=y.token_id, logprob=y.logprob) for y in x.top_logprobs])


class PromptLogprob(BaseModel):
    """A prompt token's log-probability given the tokens before it (None for the first)."""
    token: str
    token_id: int
    logprob: float | None
    top_logprobs: list[TopLogprob] = []

    @classmethod
    def from_proto(cls, x) -> "PromptLogprob":
        return cls(token=x.token, token_id=x.token_id, logprob=x.logprob if x.HasField("logprob") else None,
                   top_logprobs=[TopLogprob(token=y.token, token_id=y.token_id, logprob=y.logprob)
                                 for y in x.top_logprobs])


class Choice(BaseModel):
    """One sample of the prompt (`n` > 1 gives several; choices[0] is the completion's own text)."""
    index: int
    text: str
    finish_reason: str
    tool_calls: list[ToolCall] = []
    completion_tokens: int
    logprobs: list[TokenLogprob] = []
    closed_at_budget: bool = False      # under a grammar: its shortest valid ending was written as max_tokens neared

    @classmethod
    def from_proto(cls, c) -> "Choice":
        return cls(index=c.index, text=c.text, finish_reason=_FINISH.get(c.finish_reason, "unspecified"),
                   tool_calls=[ToolCall(id=t.id, name=t.name, arguments=t.arguments) for t in c.tool_calls],
                   completion_tokens=c.completion_tokens,
                   logprobs=[TokenLogprob.from_proto(x) for x in c.logprobs], closed_at_budget=c.closed_at_budget)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = []     # assistant: the calls it made
    tool_call_id: str | None = None     # tool: the call this answers
    name: str | None = None             # tool: its name (optional)

    @classmethod
    def coerce(cls, m) -> "Message":
        """A Message from a Message or a dict, also in OpenAI's shape (tool_calls with "function")."""
        if isinstance(m, Message):
            return m
        m = dict(m)
        calls = []
        for c in m.get("tool_calls") or ():
            c = c.model_dump() if isinstance(c, BaseModel) else dict(c)
            f = c.get("function") or c
            args = f.get("arguments", "{}")
            calls.append(ToolCall(id=c.get("id", ""), name=f.get("name", ""),
                                  arguments=args if isinstance(args, str) else json.dumps(args)))
        m["tool_calls"] = calls
        m["content"] = m.get("content") or ""
        return cls.model_validate({k: v for k, v in m.items() if k in cls.model_fields})


Messages = Union[str, list[Union[Message, dict]]]

FinishReason = Literal["stop", "length", "cancelled", "snapshot", "tool_calls", "unspecified"]
_FINISH = {llm_pb2.FINISH_REASON_STOP: "stop", llm_pb2.FINISH_REASON_LENGTH: "length",
           llm_pb2.FINISH_REASON_CANCELLED: "cancelled", llm_pb2.FINISH_REASON_SNAPSHOT: "snapshot",
           llm_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls", llm_pb2.FINISH_REASON_UNSPECIFIED: "unspecified"}


class Completion(BaseModel):
    """The result of a generation syscall."""
    request_id: str
    text: str
    model: str
    adapter: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_wait_ms: float
    time_to_first_token_ms: float
    total_ms: float
    snapshot_id: str | None = None   # set when finish_reason is "snapshot"
    tool_calls: list[ToolCall] = []  # finish_reason "tool_calls": the calls to run (text: any text beside)
    parsed: Any = None               # with response_format=<a pydantic model>: the reply as that model
    tool_runs: list[ToolRun] = []    # tool_execution="kernel": the calls the kernel ran, in order
    choices: list[Choice] = []       # every sample (n); choices[0] is this completion's own
    prompt_logprobs: list[PromptLogprob] = []   # prompt_logprobs=True: one per prompt token

    @property
    def prompt_logprob(self) -> float:
        """The prompt's log-likelihood: the sum of its tokens' log-probabilities (the first has none)."""
        return sum(x.logprob for x in self.prompt_logprobs if x.logprob is not None)

    @classmethod
    def from_proto(cls, r: llm_pb2.GenerateReply) -> "Completion":
        return cls(request_id=r.request_id, text=r.text, model=r.model, adapter=r.adapter or None,
                   finish_reason=_FINISH.get(r.finish_reason, "unspecified"), prompt_tokens=r.usage.prompt_tokens,
                   completion_tokens=r.usage.completion_tokens, queue_wait_ms=r.timings.queue_wait_ms,
                   time_to_first_token_ms=r.timings.time_to_first_token_ms, total_ms=r.timings.total_ms,
                   snapshot_id=r.snapshot_id or None,
                   tool_calls=[ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in r.tool_calls],
                   tool_runs=[ToolRun.from_proto(x) for x in r.tool_runs],
                   choices=[Choice.from_proto(c) for c in r.choices],
                   prompt_logprobs=[PromptLogprob.from_proto(x) for x in r.prompt_logprobs])

    def message(self) -> Message:
        """This reply as the assistant message to append to the conversation."""
        return Message(role="assistant", content=self.text, tool_calls=self.tool_calls)


class Chunk(BaseModel):
    """A piece of a streamed generation; the last one has `done=True` and the whole `completion`.
    The first chunk arrives as soon as the kernel accepts the request (empty text) and, like every
    chunk, carries `request_id` (for `session.llm.suspend` / `resume`)."""
    request_id: str
    text: str
    tokens: int
    done: bool
    completion: Completion | None = None
    tool_calls: list[ToolCallDelta] = []
    tool_run: ToolRun | None = None     # tool_execution="kernel": a call the kernel just ran
    index: int = 0                      # n > 1: the sample this text and these tool calls belong to
    logprobs: list[TokenLogprob] = []   # with logprobs: those of the tokens this chunk's text completes

    @classmethod
    def from_proto(cls, c: llm_pb2.GenerateChunk) -> "Chunk":
        return cls(request_id=c.request_id, text=c.text, tokens=c.tokens, done=c.done,
                   completion=Completion.from_proto(c.reply) if c.done else None,
                   tool_calls=[ToolCallDelta(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
                               for d in c.tool_calls],
                   tool_run=ToolRun.from_proto(c.tool_run) if c.HasField("tool_run") else None, index=c.index,
                   logprobs=[TokenLogprob.from_proto(x) for x in c.logprobs])


class ModelInfo(BaseModel):
    name: str
    architecture: str
    device: str
    adapters: list[str]
    context_length: int
    is_default: bool


class AgentInfo(BaseModel):
    agent_id: str
    description: str
    labels: dict[str, str]
    state: str
    registered_at: float
    last_seen: float
    syscalls: int
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def from_proto(cls, a: kernel_pb2.AgentInfo) -> "AgentInfo":
        return cls(agent_id=a.agent_id, description=a.description, labels=dict(a.labels), state=a.state,
                   registered_at=a.registered_at, last_seen=a.last_seen, syscalls=a.syscalls,
                   prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens)


class FileInfo(BaseModel):
    """One version of a stored file."""
    path: str
    version: int
    size: int
    sha256: str
    created: float
    deleted: bool
    metadata: dict[str, str]

    @classmethod
    def from_proto(cls, f: storage_pb2.FileInfo) -> "FileInfo":
        return cls(path=f.path, version=f.version, size=f.size, sha256=f.sha256, created=f.created,
                   deleted=f.deleted, metadata=dict(f.metadata))


class MemoryItem(BaseModel):
    """An entry of long-term vector memory; `distance` is set on search results (cosine, smaller is closer)."""
    id: str
    text: str
    metadata: dict[str, str]
    created: float
    distance: float | None = None

    @classmethod
    def from_proto(cls, m: memory_pb2.MemoryItem, distance: float | None = None) -> "MemoryItem":
        return cls(id=m.id, text=m.text, metadata=dict(m.metadata), created=m.created, distance=distance)


class ContextInfo(BaseModel):
    context_id: str
    budget_tokens: int
    summarize: bool
    blocks: int
    evicted: int
    created: float
    model: str

    @classmethod
    def from_proto(cls, c: memory_pb2.ContextInfo) -> "ContextInfo":
        return cls(context_id=c.context_id, budget_tokens=c.budget_tokens, summarize=c.summarize, blocks=c.blocks,
                   evicted=c.evicted, created=c.created, model=c.model)


class ContextBlock(BaseModel):
    """A block of a working context: pinned blocks stay; turns may be evicted; a summary replaces them."""
    block_id: str
    role: str
    content: str
    pinned: bool
    kind: str
    label: str
    seq: int
    tokens: int

    @classmethod
    def from_proto(cls, b: memory_pb2.ContextBlock) -> "ContextBlock":
        return cls(block_id=b.block_id, role=b.role, content=b.content, pinned=b.pinned, kind=b.kind,
                   label=b.label, seq=b.seq, tokens=b.tokens)


class FileHit(BaseModel):
    """A file whose indexed content matches a storage search, with its best passage."""
    path: str
    version: int
    snippet: str
    distance: float


class GrantInfo(BaseModel):
    """Access granted by `owner` to `grantee` (an agent or "group:NAME") on a memory namespace or storage prefix."""
    grant_id: str
    grantee: str
    kind: str
    owner: str
    resource: str
    permission: str
    created: float
    expires: float
    revoked: bool
    granted_by: str

    @classmethod
    def from_proto(cls, g: access_pb2.GrantInfo) -> "GrantInfo":
        return cls(grant_id=g.grant_id, grantee=g.grantee, kind=g.kind, owner=g.owner, resource=g.resource,
                   permission=g.permission, created=g.created, expires=g.expires, revoked=g.revoked,
                   granted_by=g.granted_by)


class ToolResult(BaseModel):
    """A tool call: state "done" (with `result`), "error", "pending" (waiting for an operator) or "denied"."""
    call_id: str
    tool: str
    state: str
    agent_id: str = ""
    result: object = None
    error: str = ""
    duration_ms: float = 0.0

    @classmethod
    def from_proto(cls, c: tools_pb2.ToolCallReply) -> "ToolResult":
        return cls(call_id=c.call_id, tool=c.tool, state=c.state, agent_id=c.agent_id, error=c.error,
                   duration_ms=c.duration_ms,
                   result=json.loads(c.result_json) if c.result_json else None)


class EvalResult(BaseModel):
    """A held-out evaluation: mean loss on assistant tokens, and accuracy where the data set has answers."""
    loss: float | None = None
    accuracy: float | None = None
    examples: int = 0

    @classmethod
    def from_proto(cls, e: tuner_pb2.Eval) -> "EvalResult":
        return cls(loss=e.loss if e.HasField("loss") else None,
                   accuracy=e.accuracy if e.HasField("accuracy") else None, examples=e.examples)


class JobInfo(BaseModel):
    """A fine-tuning job: state queued | running | published | rejected | failed | cancelled."""
    job_id: str
    owner: str
    name: str
    dataset: str
    model: str
    state: str
    step: int
    total_steps: int
    loss: float | None = None
    steps_per_s: float = 0.0
    eta_s: float | None = None
    base: EvalResult
    tuned: EvalResult
    adapter: str = ""
    version: int = 0
    message: str = ""
    peak_rss_mb: float = 0.0
    created: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    config: dict = {}
    resumed_from_step: int = 0
    method: str = "sft"
    retention: dict = {}        # {"replay", "generic"}: agreement and KL with the base model off the task
    start_from: str = ""        # the adapter it continued from ("OWNER:NAME vN"; "": the base)

    @property
    def done(self) -> bool:
        return self.state in ("published", "rejected", "failed", "cancelled")

    @classmethod
    def from_proto(cls, j: tuner_pb2.Job) -> "JobInfo":
        return cls(job_id=j.job_id, owner=j.owner, name=j.name, dataset=j.dataset, model=j.model, state=j.state,
                   step=j.step, total_steps=j.total_steps, loss=j.loss if j.HasField("loss") else None,
                   steps_per_s=j.steps_per_s, eta_s=j.eta_s if j.HasField("eta_s") else None,
                   base=EvalResult.from_proto(j.base), tuned=EvalResult.from_proto(j.tuned), adapter=j.adapter,
                   version=j.version, message=j.message, peak_rss_mb=j.peak_rss_mb, created=j.created,
                   started=j.started, finished=j.finished, config=json.loads(j.config_json or "{}"),
                   resumed_from_step=j.resumed_from_step, method=j.method or "sft",
                   retention=json.loads(j.retention_json or "{}"), start_from=j.start_from)


class AdapterInfo(BaseModel):
    """A published adapter version; `name` (OWNER:NAME) is what `llm.chat(adapter=...)` takes."""
    name: str
    owner: str
    version: int
    model: str
    base: EvalResult
    tuned: EvalResult
    job_id: str = ""
    created: float = 0.0
    loaded: bool = False
    is_default: bool = False

    @classmethod
    def from_proto(cls, a: tuner_pb2.Adapter) -> "AdapterInfo":
        return cls(name=a.name, owner=a.owner, version=a.version, model=a.model, base=EvalResult.from_proto(a.base),
                   tuned=EvalResult.from_proto(a.tuned), job_id=a.job_id, created=a.created, loaded=a.loaded,
                   is_default=a.is_default)
