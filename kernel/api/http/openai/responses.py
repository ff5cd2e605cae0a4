"""OpenAI's Responses API (`/v1/responses`: create, retrieve, delete, input items), translated to and from the
generate use case through the Responses use case (`syscalls/responses.py`: the agent's own stored chain,
`previous_response_id`, truncation). Streams follow the Responses event sequence: `response.created`, output
item and content part events, `response.output_text.delta`, `response.function_call_arguments.delta` / `.done`,
`response.completed` (or `response.incomplete`), and `error` + `response.failed` on an error."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import Field

from kernos.abi.errors import StatusError, invalid

from ....llm.types import Finish, TextDelta
from ....syscalls.generation import Generation, Reply, ToolCallDeltas
from ..errors import status_error
from . import wire

I32 = wire.I32
INCLUDABLE = {"message.output_text.logprobs"}


class ResponsesRequest(wire.Strict):
    """The fields `/v1/responses` takes; any other is refused by name."""

    model: str
    input: str | list[dict] = ""
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    max_output_tokens: I32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include: list[str] | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool = False
    stream_options: dict | None = None
    background: Literal[False] | None = None        # accepted when false
    # Kernos's own fields, through the client's extra_body
    seed: int | None = None
    priority: I32 = 0
    adapter: str | None = None
    kernel_tools: list[str] | None = None
    tool_execution: str | None = None
    program_id: str | None = None       # also the X-Kernos-Program header

    def refuse_unknown(self) -> None:
        super().refuse_unknown()
        bad = sorted(set(self.include or ()) - INCLUDABLE)
        if bad:
            raise invalid(f"include: '{bad[0][:64]}' is not supported (only {sorted(INCLUDABLE)})")


def input_items(r: ResponsesRequest) -> list[dict]:
    """The request's input as items (a string is one user message)."""
    if isinstance(r.input, str):
        return [{"type": "message", "role": "user", "content": r.input}] if r.input else []
    return list(r.input)


def _tools(r: ResponsesRequest) -> list[dict]:
    out = []
    for i, t in enumerate(r.tools or ()):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise invalid(f"tools[{i}].type '{str(t.get('type') if isinstance(t, dict) else t)[:32]}' is not "
                          "supported (function tools only)")
        params = t.get("parameters")
        out.append({"name": str(t.get("name", "")), "description": t.get("description") or "",
                    "parameters_json": json.dumps(params) if params else "", "strict": bool(t.get("strict"))})
    return out


def _tool_choice(choice) -> str:
    if choice is None or isinstance(choice, str):
        return choice or ""
    if choice.get("type") == "function" and choice.get("name"):
        return str(choice["name"])
    raise invalid(f"tool_choice of type '{str(choice.get('type'))[:32]}' is not supported")


def _format(r: ResponsesRequest) -> dict:
    fmt = (r.text or {}).get("format") or {"type": "text"}
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid(f"text.format.type '{str(fmt.get('type'))[:32]}' is not supported")
    extra = sorted(set(r.text or {}) - {"format", "verbosity"})
    if extra or (r.text or {}).get("verbosity") not in (None, "medium"):
        raise invalid(f"text.{(extra or ['verbosity'])[0]} is not supported")
    return fmt


def generation(r: ResponsesRequest, messages: list[dict], served: set[str], size: int) -> Generation:
    model, adapter = wire.split_model(r.model, served)
    fmt = _format(r)
    logprobs = "message.output_text.logprobs" in (r.include or ())
    return Generation(
        messages=messages, model=model, adapter=r.adapter or adapter, max_tokens=r.max_output_tokens,
        temperature=r.temperature, top_p=r.top_p, seed=r.seed % (1 << 64) if r.seed is not None else None,
        priority=r.priority, size=size, tools=_tools(r), tool_choice=_tool_choice(r.tool_choice),
        parallel_tool_calls=r.parallel_tool_calls, response_format=fmt["type"] if fmt["type"] != "text" else "",
        schema_json=json.dumps(fmt["schema"]) if fmt.get("schema") is not None else "",
        strict=bool(fmt.get("strict")), logprobs=logprobs, top_logprobs=(r.top_logprobs or 0) if logprobs else 0,
        kernel_tools=list(r.kernel_tools or []), tool_execution=r.tool_execution or "", program_id=r.program_id or "")


