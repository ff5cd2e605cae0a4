"""Verifiable rewards for reinforcement learning (GRPO) and reward-ranked data sets: built-in checks, named by
a spec string, and the agent's own reward tool (run by the kernel in the tool jail, like any tool code).

Specs:
- `regex:PATTERN`: 1 if the reply matches PATTERN (re.search), else 0;
- `json`: 1 if the reply is a JSON value; `json_schema:{...}`: 1 if it is one valid against the schema;
- `exact`: 1 if the reply equals the prompt's reference answer (case, spacing and final punctuation aside);
  `contains`: 1 if it contains it. A prompt's reference is its corrected (preferred) reply, else a reply
  marked successful;
- `tool_call`: 1 if the reply's tool calls are the reference's (the prompt's latest successful reply that made
  calls): the same names with the same arguments (as JSON values), in any order; else 0. Prompts whose requests
  offered tools are sampled with those tools (any reward);
- `tool:NAME`: the agent's tool NAME (registered with the tools syscall, or granted to it) is called with
  {"messages": the prompt, "reply": the reply, "reference": the reference or null} and returns a number, or
  {"reward": number}. A call that fails, times out or returns anything else gives no reward: the sample is
  left out and the failure counted in the data set's card, never fatal;
- `judge`, `judge:MODEL` or `judge:MODEL:RUBRIC`: for agents without a verifier, a model the kernel serves (the
  sampled one when MODEL is empty) scores each group of replies side by side, from 0 to 1 (`judge.py`); its calls
  are the agent's, accounted and traced to it. A verdict that cannot be read leaves its group unscored (counted)."""
from __future__ import annotations

import json
import math
import re

BUILTINS = ("regex", "json", "json_schema", "exact", "contains", "tool_call")


class RewardError(ValueError):
    pass


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .!")


def parse(spec: str):
    """(kind, argument) of a spec; RewardError naming what is wrong."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip()
    if kind == "tool":
        if not arg.strip():
            raise RewardError("reward 'tool:NAME' needs the tool's name")
        return kind, arg.strip()
    if kind == "judge":
        model, _, rubric = arg.partition(":")
        return kind, (model.strip(), rubric.strip()[:2000])
    if kind not in BUILTINS:
        raise RewardError(f"reward '{spec[:40]}': one of regex:PATTERN, json, json_schema:SCHEMA, exact, contains, "
                          "tool_call, tool:NAME, judge[:MODEL[:RUBRIC]]")
    if kind == "regex":
        try:
            return kind, re.compile(arg)
        except re.error as e:
            raise RewardError(f"reward regex: {e}") from None
    if kind == "json_schema":
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            schema = json.loads(arg)
            Draft202012Validator.check_schema(schema)
        except (ValueError, SchemaError) as e:
            raise RewardError(f"reward json_schema: {str(e)[:200]}") from None
        return kind, Draft202012Validator(schema)
    return kind, None


def needs_reference(kind: str) -> bool:
    return kind in ("exact", "contains", "tool_call")


def _call_key(call: dict) -> tuple[str, str]:
    args = call.get("arguments", "")
    try:
        args = json.dumps(json.loads(args) if isinstance(args, str) else args, sort_keys=True)
    except ValueError:
        pass                              # not JSON: compared as written
    return call.get("name", ""), args


def builtin(kind: str, arg, sample, reference) -> float:
    """The reward of a built-in check of a sample (`datasets.Sample`); `reference`: the prompt's reference answer
    (text), or for `tool_call` its reference calls."""
    reply = sample.text
    if kind == "tool_call":
        if not reference:
            raise RewardError("reward 'tool_call' needs reference calls (a successful reply that made them)")
        return 1.0 if sorted(map(_call_key, sample.tool_calls)) == sorted(map(_call_key, reference)) else 0.0
    if kind == "regex":
        return 1.0 if arg.search(reply) else 0.0
    if kind in ("json", "json_schema"):
        try:
            value = json.loads(reply)
        except ValueError:
            return 0.0
        return 1.0 if kind == "json" or arg.is_valid(value) else 0.0
    if reference is None:
        raise RewardError(f"reward '{kind}' needs a reference answer")
    if kind == "exact":
        return 1.0 if _norm(reply) == _norm(reference) else 0.0
    return 1.0 if _norm(reference) in _norm(reply) else 0.0


def tool_result(result) -> float | None:
    """A reward tool's result as a number, or None when it is not one."""
    if isinstance(result, dict):
        result = result.get("reward")
    if isinstance(result, bool) or not isinstance(result, (int, float)) or not math.isfinite(result):
        return None
    return float(result)
