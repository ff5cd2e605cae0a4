"""Tools and structured output on the SDK side: Python functions and pydantic models become the JSON schemas
the LLM syscall takes, and a small loop runs a model's tool calls against Python callables.

    def add(a: int, b: int) -> int:
        "Add two integers."
        return a + b

    reply = s.llm.chat("What is 2 + 3?", tools=[add], tool_choice="required")
    reply.tool_calls[0].args            # {"a": 2, "b": 3}
    reply = kernos.sdk.run_tools(s, "What is 2 + 3?", [add])   # calls it, sends the result back, answers
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from kernos.proto.v1 import llm_pb2


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0].strip()


def arguments_model(fn: Callable) -> type[BaseModel]:
    """A pydantic model of a function's parameters (type hints; defaults make them optional)."""
    fields = {}
    hints = inspect.get_annotations(fn, eval_str=True)
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        fields[name] = (hints.get(name, Any), ... if p.default is p.empty else p.default)
    return create_model(f"{fn.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def tool_definition(tool) -> llm_pb2.ToolDefinition:
    """A tool for a request: a Python function (its type hints and docstring), an OpenAI-style dict
    ({"type": "function", "function": {...}}), or {"name", "description", "parameters"}."""
    if callable(tool) and not isinstance(tool, dict):
        schema = arguments_model(tool).model_json_schema()
        schema.pop("title", None)
        return llm_pb2.ToolDefinition(name=tool.__name__, description=_doc(tool), parameters_json=json.dumps(schema))
    if isinstance(tool, dict):
        f = tool.get("function", tool)
        params = f.get("parameters") or {"type": "object"}
        return llm_pb2.ToolDefinition(name=f.get("name", ""), description=f.get("description", ""),
                                      parameters_json=params if isinstance(params, str) else json.dumps(params),
                                      strict=bool(f.get("strict", False)))
    raise TypeError(f"a tool is a function or a dict, not {type(tool).__name__}")


def tool_choice_name(choice) -> str:
    """"auto" | "none" | "required" | a tool's name; also OpenAI's {"type": "function", "function": {...}}."""
    if choice is None:
        return ""
    if isinstance(choice, dict):
        return choice.get("function", choice).get("name", "")
    if callable(choice):
        return choice.__name__
    return str(choice)


def response_format_message(fmt) -> llm_pb2.ResponseFormat | None:
    """"json_object", a pydantic model class, or OpenAI's {"type": "json_schema", "json_schema": {...}}."""
    if fmt is None:
        return None
    if isinstance(fmt, type) and issubclass(fmt, BaseModel):
        return llm_pb2.ResponseFormat(type="json_schema", name=fmt.__name__, strict=True,
                                      schema_json=json.dumps(fmt.model_json_schema()))
    if isinstance(fmt, str):
        return llm_pb2.ResponseFormat(type=fmt)
    if isinstance(fmt, dict):
        spec = fmt.get("json_schema") or {}
        return llm_pb2.ResponseFormat(type=fmt.get("type", "text"), name=spec.get("name", ""),
                                      strict=bool(spec.get("strict", False)),
                                      schema_json=json.dumps(spec["schema"]) if "schema" in spec else "")
    raise TypeError("response_format is 'json_object', a pydantic model class or an OpenAI-style dict")


def parse_reply(completion, fmt):
    """Fill `completion.parsed` when `fmt` is a pydantic model class and the reply is whole."""
    if isinstance(fmt, type) and issubclass(fmt, BaseModel) and completion.finish_reason == "stop":
        completion.parsed = fmt.model_validate_json(completion.text)
    return completion


def call_function(fn: Callable, arguments: str) -> str:
    """Run a Python tool on a call's arguments (validated against its signature); the result as text for the
    tool message (JSON unless it is a string), or the error, so that the model can correct itself."""
    try:
        args = arguments_model(fn).model_validate_json(arguments or "{}")
        result = fn(**{k: getattr(args, k) for k in type(args).model_fields})
    except ValidationError as e:
        return f"error: invalid arguments for {fn.__name__}: {e.errors()[0]['msg']}"
    except Exception as e:  # the tool's own failure goes back to the model as its result
        return f"error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result, default=str)


def run_tools(session, messages, functions: list[Callable], *, max_rounds: int = 5, **kwargs):
    """A client-side tool loop: ask with `functions` as tools, run every call the model makes, send the results
    back, until the model answers without calls (or `max_rounds` rounds of calls). Returns the last
    Completion; `messages` (a list) is extended with the conversation. Keywords go to `chat` (tool_choice,
    max_tokens, ...); after the first round, tool_choice falls back to "auto" so that the model can answer."""
    history, by_name = _start(messages, functions)
    reply = None
    for _ in range(max_rounds + 1):
        reply = session.llm.chat(history, tools=functions, **kwargs)
        if not _answer(reply, history, by_name):
            return reply
        kwargs["tool_choice"] = "auto"
    return reply


async def arun_tools(session, messages, functions: list[Callable], *, max_rounds: int = 5, **kwargs):
    """`run_tools` for an asyncio session (`kernos.sdk.aio.run_tools`)."""
    history, by_name = _start(messages, functions)
    reply = None
    for _ in range(max_rounds + 1):
        reply = await session.llm.chat(history, tools=functions, **kwargs)
        if not _answer(reply, history, by_name):
            return reply
        kwargs["tool_choice"] = "auto"
    return reply


def _start(messages, functions):
    from .types import Message

    history = [Message(role="user", content=messages)] if isinstance(messages, str) else messages
    return history, {f.__name__: f for f in functions}


def _answer(reply, history: list, by_name: dict) -> bool:
    """Append the reply and the results of its calls; False when it made none (the loop is over)."""
    from .types import Message

    history.append(reply.message())
    for call in reply.tool_calls:
        fn = by_name.get(call.name)
        out = call_function(fn, call.arguments) if fn else f"error: no tool '{call.name}'"
        history.append(Message(role="tool", content=out, tool_call_id=call.id, name=call.name))
    return bool(reply.tool_calls)
