"""What the generate use case takes and gives, transport-free: a `Generation` in; `Accepted`, text and
tool-call deltas, kernel tool runs and one `Reply` out. Every transport converts its wire format to and from
these, and traces a generation by `request_view` and `reply_view`, so that its trace records (the fine-tuner's
raw material) are the same whichever transport carried it."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..llm.types import Finish, Shaping


@dataclass
class Generation:
    """What a caller asks for, transport-free. `size` is the request's size as it arrived, in bytes."""

    # {"role", "content"}; an assistant's may carry "tool_calls" [{"id", "name", "arguments"}], a tool's
    # "tool_call_id" (and "name")
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)   # a raw prompt as token ids (instead of its text)
    model: str = ""
    adapter: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    priority: int = 0
    context_id: str = ""
    size: int = 0
    tools: list[dict] = field(default_factory=list)    # {"name", "description", "parameters_json", "strict"}
    tool_choice: str = ""
    parallel_tool_calls: bool | None = None
    response_format: str = ""                           # "", text, json_object, json_schema
    schema_json: str = ""
    strict: bool = False                                # json_schema: objects take only their properties
    n: int = 1                                          # samples of the prompt (prefilled once)
    logprobs: bool = False
    top_logprobs: int = 0                               # 0..20, with logprobs
    kernel_tools: list[str] = field(default_factory=list)   # tools registered in the kernel, offered too
    tool_execution: str = ""                            # "" / client: calls come back; kernel: the kernel runs them
    first_tool_choice: str = ""                         # tool_choice until a tool result answers the last user turn
    max_tool_rounds: int = 0
    shaping: Shaping = field(default_factory=Shaping)   # penalties, logit bias, min-p, stop token ids, ...
    prompt_logprobs: bool = False                       # score the prompt's tokens (max_tokens 0: only that)
    program_id: str = ""                                # its agent program ("": by default, see Generate.run)


@dataclass
class Accepted:
    """The first event of a generation: the engine took it."""

    request_id: str


@dataclass
class Reply:
    request_id: str
    text: str
    model: str
    adapter: str
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    queue_wait_ms: float
    ttft_ms: float
    total_ms: float
    snapshot_id: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # {"id", "name", "arguments" (a JSON string)}
    prompt_logprobs: list = field(default_factory=list)    # [(token, id, logprob or None, top)] per prompt token
    tool_runs: list[ToolRun] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)


@dataclass
class Choice:
    """One sample of a prompt (n > 1 gives several; the reply's own fields are the first's)."""

    index: int
    text: str
    finish: Finish
    tool_calls: list[dict]
    completion_tokens: int
    logprobs: list = field(default_factory=list)   # [(token, token id, logprob, [(token, id, logprob), ...])]
    closed: bool = False    # under a grammar, its shortest valid ending was written as max_tokens neared


@dataclass
class ToolRun:
    """A call the kernel ran for the model (tool_execution "kernel")."""

    call: dict                  # {"id", "name", "arguments"}
    state: str                  # done | error | denied
    result: object = None
    error: str = ""
    duration_ms: float = 0.0


@dataclass
class ToolCallDeltas:
    """Pieces of tool calls while a reply streams: {"index", "id", "name", "arguments"} each."""

    deltas: list[dict]
    choice: int = 0


def _drop_empty(d: dict) -> dict:
    return {k: v for k, v in d.items() if v not in (None, "", 0, False, [], {})}


def request_view(g: Generation) -> dict:
    """A generation request as its trace keeps it (the field names of the gRPC ABI's GenerateRequest)."""
    return _drop_empty({
        "messages": [_drop_empty({**m, "tool_calls": [_drop_empty(dict(c)) for c in m.get("tool_calls") or []]})
                     for m in g.messages],
        "prompt": g.prompt, "prompt_ids": list(g.prompt_ids), "model": g.model, "adapter": g.adapter,
        "sampling": _drop_empty({"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p,
                                 "top_k": g.top_k, "stop": list(g.stop), "seed": g.seed,
                                 **{k: v if k != "logit_bias" else {str(t): b for t, b in v.items()}
                                    for k, v in g.shaping.to_dict().items()}}),
        "priority": g.priority, "context_id": g.context_id, "tools": [_drop_empty(dict(t)) for t in g.tools],
        "tool_choice": g.tool_choice, "parallel_tool_calls": g.parallel_tool_calls,
        "response_format": _drop_empty({"type": g.response_format, "schema_json": g.schema_json,
                                        "strict": g.strict}),
        "kernel_tools": list(g.kernel_tools), "tool_execution": g.tool_execution,
        "max_tool_rounds": g.max_tool_rounds, "n": g.n if g.n != 1 else 0, "logprobs": g.logprobs,
        "top_logprobs": g.top_logprobs, "first_tool_choice": g.first_tool_choice,
        "prompt_logprobs": g.prompt_logprobs})


def _choice_view(c: Choice) -> dict:
    return _drop_empty({"index": c.index, "text": c.text, "finish_reason": c.finish.name.lower(),
                        "tool_calls": [dict(x) for x in c.tool_calls], "completion_tokens": c.completion_tokens,
                        "logprobs": [{"token": t, "token_id": i, "logprob": lp,
                                      "top_logprobs": [{"token": a, "token_id": b, "logprob": x} for a, b, x in top]}
                                     for t, i, lp, top in c.logprobs], "closed_at_budget": c.closed})


def reply_view(r: Reply | None) -> dict:
    """A reply as its trace keeps it (the field names of the gRPC ABI's GenerateReply)."""
    if r is None:
        return {}
    return _drop_empty({
        "request_id": r.request_id, "text": r.text, "model": r.model, "adapter": r.adapter,
        "finish_reason": r.finish.name.lower(),
        "usage": _drop_empty({"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}),
        "timings": _drop_empty({"queue_wait_ms": r.queue_wait_ms, "time_to_first_token_ms": r.ttft_ms,
                                "total_ms": r.total_ms}),
        "snapshot_id": r.snapshot_id, "tool_calls": [dict(c) for c in r.tool_calls],
        "tool_runs": [_drop_empty({"call": dict(t.call), "state": t.state, "result": t.result, "error": t.error,
                                   "duration_ms": t.duration_ms}) for t in r.tool_runs],
        "choices": [_choice_view(c) for c in r.choices]})
