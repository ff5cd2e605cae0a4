"""Tool calls in text: how tools, calls and results are written into a prompt, and how calls are read back
out of a reply (also while it streams).

Models whose chat template takes `tools=` get them that way. Every other template gets the documented
default, the Hermes / Qwen convention: a system block that lists the tools as JSON inside `<tools>`, each
call written as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, and each result sent
back as a user turn `<tool_response>\\n...\\n</tool_response>`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .structured import TOOL_CLOSE, TOOL_OPEN, OutputSpec, ToolDef

TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def supports_tools(tokenizer) -> bool:
    """Whether the model's own chat template renders `tools=` (it names them)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def render_call(call: dict) -> str:
    body = json.dumps({"name": call["name"], "arguments": _args(call["arguments"])}, ensure_ascii=False)
    return f"{TOOL_OPEN}\n{body}\n{TOOL_CLOSE}"


def tool_defs(tools: list[dict]) -> tuple[ToolDef, ...]:
    """Tools as traces and data sets keep them: {"name", "description", "parameters_json" | "parameters"}, or
    OpenAI's {"type": "function", "function": {...}}."""
    out = []
    for t in tools or ():
        f = t.get("function", t)
        params = f.get("parameters") or json.loads(f.get("parameters_json") or '{"type": "object"}')
        out.append(ToolDef(f["name"], f.get("description", ""), params))
    return tuple(out)


def chat_template_input(tokenizer, messages: list[dict], tools: tuple[ToolDef, ...] = ()) -> tuple[list, dict]:
    """(messages, keyword arguments) for `tokenizer.apply_chat_template`: the one way a conversation with
    tools and tool calls is written into a prompt, for serving and for fine-tuning alike."""
    spec = OutputSpec(tuple(tools)) if tools else None
    messages, native_tools = template_messages(messages, spec, supports_tools(tokenizer))
    return messages, ({"tools": native_tools} if native_tools else {})