# -- the response object ------------------------------------------------------------------------------------
def _logprobs(entries: list) -> list:
    return [{"token": t, "logprob": lp, "bytes": list(t.encode()),
             "top_logprobs": [{"token": a, "logprob": x, "bytes": list(a.encode())} for a, _, x in top]}
            for t, _, lp, top in entries]


def message_item(rid: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {"type": "message", "id": f"msg_{rid}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def call_item(rid: str, k: int, call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{rid}_{k}", "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"], "status": status}


def output(rid: str, reply: Reply) -> list[dict]:
    c = reply.choices[0]
    status = "incomplete" if c.finish == Finish.LENGTH else "completed"
    items = [message_item(rid, c.text, status, _logprobs(c.logprobs))] if (c.text or not c.tool_calls) else []
    return items + [call_item(rid, k, call) for k, call in enumerate(c.tool_calls)]


def response(rid: str, created: int, r: ResponsesRequest, status: str, reply: Reply | None = None,
             error: dict | None = None) -> dict:
    out = {"id": rid, "object": "response", "created_at": created, "status": status, "error": error,
           "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
           "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
           "model": wire.model_id(reply) if reply is not None else r.model,
           "output": output(rid, reply) if reply is not None else [],
           "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": r.previous_response_id,
           "store": r.store, "temperature": r.temperature, "top_p": r.top_p, "text": {"format": _format(r)},
           "tool_choice": r.tool_choice or "auto", "tools": r.tools or [], "truncation": r.truncation or "disabled",
           "metadata": r.metadata or {}, "user": r.user, "reasoning": None,
           "usage": None if reply is None else {
               "input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
               "output_tokens": reply.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": reply.prompt_tokens + reply.completion_tokens}}
    if reply is not None and reply.tool_runs:
        out["tool_runs"] = [{"call": call_item(rid, k, t.call), "state": t.state, "result": t.result,
                             "error": t.error} for k, t in enumerate(reply.tool_runs)]
    return out


def status_of(reply: Reply) -> str:
    return "incomplete" if reply.finish == Finish.LENGTH else "completed"


def new_id() -> tuple[str, int]:
    return f"resp_{uuid.uuid4().hex}", int(time.time())


# -- streaming ----------------------------------------------------------------------------------------------
class EventStream:
    """Turns the generate use case's events into the Responses stream's server-sent events."""

    def __init__(self, rid: str, created: int, r: ResponsesRequest):
        self.rid, self.created, self.r = rid, created, r
        self.seq = 0
        self.index = -1              # the output item being written
        self.open = ""               # "message" | "call" | ""
        self.text, self.logprobs = "", []
        self.call: dict = {}
        self.calls = 0

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    def start(self) -> list[str]:
        head = response(self.rid, self.created, self.r, "in_progress")
        return [self.event("response.created", response=head), self.event("response.in_progress", response=head)]

    def feed(self, ev) -> list[str]:
        out = []
        if isinstance(ev, TextDelta) and (ev.text or ev.logprobs) and ev.index == 0:
            if self.open != "message":
                out += self._close()
                self.index, self.open = self.index + 1, "message"
                out.append(self.event("response.output_item.added", output_index=self.index,
                                      item=message_item(self.rid, "", "in_progress") | {"content": []}))
                out.append(self.event("response.content_part.added", item_id=f"msg_{self.rid}",
                                      output_index=self.index, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
            self.text += ev.text
            lps = _logprobs(ev.logprobs)
            self.logprobs += lps
            out.append(self.event("response.output_text.delta", item_id=f"msg_{self.rid}", output_index=self.index,
                                  content_index=0, delta=ev.text, logprobs=lps))
        elif isinstance(ev, ToolCallDeltas) and ev.choice == 0:
            for d in ev.deltas:
                if d["id"]:
                    out += self._close()
                    self.index, self.open = self.index + 1, "call"
                    self.call = {"id": d["id"], "name": d["name"], "arguments": ""}
                    out.append(self.event("response.output_item.added", output_index=self.index,
                                          item=call_item(self.rid, self.calls, self.call, "in_progress")))
                if d["arguments"]:
                    self.call["arguments"] += d["arguments"]
                    out.append(self.event("response.function_call_arguments.delta",
                                          item_id=f"fc_{self.rid}_{self.calls}", output_index=self.index,
                                          delta=d["arguments"]))
        return out

    def _close(self) -> list[str]:
        out = []
        if self.open == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}
            item_id = f"msg_{self.rid}"
            out.append(self.event("response.output_text.done", item_id=item_id, output_index=self.index,
                                  content_index=0, text=self.text, logprobs=self.logprobs))
            out.append(self.event("response.content_part.done", item_id=item_id, output_index=self.index,
                                  content_index=0, part=part))
            out.append(self.event("response.output_item.done", output_index=self.index,
                                  item=message_item(self.rid, self.text, "completed", self.logprobs)))
        elif self.open == "call":
            item = call_item(self.rid, self.calls, self.call)
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=self.index, name=self.call["name"], arguments=self.call["arguments"]))
            out.append(self.event("response.output_item.done", output_index=self.index, item=item))
            self.calls += 1
        self.open = ""
        return out

    def finish(self, final: dict) -> list[str]:
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return self._close() + [self.event(kind, response=final)]

    def failed(self, e: StatusError) -> list[str]:
        body = json.loads(status_error(e).body)["error"]
        error = {"code": body.get("code") or body.get("type"), "message": body["message"]}
        final = response(self.rid, self.created, self.r, "failed", error=error)
        return [self.event("error", code=error["code"], message=error["message"], param=None),
                self.event("response.failed", response=final)]


async def sse(stream: EventStream, events, passage, tracker, save):
    """The events of one streamed response after its acceptance; the stored response is saved (`save`) before
    `response.completed` is sent; `tracker` (the passage's in-flight count) ends with the stream."""
    from ....syscalls.generation import reply_view

    reply = None
    try:
        for x in stream.start():
            yield x
        async for ev in events:
            if isinstance(ev, Reply):
                reply = ev
                continue
            for x in stream.feed(ev):
                yield x
        final = response(stream.rid, stream.created, stream.r, status_of(reply), reply)
        if stream.r.store:
            save(final)
        passage.ok()
        for x in stream.finish(final):
            yield x
    except StatusError as e:
        passage.failed(e)
        for x in stream.failed(e):
            yield x
    except BaseException as e:
        passage.failed(e)
        raise
    finally:
        tracker.__exit__(None, None, None)
        passage.trace(passage.request_view, reply_view(reply))


def listed_items(rid: str, items: list[dict], order: str, limit: int, after: str) -> dict:
    """A stored response's input items as `input_items` lists them: each with an id, messages' content as
    parts; newest first unless order is "asc"; `limit` after the item `after`."""
    out = []
    for k, item in enumerate(items):
        item = dict(item)
        kind = item.setdefault("type", "message")
        item.setdefault("id", f"{'msg' if kind == 'message' else 'item'}_{rid[5:]}_{k}")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, str):
                item["content"] = [{"type": "input_text" if item.get("role") != "assistant" else "output_text",
                                    "text": content}]
            item.setdefault("status", "completed")
        out.append(item)
    if order != "asc":
        out.reverse()
    if after:
        ids = [i["id"] for i in out]
        out = out[ids.index(after) + 1:] if after in ids else []
    page = out[:max(1, min(limit, 100))]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(out) > len(page)}
