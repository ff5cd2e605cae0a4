"""AIOS's `/query` shapes (as Cerebrum's clients send them: `{"agent_name", "query_type", "query_data":
query.model_dump()}`) and its replies (`{"response": {...}, "start_times", "end_times", "waiting_times",
"turnaround_times"}`), translated to and from Kernos's syscalls. An LLM query becomes the OpenAI chat body that
`openai_wire` already turns into the LLM syscall's request, so the three HTTP dialects reach one use case.
Nothing here decides anything."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ....syscalls.file_ops import calls

ACTIONS = ("chat", "chat_with_json_output", "chat_with_tool_call_output", "call_tool", "operate_file")
MEMORY_OPS = ("add_memory", "get_memory", "update_memory", "remove_memory", "retrieve_memory", "add_agentic_memory",
              "retrieve_memory_raw")
STORAGE_OPS = ("mount", "retrieve", "create_file", "create_dir", "write", "rollback", "share")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")      # Cerebrum dumps every field of its query models


class QueryRequest(_Loose):
    agent_name: str = Field(min_length=1, max_length=256)
    query_type: Literal["llm", "memory", "storage", "tool"]
    query_data: dict[str, Any]


class LLMQuery(_Loose):
    llms: list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    action_type: Literal[ACTIONS] = "chat"          # type: ignore[valid-type]
    temperature: float | None = Field(None, ge=0, le=2)
    max_new_tokens: int | None = Field(None, ge=1, le=(1 << 31) - 1)
    message_return_type: Literal["text", "json"] = "text"
    response_format: dict[str, Any] | None = None


class MemoryQuery(_Loose):
    operation_type: Literal[MEMORY_OPS]              # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict)


class StorageQuery(_Loose):
    operation_type: Literal[STORAGE_OPS]             # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict)


class ToolQuery(_Loose):
    tool_calls: list[dict[str, Any]] | None = None
    # older AIOS servers: one call as operation_type (the tool) and params (its arguments)
    operation_type: str | None = None
    params: dict[str, Any] | None = None

    def calls(self) -> list[tuple[str, dict]]:
        if self.tool_calls:
            out = []
            for i, c in enumerate(self.tool_calls):
                name = c.get("name") or (c.get("function") or {}).get("name")
                args = c.get("parameters", c.get("arguments", (c.get("function") or {}).get("arguments", {})))
                if isinstance(args, str):
                    try:
                        args = json.loads(args or "{}")
                    except ValueError:
                        raise TypeError(f"query_data.tool_calls[{i}].parameters is not JSON") from None
                if not isinstance(name, str) or not name or not isinstance(args, dict):
                    raise TypeError(f"query_data.tool_calls[{i}] needs a name and a parameters object")
                out.append((name, args))
            return out
        if self.operation_type:
            return [(self.operation_type, dict(self.params or {}))]
        raise TypeError("query_data.tool_calls: at least one call ({\"name\", \"parameters\"}) is required")


QUERIES = {"llm": LLMQuery, "memory": MemoryQuery, "storage": StorageQuery, "tool": ToolQuery}


# -- LLM queries as OpenAI chat bodies ---------------------------------------------------------------------------
def tool_name(name: str) -> str:
    """An AIOS tool name as the model sees it: AIOS names tools "author/name"; a tool name in a prompt holds
    letters, digits, '_' and '-' only ('/' becomes '__'; `calls_of` maps it back)."""
    return name.replace("/", "__")


def _tool(i: int, t: dict) -> dict:
    """A tool as AIOS agents give it ({"name", "description", "parameters"}) or in OpenAI's shape."""
    f = t.get("function") if isinstance(t.get("function"), dict) else t
    if not isinstance(f.get("name"), str) or not f["name"]:
        raise TypeError(f"query_data.tools[{i}] needs a name")
    return {"type": "function", "function": {"name": tool_name(f["name"]), "description": f.get("description") or "",
                                             "parameters": f.get("parameters")}}


def _call(c: dict) -> dict:
    if "function" in c:
        return c
    args = c.get("parameters", c.get("arguments", {}))
    return {"id": c.get("id", ""), "type": "function",
            "function": {"name": tool_name(c.get("name", "")),
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}


def chat_body(q: LLMQuery, model: str, tools: list[dict] | None = None, tool_choice: str | None = None,
              response_format: dict | None = None) -> dict:
    messages = []
    for i, m in enumerate(q.messages):
        if not isinstance(m, dict):
            raise TypeError(f"query_data.messages[{i}] must be an object")
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [_call(c) for c in m["tool_calls"]]
        messages.append(m)
    body: dict[str, Any] = {"model": model, "messages": messages}
    if q.temperature is not None:
        body["temperature"] = q.temperature
    if q.max_new_tokens is not None:
        body["max_tokens"] = q.max_new_tokens
    defs = tools if tools is not None else [_tool(i, t) for i, t in enumerate(q.tools or [])]
    if defs:
        body["tools"] = defs
        body["parallel_tool_calls"] = True
        if tool_choice:
            body["tool_choice"] = tool_choice
    if response_format is not None:
        body["response_format"] = response_format
    return body


def tool_names(q: LLMQuery) -> dict[str, str]:
    """The names the model sees -> the agent's tool names."""
    out = {}
    for t in q.tools or []:
        f = t.get("function") if isinstance(t.get("function"), dict) else t
        if isinstance(f.get("name"), str):
            out[tool_name(f["name"])] = f["name"]
    return out


def json_format(q: LLMQuery) -> dict:
    """The response_format a JSON reply uses: the query's (OpenAI's json_schema shape), else any JSON object."""
    rf = q.response_format
    if rf and rf.get("type") in ("json_schema", "json_object"):
        return rf
    if rf and "schema" in rf:                    # a bare {"name", "schema"} as some agents send it
        return {"type": "json_schema", "json_schema": rf}
    return {"type": "json_object"}


# -- replies -----------------------------------------------------------------------------------------------------
def calls_of(reply, names: dict[str, str] | None = None) -> list[dict]:
    """The reply's tool calls in AIOS's shape: {"id", "name", "parameters"}; `names` maps the names the model
    saw back to the agent's own."""
    names = names or {}
    return [{**c, "name": names.get(c["name"], c["name"])} for c in calls(reply)]


def llm_response(message: str | None, tool_calls: list[dict] | None = None, error: str | None = None,
                 status: int = 200) -> dict:
    return {"response_class": "llm", "response_message": message, "tool_calls": tool_calls or None,
            "finished": error is None, "error": error, "status_code": status}


def memory_response(success: bool = True, memory_id: str | None = None, content: str | None = None,
                    metadata: dict | None = None, search_results: list | None = None,
                    error: str | None = None) -> dict:
    return {"response_class": "memory", "memory_id": memory_id, "content": content, "metadata": metadata,
            "search_results": search_results, "success": success, "error": error}


def text_response(kind: str, message: str | None, error: str | None = None, status: int = 200) -> dict:
    """Storage and tool responses share one shape."""
    return {"response_class": kind, "response_message": message, "finished": error is None, "error": error,
            "status_code": status}


def envelope(response: dict, created: float, started: float, ended: float) -> dict:
    """AIOS's reply: the response and the syscall's timings (seconds since the epoch, and spans)."""
    return {"response": response, "start_times": [started], "end_times": [ended],
            "waiting_times": [max(0.0, started - created)], "turnaround_times": [max(0.0, ended - created)]}


def metadata(value) -> dict[str, str]:
    """AIOS metadata as Kernos memory metadata (string values): other values as JSON."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError("params.metadata must be an object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