def template_messages(messages: list[dict], spec: OutputSpec | None, native: bool) -> tuple[list[dict], list | None]:
    """(messages, tools) to hand to the chat template. `native`: the template renders tools itself."""
    tools = [t.as_openai() for t in spec.tools] if spec is not None and spec.calls_tools else None
    if native:
        out = []
        for m in messages:
            m2 = {"role": m["role"], "content": m.get("content", "")}
            if m.get("tool_calls"):
                m2["tool_calls"] = [{"id": c["id"], "type": "function",
                                     "function": {"name": c["name"], "arguments": _args(c["arguments"])}}
                                    for c in m["tool_calls"]]
            if m["role"] == "tool":
                m2["tool_call_id"] = m.get("tool_call_id", "")
                if m.get("name"):
                    m2["name"] = m["name"]
            out.append(m2)
        return out, tools
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content', '')}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        elif m.get("tool_calls"):
            parts = ([m["content"]] if m.get("content") else []) + [render_call(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": m["role"], "content": m.get("content", "")})
    if tools:
        block = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def _args(arguments: str):
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return arguments


# -- reading calls back ------------------------------------------------------------------------------------
_SPACE = re.compile(r"\s+")


def call_key(segment: str) -> str:
    """What makes two calls the same call: their text without whitespace (name and arguments as written)."""
    return _SPACE.sub("", segment)


def repeat_watch(req) -> RepeatWatch | None:
    """A watch for a request whose reply may hold several tool calls (else None)."""
    out = req.output
    return RepeatWatch() if out is not None and out.calls_tools and out.parallel else None


class RepeatWatch:
    """Watches a reply's text for a tool call identical to one it made already (the same name and arguments).
    A small model under a grammar that allows more calls repeats its call until max_tokens; engines end the reply
    at the repeat instead (it ends `tool_calls`), and `ToolCallStream` drops the repeat."""

    def __init__(self):
        self.seen: set[str] = set()
        self.scanned = 0

    def repeated(self, text: str) -> bool:
        """True once a call that closed in `text` (the whole reply so far) repeats an earlier one."""
        while (j := text.find(TOOL_CLOSE, self.scanned)) >= 0:
            i = text.rfind(TOOL_OPEN, self.scanned, j)
            self.scanned = j + len(TOOL_CLOSE)
            if i < 0:
                continue
            key = call_key(text[i + len(TOOL_OPEN):j])
            if key in self.seen:
                return True
            self.seen.add(key)
        return False


_NAME = re.compile(r'"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"')
_ARGS = re.compile(r'"arguments"\s*:\s*(?=\S)')


@dataclass
class _Call:
    index: int
    id: str
    name: str = ""
    args_start: int = -1        # in the call's own text
    args_sent: int = 0          # characters of the arguments streamed
    args_done: bool = False
    scan: list = field(default_factory=lambda: [0, False, False])   # depth, in string, escaped


class ToolCallStream:
    """Fed the reply's text as it grows, it passes on the text outside tool calls and turns each call into
    deltas: its id and name first, then fragments of its arguments (which, joined, are the call's arguments
    exactly as the model wrote them). `finish()` gives the content and the calls."""

    def __init__(self, spec: OutputSpec | None):
        self.enabled = spec is not None and spec.calls_tools
        self.names = {t.name for t in spec.tools} if self.enabled else set()
        self.buf = ""
        self.pos = 0                # buf[:pos] is handled
        self.call: _Call | None = None
        self.call_start = 0
        self.content: list[str] = []   # the text passed on
        self.blank = ""                # whitespace held back: between calls it is no content
        self.calls: list[dict] = []
        self.count = 0
        self.keys: list[str] = []      # each recorded call's key (call_key): a repeat is dropped
        self.held: list[dict] = []     # deltas of a call that may yet be a repeat (its text so far begins one)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if not self.enabled:                      # no tools: text passes as it is (the reply keeps the engine's)
            return text, []
        self.buf += text
        out, deltas = [], []
        while True:
            if self.call is None:
                i = self.buf.find(TOOL_OPEN, self.pos)
                if i < 0:
                    end = len(self.buf) - _partial_suffix(self.buf, TOOL_OPEN, self.pos)
                    out.append(self.buf[self.pos:end])
                    self.pos = end
                    break
                out.append(self.buf[self.pos:i])
                self.call = _Call(self.count, f"call_{uuid.uuid4().hex[:24]}")
                self.count += 1
                self.call_start = self.pos = i + len(TOOL_OPEN)
            j = self.buf.find(TOOL_CLOSE, self.call_start)
            seg = self.buf[self.call_start: j if j >= 0 else len(self.buf)]
            self.held += self._progress(seg)
            key = call_key(seg if j >= 0 else seg[:len(seg) - _partial_suffix(seg, TOOL_CLOSE, 0)])
            if not any(k.startswith(key) for k in self.keys):     # no repeat: what was held goes out
                deltas, self.held = deltas + self.held, []
            if j < 0:
                break
            closed = self._close(seg)
            deltas, self.held = deltas + self.held, []              # (emptied by _close for a repeat)
            out.append(closed)
            self.pos = j + len(TOOL_CLOSE)
            if self.buf.startswith("\n", self.pos):
                self.pos += 1
            self.call = None
        return self._pass("".join(out)), deltas

    def _pass(self, piece: str) -> str:
        if not piece.strip():
            self.blank += piece
            return ""
        piece, self.blank = self.blank + piece, ""
        self.content.append(piece)
        return piece

    def _progress(self, seg: str) -> list[dict]:
        c, deltas = self.call, []
        if not c.name:
            m = _NAME.search(seg)
            if m:
                c.name = m.group(1)
                deltas.append({"index": c.index, "id": c.id, "name": c.name, "arguments": ""})
        if c.args_start < 0:
            m = _ARGS.search(seg)
            if m:
                c.args_start = m.end()
        if c.name and c.args_start >= 0 and not c.args_done:
            start = c.args_start + c.args_sent
            k = start
            depth, in_str, esc = c.scan
            while k < len(seg):
                ch = seg[k]
                k += 1
                if in_str:
                    esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
                elif ch == '"':
                    in_str = True
                elif ch in "{[":
                    depth += 1
                elif ch in "}]":
                    depth -= 1
                    if depth == 0:
                        c.args_done = True
                        break
            c.scan = [depth, in_str, esc]
            if k > start:
                deltas.append({"index": c.index, "id": "", "name": "", "arguments": seg[start:k]})
                c.args_sent += k - start
        return deltas

    def _close(self, seg: str) -> str:
        """Record the call; if it is not one after all (invalid JSON, an unknown tool), its text is text."""
        c = self.call
        try:
            obj = json.loads(seg)
            ok = isinstance(obj, dict) and obj.get("name") in self.names and isinstance(obj.get("arguments"), dict)
        except ValueError:
            ok = False
        if not ok or not c.args_done:
            return f"{TOOL_OPEN}{seg}{TOOL_CLOSE}"
        key = call_key(seg)
        if key in self.keys:                  # a repeat of a call made: no call, no text, no deltas
            self.held = []
            self.count -= 1
            return ""
        self.keys.append(key)
        self.calls.append({"id": c.id, "name": c.name, "arguments": seg[c.args_start:c.args_start + c.args_sent]})
        return ""

    def finish(self) -> tuple[str, list[dict], str]:
        """(content, calls, the text still held back and now released). A call cut off (by max_tokens) is no
        call and no text; whitespace left over beside calls is dropped."""
        if not self.enabled:
            return "", [], ""
        rest = self.blank + ("" if self.call is not None else self.buf[self.pos:])
        if self.calls and not rest.strip():
            rest = ""
        self.content.append(rest)
        return "".join(self.content), self.calls, rest


def _partial_suffix(buf: str, tag: str, start: int) -> int:
    """How many characters at the end of buf[start:] could begin `tag` (held back until we know)."""
    for n in range(min(len(tag) - 1, len(buf) - start), 0, -1):
        if tag.startswith(buf[-n:]):
            return n
    return 0
