"""OpenAI's request and reply shapes, translated straight to and from the generate use case's terms: a chat or
completion request becomes a `Generation` (as a gRPC `GenerateRequest` does, so that both reach the same use
case and their traces read the same), and a `Reply` becomes OpenAI's JSON. Nothing here decides anything."""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kernos.abi.errors import invalid

from ....llm.types import Finish, Shaping
from ....syscalls.generation import Generation

# Integer fields within the range of the syscall's field (uint32 / int32): a larger number is a 400 naming the
# field, never a protobuf ValueError answered 500 (n = 2**40 was). What is sensible within it, the use case says.
U32 = Annotated[int, Field(ge=0, le=(1 << 32) - 1)]
I32 = Annotated[int, Field(ge=-(1 << 31), le=(1 << 31) - 1)]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")      # unknown fields are ignored, as OpenAI does


class FunctionDef(_Loose):
    name: str
    description: str = ""
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Loose):
    type: Literal["function"] = "function"
    function: FunctionDef


class JsonSchema(_Loose):
    name: str = ""
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class Strict(BaseModel):
    """A request body of a generating endpoint: a field this surface does not know is refused by name (as OpenAI
    does), never ignored, so a framework that sets one learns it had no effect. The fields below are accepted
    with nothing to do: who asks (traces name the agent), the tier and cache hints (prefix reuse is automatic)."""
    model_config = ConfigDict(extra="allow")

    user: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    def refuse_unknown(self) -> None:
        unknown = sorted(self.model_extra or {})
        if unknown:
            raise invalid(f"unsupported field '{unknown[0][:64]}': Kernos does not implement it (see "
                          "docs/openai.md for the fields each endpoint takes)")


class _Sampling(Strict):
    """The fields both chat and completions take."""

    model: str
    max_tokens: I32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: U32 = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None     # token id (as a string) -> bias
    # accepted, and nothing to do: labels, storage (every call is traced)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # vLLM's fields beyond OpenAI's
    top_k: I32 | None = None                       # -1 or 0: off
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[U32] | None = None
    min_tokens: U32 | None = None
    ignore_eos: bool | None = None
    # Kernos's own fields, through the client's extra_body
    priority: I32 = 0
    adapter: str | None = None
    program_id: str | None = None       # also the X-Kernos-Program header

    def shaping(self) -> Shaping:
        bias = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                bias[int(k)] = float(v)
            except ValueError:
                raise TypeError(f"logit_bias: '{k[:32]}' is not a token id") from None
        return Shaping(frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
                       repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                       logit_bias=bias, min_p=self.min_p or 0.0, stop_token_ids=list(self.stop_token_ids or []),
                       min_tokens=self.min_tokens or 0, ignore_eos=bool(self.ignore_eos))


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: I32 | None = None
    top_logprobs: U32 | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    context_id: str | None = None
    kernel_tools: list[str] | None = None
    tool_execution: str | None = None
    first_tool_choice: str | dict | None = None
    modalities: list[Literal["text"]] | None = None     # text is all a Kernos model writes


MAX_PROMPTS = 64     # prompts in one /v1/completions call (each its own generation, run side by side)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]     # texts, or token ids
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None   # the number of alternatives (0: the token's own)
    echo: bool = False                             # the prompt first, in the text and (with logprobs) scored
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None     # one sample per choice: best_of 1 only


class EmbeddingRequest(_Loose):
    input: str | list[str]
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"   # base64: little-endian float32 (openai's default)


def split_model(name: str, served: set[str]) -> tuple[str, str]:
    """"MODEL" or "MODEL:ADAPTER" (adapters may hold a ':' themselves, published ones "OWNER:NAME")."""
    if name in served:
        return name, ""
    for i, ch in enumerate(name):
        if ch == ":" and name[:i] in served:
            return name[:i], name[i + 1:]
    return name, ""


def _content(value) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts are joined)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") in ("text", None))
    raise TypeError("content must be a string or a list of parts")


def _message(i: int, m: dict) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise TypeError(f"messages[{i}] needs a role")
    role = "system" if m["role"] == "developer" else m["role"]
    try:
        out = {"role": role, "content": _content(m.get("content"))}
    except TypeError as e:
        raise TypeError(f"messages[{i}].content: {e}") from None
    calls = []
    for j, c in enumerate(m.get("tool_calls") or []):
        f = c.get("function") or {}
        args = f.get("arguments", "{}")
        if not isinstance(args, str):
            raise TypeError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string")
        calls.append({"id": str(c.get("id", "")), "name": str(f.get("name", "")), "arguments": args})
    if calls:
        out["tool_calls"] = calls
    if m.get("tool_call_id"):
        out["tool_call_id"] = str(m["tool_call_id"])
    if role == "tool" and m.get("name"):
        out["name"] = str(m["name"])
    return out


def _sampling(r: _Sampling, max_tokens: int | None) -> dict:
    r.refuse_unknown()
    return {"stop": [r.stop] if isinstance(r.stop, str) else list(r.stop or []), "temperature": r.temperature,
            "top_p": r.top_p, "top_k": 0 if r.top_k in (None, -1) else r.top_k, "max_tokens": max_tokens,
            "shaping": r.shaping(), "seed": r.seed % (1 << 64) if r.seed is not None else None}


def _choice_name(choice) -> str:
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name", "")
    return choice or ""


