"""A generation streamed as OpenAI's server-sent events (chat or completion chunks), traced when it ends."""
from __future__ import annotations

import json
import time

from kernos.abi.errors import StatusError

from ....llm.types import TextDelta
from ....syscalls.generation import Accepted, Generation, Reply, ToolCallDeltas, ToolRun, reply_view
from ..errors import status_error
from . import wire


async def sse(first: Accepted, events, g: Generation, passage, tracker, include_usage: bool, chat: bool,
              echo: str = ""):
    """The chunks of one streamed generation; `tracker` (the passage's in-flight count) ends with the stream.
    `echo`: a completion's prompt, sent first (each sample's text starts with it)."""
    rid, created, reply = first.request_id, int(time.time()), None
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": created, "model": g.model,
            "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(choices, **extra):
        return "data: " + json.dumps({**head, "choices": choices, **extra}) + "\n\n"

    offsets: dict[int, int] = {}          # completions: each sample's text so far (its logprobs' text_offset)
    try:
        for i in range(max(1, g.n) if echo else 0):
            yield chunk([{"index": i, "text": echo, "finish_reason": None, "logprobs": None}])
        if chat:
            for i in range(max(1, g.n)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for ev in events:
            if isinstance(ev, TextDelta):
                if chat:
                    yield chunk([{"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                                  "logprobs": wire.logprobs(ev.logprobs), "finish_reason": None}])
                else:
                    at = offsets.get(ev.index, 0)
                    offsets[ev.index] = at + sum(len(t) for t, _, _, _ in ev.logprobs)
                    yield chunk([{"index": ev.index, "text": ev.text, "finish_reason": None,
                                  "logprobs": wire.text_logprobs(ev.logprobs, at)}])
            elif isinstance(ev, ToolCallDeltas) and chat:
                calls = [{"index": d["index"], **({"id": d["id"], "type": "function"} if d["id"] else {}),
                          "function": {k: d[k] for k in ("name", "arguments") if d[k] or k == "arguments"}}
                         for d in ev.deltas]
                yield chunk([{"index": ev.choice, "delta": {"tool_calls": calls}, "finish_reason": None}])
            elif isinstance(ev, (Accepted, ToolRun)):
                continue
            elif isinstance(ev, Reply):
                reply = ev
                for c in ev.choices:
                    done = {"index": c.index, "finish_reason": wire.finish_reason(c.finish),
                            **({"closed_at_budget": True} if c.closed else {})}
                    yield chunk([{**done, "delta": {}, "logprobs": None}] if chat else
                                [{**done, "text": "", "logprobs": None}])
                if include_usage:
                    yield chunk([], usage=wire.usage(ev))
        passage.ok()
        yield "data: [DONE]\n\n"
    except StatusError as e:
        passage.failed(e)
        body = json.loads(status_error(e).body)
        yield "data: " + json.dumps(body) + "\n\n"
    except BaseException as e:
        passage.failed(e)
        raise
    finally:
        tracker.__exit__(None, None, None)
        passage.trace(passage.request_view, reply_view(reply))
