"""What a generation's output must look like, and the grammar that makes it so.

An `OutputSpec` holds a request's tools, tool choice and response format. `grammar()` turns it into an
llguidance grammar, and `compile()` turns that into a matcher for one request. The engine applies the
matcher's token mask to that request's row of logits at every step, so the output always parses:
- `response_format` json_object / json_schema: the whole reply is one JSON value of the schema;
- `tool_choice` "required" or a tool's name: the reply is tool calls only, each
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` with arguments valid for that tool;
- `tool_choice` "auto": free text, and once the model opens `<tool_call>` the call is constrained the same
  way (a lazy trigger: the text before it is not);
- "none", or no tools: free text.

llguidance was chosen over xgrammar by measurement on the embedded model's 49,152-token vocabulary: a mask
(fill + apply) in 37-58 us against 161 us, a JSON-schema compile in 1.6 ms against 6.0 ms, and no
dependencies (xgrammar needs triton, about 1 GB on x86-64 Linux). Versions stay below 1.8 as vLLM pins.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass, field

from kernos.abi.errors import invalid

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# JSON whitespace: a little, as the model likes it, never unbounded. Measured on the embedded model (16 forced
# tool calls): a fixed layout ('": "' forced) left 6 of 16 calls running away inside a string, because it
# forces tokens the model would not pick (it then "closes" the string inside it); the compact layout 3 of 16;
# up to 4 spaces/tabs/newlines at a time between JSON tokens 0 of 16, with sensible arguments. (llguidance
# lets such whitespace repeat, so a model that keeps choosing it runs to max_tokens, as one that never closes
# a string does: no grammar bounds the length of what it allows.)
JSON_LAYOUT = {"whitespace_flexible": True, "whitespace_pattern": "[ \\t\\n]{0,4}"}


@dataclass(frozen=True)
class ToolDef:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object"})
    strict: bool = False

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class OutputSpec:
    tools: tuple[ToolDef, ...] = ()
    tool_choice: str = "auto"          # auto | none | required | a tool's name
    parallel: bool = True
    response_format: str = "text"      # text | json_object | json_schema
    schema: dict | None = None         # json_schema's schema

    @property
    def calls_tools(self) -> bool:
        """Whether tool calls are parsed out of the reply."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        return self.response_format != "text" or self.calls_tools

    def chosen_tools(self) -> tuple[ToolDef, ...]:
        if self.tool_choice in ("auto", "required", "none"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.tool_choice)

    def grammar(self) -> str | None:
        """The llguidance grammar of the output, in Lark (what both engines take: vLLM's "guidance" backend reads
        Lark, not llguidance's JSON form); None for free text."""
        from llguidance import LLMatcher

        if self.response_format != "text":
            schema = {"type": "object"} if self.response_format == "json_object" else closed_schema(self.schema or {})
            if not isinstance(schema, dict):       # a boolean schema
                schema = {} if schema else {"not": {}}
            return LLMatcher.grammar_from_lark(f"start: %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}\n")
        if not self.calls_tools:
            return None
        call = json.dumps(_call_schema(self.chosen_tools()))
        body = f'"\\n" %json {call} "\\n{TOOL_CLOSE}"'
        if self.tool_choice != "auto":        # required, or a named tool: calls only
            many = '("\\n" call)*' if self.parallel else ""
            return LLMatcher.grammar_from_lark(f'start: call {many}\ncall: "{TOOL_OPEN}" {body}\n')
        # auto: free text; a call is constrained from its opening tag on (a lazy trigger).
        calls = "call*" if self.parallel else "call?"
        return LLMatcher.grammar_from_lark(
            "%llguidance {}\n"
            f"start: {calls} TEXT\n"
            f"call: call_trigger {body}\n"
            f'call_trigger[lazy]: TEXT "{TOOL_OPEN}"\n'
            "TEXT: /(.|\\n)*/\n")

    def to_dict(self) -> dict:
        return {"tools": [{"name": t.name, "description": t.description, "parameters": t.parameters,
                           "strict": t.strict} for t in self.tools],
                "tool_choice": self.tool_choice, "parallel": self.parallel,
                "response_format": self.response_format, "schema": self.schema}

    @classmethod
    def from_dict(cls, d: dict | None) -> OutputSpec | None:
        if not d:
            return None
        return cls(tuple(ToolDef(**t) for t in d["tools"]), d["tool_choice"], d["parallel"], d["response_format"],
                   d["schema"])


def _call_schema(tools: tuple[ToolDef, ...]) -> dict:
    options = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": closed_schema(t.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_LAYOUT}