def chat_request(r: ChatRequest, served: set[str], size: int = 0) -> Generation:
    """`size`: the request's size in bytes as it arrived."""
    model, adapter = split_model(r.model, served)
    js = r.response_format.json_schema if r.response_format is not None else None
    return Generation(
        messages=[_message(i, m) for i, m in enumerate(r.messages)], model=model, adapter=r.adapter or adapter,
        **_sampling(r, r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens),
        priority=r.priority, context_id=r.context_id or "", n=r.n or 1, logprobs=bool(r.logprobs),
        top_logprobs=r.top_logprobs or 0, kernel_tools=list(r.kernel_tools or []),
        tool_execution=r.tool_execution or "", size=size, program_id=r.program_id or "",
        tools=[{"name": t.function.name, "description": t.function.description,
                "parameters_json": json.dumps(t.function.parameters) if t.function.parameters else "",
                "strict": bool(t.function.strict)} for t in r.tools or []],
        tool_choice=_choice_name(r.tool_choice), first_tool_choice=_choice_name(r.first_tool_choice),
        parallel_tool_calls=r.parallel_tool_calls,
        response_format=r.response_format.type if r.response_format is not None else "",
        strict=bool(js and js.strict), schema_json=json.dumps(js.schema_) if js and js.schema_ is not None else "")


def prompts(r: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: each a text or a list of token ids."""
    p = r.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def completion_request(r: CompletionRequest, served: set[str], size: int = 0) -> list[Generation]:
    """One generation per prompt (OpenAI's choices come prompt by prompt, n each)."""
    model, adapter = split_model(r.model, served)
    texts = prompts(r)
    if not 1 <= len(texts) <= MAX_PROMPTS:
        raise TypeError(f"prompt: 1 to {MAX_PROMPTS} prompts, got {len(texts)}")
    if len(texts) > 1 and r.stream:
        raise TypeError("prompt: a stream takes one prompt")
    max_tokens = r.max_tokens if r.max_tokens is not None else 16
    if r.echo and r.stream and (r.logprobs is not None or not isinstance(texts[0], str)):
        raise TypeError("echo with logprobs (or of token ids) is not streamed: send stream=false")
    common = dict(model=model, adapter=r.adapter or adapter, n=r.n or 1, size=size, **_sampling(r, max_tokens),
                  priority=r.priority, logprobs=r.logprobs is not None, top_logprobs=r.logprobs or 0,
                  program_id=r.program_id or "")
    # echoing token ids needs their text: the scored prompt gives it
    return [Generation(prompt=p if isinstance(p, str) else "", prompt_ids=[] if isinstance(p, str) else p,
                       prompt_logprobs=r.echo and (r.logprobs is not None or max_tokens == 0 or not isinstance(p, str)),
                       **common) for p in texts]


# -- replies ------------------------------------------------------------------------------------------------
def finish_reason(f: Finish) -> str:
    return {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.TOOL_CALLS: "tool_calls"}.get(f, "stop")


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


def logprobs(entries: list) -> dict | None:
    """Chat's logprobs of (token, id, logprob, top) entries."""
    if not entries:
        return None
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": a, "logprob": x, "bytes": list(a.encode())} for a, _, x in top]}
                        for t, _, lp, top in entries]}


def text_logprobs(entries: list, offset: int = 0) -> dict | None:
    """Legacy completions' logprobs of (token, id, logprob, top) entries: tokens, their logprobs, the top
    alternatives as {token: logprob} (None where a token has none: the first of an echoed prompt), and each
    token's character offset in the text, counting from `offset`."""
    if not entries:
        return None
    offsets, at = [], offset
    for t, _, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _, _ in entries], "token_logprobs": [lp for _, _, lp, _ in entries],
            "top_logprobs": [({a: x for a, _, x in top} if lp is not None else None) for _, _, lp, top in entries],
            "text_offset": offsets}


def usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def model_id(reply) -> str:
    return f"{reply.model}:{reply.adapter}" if reply.adapter else reply.model


def chat_reply(reply, r: ChatRequest | None = None) -> dict:
    choices = []
    for c in reply.choices:
        message = {"role": "assistant", "content": c.text if (c.text or not c.tool_calls) else None}
        if c.tool_calls:
            message["tool_calls"] = _tool_calls(c.tool_calls)
        choices.append({"index": c.index, "message": message, "finish_reason": finish_reason(c.finish),
                        "logprobs": logprobs(c.logprobs), **({"closed_at_budget": True} if c.closed else {})})
    out = {"id": f"chatcmpl-{reply.request_id}", "object": "chat.completion", "created": int(time.time()),
           "model": model_id(reply), "choices": choices, "usage": usage(reply)}
    if reply.tool_runs:
        out["tool_runs"] = [{"call": _tool_calls([r.call])[0], "state": r.state, "result": r.result,
                             "error": r.error} for r in reply.tool_runs]
    return out


def completion_reply(replies: list, r: CompletionRequest) -> dict:
    """The choices of each prompt's reply in turn. With echo, each choice's text starts with its prompt, and its
    logprobs with the prompt's (the first token has none: None, as OpenAI's legacy completions give it)."""
    choices, n = [], r.n or 1
    for p, (reply, prompt) in enumerate(zip(replies, prompts(r))):
        head, scored = "", []
        if r.echo:
            scored = reply.prompt_logprobs
            head = prompt if isinstance(prompt, str) else "".join(t for t, _, _, _ in scored)
        choices += [{"index": p * n + c.index, "text": head + c.text, "finish_reason": finish_reason(c.finish),
                     "logprobs": text_logprobs(scored + c.logprobs) if r.logprobs is not None else None}
                    for c in reply.choices]
    tokens = {k: sum(usage(x)[k] for x in replies) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"id": f"cmpl-{replies[0].request_id}", "object": "text_completion", "created": int(time.time()),
            "model": model_id(replies[0]), "usage": tokens, "choices": choices}