# -- building a spec from a request (the one place its fields are checked) ------------------------------------
def output_spec(tools: list[dict], tool_choice: str, parallel: bool | None, response_format: str,
                schema_json: str, max_schema_bytes: int, strict: bool = False,
                max_schema_repeats: int = 0) -> OutputSpec | None:
    """`tools`: [{"name", "description", "parameters_json", "strict"}]. INVALID_ARGUMENT naming the field."""
    defs = []
    for i, t in enumerate(tools):
        if not TOOL_NAME_RE.match(t["name"] or ""):
            raise invalid(f"tools[{i}].name must be 1-64 characters of letters, digits, '_' and '-'")
        params = _schema(t.get("parameters_json") or '{"type": "object"}', f"tools[{i}].parameters_json",
                         max_schema_bytes, max_schema_repeats)
        if params.get("type", "object") != "object":
            raise invalid(f"tools[{i}].parameters_json must describe an object")
        if t.get("strict"):
            params = strict_schema(params)
        defs.append(ToolDef(t["name"], (t.get("description") or "")[:4000], params, bool(t.get("strict"))))
    names = [d.name for d in defs]
    if len(set(names)) != len(names):
        raise invalid("tools: two tools have the same name")
    choice = tool_choice or "auto"
    if choice not in ("auto", "none", "required") and choice not in names:
        raise invalid(f"tool_choice '{choice[:64]}' names no tool of the request (tools: {names[:20]})")
    if choice in ("required",) and not defs:
        raise invalid("tool_choice 'required' needs tools")
    fmt = response_format or "text"
    if fmt not in ("text", "json_object", "json_schema"):
        raise invalid("response_format.type must be 'text', 'json_object' or 'json_schema'")
    schema = None
    if fmt == "json_schema":
        if not schema_json:
            raise invalid("response_format json_schema needs a schema (response_format.schema_json)")
        schema = _schema(schema_json, "response_format.schema_json", max_schema_bytes, max_schema_repeats)
        if strict:
            schema = strict_schema(schema)
    elif schema_json:
        raise invalid(f"response_format.schema_json is only for json_schema, not '{fmt}'")
    if fmt != "text" and defs and choice != "none":
        raise invalid("tools and a JSON response_format cannot be combined: give tool_choice 'none' or drop one")
    spec = OutputSpec(tuple(defs), choice, True if parallel is None else bool(parallel), fmt, schema)
    return spec if (spec.tools or spec.response_format != "text") else None


def strict_schema(schema):
    """OpenAI's strict mode: every object takes exactly the properties it names (additionalProperties false
    where the schema leaves it open)."""
    return _close(schema, every_object=True)


def closed_schema(schema):
    """What the grammar generates: an object that lists its properties gets only those (additionalProperties
    false where the schema leaves it open), as vLLM's structured outputs do by default. The model is never
    steered into inventing keys (measured: the 135M embedded model given an open object invented keys until
    max_tokens). Objects that list no properties stay open."""
    return _close(schema, every_object=False)


def _close(schema, every_object: bool):
    """additionalProperties false on each open object of `schema` (on every one, or on those that list their
    properties), walking its subschemas (never a "properties" mapping as if it were a schema)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _close(sub, every_object) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames"):
        if isinstance(out.get(key), dict):
            out[key] = _close(out[key], every_object)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_close(sub, every_object) for sub in out[key]]
    is_object = "properties" in out or (every_object and out.get("type") == "object")
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


# Array bounds are unrolled by the grammar compiler, about 1 KB of memory per repetition, before its own size limit
# looks: a 315-byte schema with "minItems": 100000000 allocated 5 GiB (measured: maxItems 10^6 took 1.1 GiB and
# 4.8 s, 20,000 took 44 MB and 0.05 s, 4,096 27 MB). Nested arrays do not multiply (an item is one rule), so the
# sum of every bound in a schema is the measure, checked before compiling. String lengths and regex repetitions
# compile lazily (llguidance's lexer fuel bounds them): 10^7 costs nothing up front.
REPEAT_KEYS = ("minItems", "maxItems", "minContains", "maxContains")


def repeat_count(schema) -> int:
    """The sum of every array bound in `schema` (all subschemas, $defs included)."""
    total, stack = 0, [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in REPEAT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    total += int(min(value, 1 << 62))
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total


def _schema(text: str, field_name: str, max_bytes: int, max_repeats: int = 0) -> dict:
    if len(text.encode()) > max_bytes:
        raise invalid(f"{field_name} is {len(text.encode())} bytes; the limit is {max_bytes} "
                      "(limits.max_schema_bytes)")
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise invalid(f"{field_name} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise invalid(f"{field_name} must be a JSON Schema object")
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise invalid(f"{field_name} is not a valid JSON Schema: {e.message[:300]}") from None
    if max_repeats and (repeats := repeat_count(schema)) > max_repeats:
        raise invalid(f"{field_name}: its array bounds (minItems, maxItems, minContains, maxContains) add up to "
                      f"{repeats}; the limit is {max_repeats} (limits.max_schema_repeats)")
    return schema


# -- matchers ------------------------------------------------------------------------------------------------
_tokenizers: dict[tuple[int, int], object] = {}
_tokenizers_lock = threading.Lock()


def ll_tokenizer(hf_tokenizer, n_vocab: int):
    """llguidance's view of a model's tokenizer (about 0.3 s to build; built once per tokenizer and vocabulary
    size, and forgotten when the tokenizer is, so that a later object at the same address never gets it)."""
    key = (id(hf_tokenizer), n_vocab)
    with _tokenizers_lock:
        tok = _tokenizers.get(key)
        if tok is None:
            import llguidance.hf

            tok = _tokenizers[key] = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab)
            weakref.finalize(hf_tokenizer, _tokenizers.pop, key, None)
        return tok


def compile_matcher(grammar: str, hf_tokenizer, n_vocab: int, field_name: str = "the requested output"):
    """A fresh matcher of `grammar` for one request; INVALID_ARGUMENT if the grammar engine rejects it."""
    from llguidance import LLMatcher

    matcher = LLMatcher(ll_tokenizer(hf_tokenizer, n_vocab), grammar)
    if matcher.is_error():
        raise invalid(f"{field_name} cannot be compiled to a grammar: {matcher.get_error()[:400]}")
    return matcher
