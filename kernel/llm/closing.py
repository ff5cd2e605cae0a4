"""The shortest valid ending of a partial JSON value under its JSON schema: what a reply under a grammar (a JSON
schema, json_object, a tool call) is steered onto when its token budget runs out. The open string, number or
literal is finished (an enum's value completed), the required properties still missing are filled with their
shortest valid values, and every open array and object is closed. The grammar's matcher checks an ending before
the engine uses it; where this finds none (a pattern or bound it does not model, a key it cannot place) it
returns None and the reply runs as before."""
from __future__ import annotations

import json
import math

_LITERALS = ("true", "false", "null")


def shortest(schema, root=None, depth: int = 0) -> str | None:
    """The shortest JSON text valid for `schema` as far as this models it (None: none found)."""
    root = schema if root is None else root
    if depth > 32 or schema is False:
        return None
    if not isinstance(schema, dict) or not schema:
        return "0"
    if "$ref" in schema:
        return shortest(resolve(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return min((json.dumps(v) for v in schema["enum"]), key=len, default=None)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return _least(shortest(s, root, depth + 1) for s in schema[key])
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged = {**(part if isinstance(part, dict) else {}), **merged}
        return shortest(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        return _least(shortest({**schema, "type": k}, root, depth + 1) for k in kind)
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        parts = []
        for k in ordered(schema, schema.get("required") or []):
            v = shortest(props.get(k, {}), root, depth + 1)
            if v is None:
                return None
            parts.append(json.dumps(k) + ":" + v)
        return "{" + ",".join(parts) + "}"
    if kind == "array":
        n = int(schema.get("minItems", 0))
        item = shortest(schema.get("items", {}), root, depth + 1) if n else ""
        return None if item is None else "[" + ",".join([item] * n) + "]"
    if kind == "string":
        return json.dumps("a" * int(schema.get("minLength", 0)))
    if kind in ("integer", "number"):
        return _number(schema)
    return {"boolean": "false", "null": "null"}.get(kind, "0")


def _least(options):
    return min((o for o in options if o is not None), key=len, default=None)


def _number(schema: dict) -> str:
    v = 0
    if isinstance(schema.get("minimum"), (int, float)):
        v = max(v, math.ceil(schema["minimum"]))
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and v <= schema["exclusiveMinimum"]:
        v = math.floor(schema["exclusiveMinimum"]) + 1
    if isinstance(schema.get("maximum"), (int, float)) and v > schema["maximum"]:
        v = math.floor(schema["maximum"])
    return str(v)


def resolve(ref: str, root) -> dict:
    node = root
    for part in ref.lstrip("#/").split("/") if ref.startswith("#") else ():
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def ordered(schema: dict, keys) -> list[str]:
    """`keys` in the order the schema lists its properties (the order the grammar writes them in)."""
    order = list((schema.get("properties") or {}).keys())
    return sorted(keys, key=lambda k: order.index(k) if k in order else len(order))


class _Frame:
    """An open object or array: its schema options, what it holds so far and what it expects next."""

    def __init__(self, kind: str, options: list[dict]):
        self.kind, self.options = kind, options
        self.state = "open"          # open | key | colon | value | after | comma
        self.keys: dict[str, str] = {}   # object: key -> its value's text (scalars), for choosing an option
        self.key = ""
        self.items = 0

    def schema(self) -> dict:
        """The first option consistent with the keys (and constant values) seen."""
        for o in self.options:
            props = o.get("properties") or {}
            if all(k in props or o.get("additionalProperties") is not False for k in self.keys) and all(
                    "const" not in props.get(k, {}) or json.dumps(props[k]["const"]) == v
                    for k, v in self.keys.items() if v):
                return o
        return self.options[0] if self.options else {}

    def children(self) -> list[dict]:
        """The schemas the value under the current key (or the next item) may follow, over every option."""
        out = []
        for o in self.options:
            props, extra = o.get("properties") or {}, o.get("additionalProperties")
            if self.kind == "array":
                out.append(o.get("items") if isinstance(o.get("items"), dict) else {})
            elif self.key in props:
                out.append(props[self.key])
            elif extra is not False:
                out.append(extra if isinstance(extra, dict) else {})
        return out or [{}]

    def child(self, root) -> dict:
        s = self.schema()
        if self.kind == "array":
            return s.get("items", {}) if isinstance(s.get("items"), dict) else {}
        props = s.get("properties") or {}
        extra = s.get("additionalProperties")
        return props.get(self.key, extra if isinstance(extra, dict) else {})


def options(schema, root, depth: int = 0) -> list[dict]:
    """A schema as the list of alternatives a value may take (anyOf / oneOf flattened, $ref resolved)."""
    if not isinstance(schema, dict) or depth > 16:
        return [{}]
    if "$ref" in schema:
        return options(resolve(schema["$ref"], root), root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return [o for s in schema[key] for o in options(s, root, depth + 1)]
    return [schema]


def close(text: str, schema, root=None) -> str | None:
    """The shortest text that, appended to `text` (the start of one JSON value of `schema`), makes it whole; ""
    if it is whole already; None if none is found."""
    root = schema if root is None else root
    stack: list[_Frame] = []
    in_str = esc = False
    uhex = -1                    # hex digits still due in a \\u escape (-1: none)
    buf, scalar, done = [], "", False

    def child_schema():
        return stack[-1].child(root) if stack else schema

    def value_done(raw: str = ""):
        nonlocal done
        if not stack:
            done = True
            return
        f = stack[-1]
        if f.kind == "object":
            f.keys[f.key] = raw
        else:
            f.items += 1
        f.state = "after"

    for ch in text:
        if in_str:
            if uhex > 0:
                uhex -= 1
            elif esc:
                esc, uhex = False, (4 if ch == "u" else -1)
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                s = "".join(buf)
                if stack and stack[-1].state == "key":
                    stack[-1].key, stack[-1].state = s, "colon"
                else:
                    value_done(json.dumps(s))
                continue
            buf.append(ch)
            continue
        if scalar:
            if ch.isalnum() or ch in "+-.":
                scalar += ch
                continue
            value_done(scalar)
            scalar = ""
        if ch in " \t\n\r":
            continue
        f = stack[-1] if stack else None
        if ch == '"':
            in_str, buf = True, []
            if f is not None and f.kind == "object" and f.state in ("open", "comma"):
                f.state = "key"
        elif ch in "{[":
            stack.append(_Frame("object" if ch == "{" else "array", options(child_schema(), root)))
        elif ch in "}]":
            stack.pop()
            value_done()
        elif ch == ":" and f is not None:
            f.state = "value"
        elif ch == "," and f is not None:
            f.state = "comma"
        else:
            scalar = ch
    if done and not stack:
        return ""
    out = []
    if in_str:
        if uhex > 0:
            out.append("0" * uhex)
        elif esc:
            out.append("n")
        s = "".join(buf)
        is_key = bool(stack) and stack[-1].state == "key"
        tail = _key_tail(s, stack[-1]) if is_key else _enum_tail(s, stack[-1].children() if stack else [schema], root)
        if tail is None:
            return None
        out.append(tail + '"')
        if is_key:
            stack[-1].key, stack[-1].state = s + tail, "colon"
        else:
            value_done(json.dumps(s + tail))
    elif scalar:
        tail = _scalar_tail(scalar, stack[-1].children() if stack else [schema], root)
        if tail is None:
            return None
        out.append(tail)
        value_done(scalar + tail)
    if not stack:
        if done:
            return "".join(out)
        v = shortest(schema, root)
        return None if v is None else "".join(out) + v
    while stack:
        f = stack[-1]
        piece = _finish(f, root)
        if piece is None:
            return None
        out.append(piece)
        stack.pop()
        value_done()
    return "".join(out)


def _enum_tail(s: str, schemas: list, root) -> str | None:
    """The rest of a string value begun as `s`: "" where a schema takes any string, else the shortest rest of an
    enum or const value it begins."""
    fits = []
    for o in (o for sch in schemas for o in options(sch, root)):
        values = o.get("enum", [o["const"]] if "const" in o else None)
        if values is None:
            return ""
        fits += [v[len(s):] for v in values if isinstance(v, str) and v.startswith(s)]
    return min(fits, key=len) if fits else None


def _key_tail(s: str, f: _Frame) -> str | None:
    """The rest of a property name begun as `s`: the first of the object's properties it starts (a missing
    required one before others); any name where the object takes other properties."""
    schema = f.schema()
    props = [k for k in (schema.get("properties") or {}) if k.startswith(s) and k not in f.keys]
    required = [k for k in props if k in (schema.get("required") or [])]
    if required or props:
        return (required or props)[0][len(s):]       # the grammar writes properties in the schema's order
    return "" if schema.get("additionalProperties") is not False else None


def _scalar_tail(scalar: str, schemas: list, root) -> str | None:
    """The rest of a number or literal begun as `scalar`; a number below its schema's minimum gets digits."""
    for lit in _LITERALS:
        if lit.startswith(scalar):
            return lit[len(scalar):]
    base = "0" if scalar[-1] in "+-.eE" else ""
    bounds = [o for sch in schemas for o in options(sch, root) if o.get("type") in ("integer", "number")]
    for more in ("", "0", "00", "000", "0000", "00000"):
        try:
            value = float(scalar + base + more)
        except ValueError:
            return None
        if not bounds or any(_in_bounds(value, o) for o in bounds):
            return base + more
        if "." in scalar or "e" in scalar.lower() or value < 0:
            break
    return None


def _in_bounds(v: float, o: dict) -> bool:
    num = (int, float)
    return not ((isinstance(o.get("minimum"), num) and v < o["minimum"])
                or (isinstance(o.get("maximum"), num) and v > o["maximum"])
                or (isinstance(o.get("exclusiveMinimum"), num) and v <= o["exclusiveMinimum"])
                or (isinstance(o.get("exclusiveMaximum"), num) and v >= o["exclusiveMaximum"]))


def _finish(f: _Frame, root) -> str | None:
    """What closes frame `f` from its state: a value where one is due, the missing required properties (or
    items), then its bracket."""
    s = f.schema()
    parts = []
    if f.kind == "array":
        item = s.get("items", {}) if isinstance(s.get("items"), dict) else {}
        need = max(int(s.get("minItems", 0)) - f.items, 1 if f.state == "comma" else 0)
        for i in range(need):
            v = shortest(item, root)
            if v is None:
                return None
            parts.append(("," if (i or f.state == "after") else "") + v)
        return "".join(parts) + "]"
    if f.state in ("colon", "value"):
        v = shortest(f.child(root), root)
        if v is None:
            return None
        parts.append((":" if f.state == "colon" else "") + v)
        f.keys[f.key] = v
        f.state = "after"
    props = s.get("properties") or {}
    missing = [k for k in ordered(s, s.get("required") or []) if k not in f.keys]
    if f.state == "comma" and not missing:
        free = [k for k in props if k not in f.keys]
        if not free and s.get("additionalProperties") is False:
            return None
        missing = [min(free, key=lambda k: len(shortest(props[k], root) or "x" * 99))] if free else [""]
    for i, k in enumerate(missing):
        v = shortest(props.get(k, {}), root)
        if v is None:
            return None
        lead = "," if (i or f.state == "after") else ""
        parts.append(f"{lead}{json.dumps(k)}:{v}")
    return "".join(parts) + "}"


# -- a reply under an output spec ------------------------------------------------------------------------------
def ending(spec, text: str) -> str | None:
    """The shortest text that makes `text`, a reply under `spec` (structured.OutputSpec), whole: its JSON value
    closed, or its open tool call finished ("" where it may end now; None where nothing is due or none is
    found: free text, tool_choice "auto" outside a call)."""
    from .structured import TOOL_CLOSE, TOOL_OPEN, _call_schema, closed_schema

    if spec.response_format != "text":
        schema = {"type": "object"} if spec.response_format == "json_object" else closed_schema(spec.schema or {})
        return close(text, schema)
    if not spec.calls_tools:
        return None
    call = _call_schema(spec.chosen_tools())
    tail = "\n" + TOOL_CLOSE
    i = text.rfind(TOOL_OPEN)
    if i < 0 or TOOL_CLOSE in text[i:]:                  # outside a call
        if spec.tool_choice == "auto":
            return None
        after = text[text.rfind(TOOL_CLOSE) + len(TOOL_CLOSE):] if i >= 0 else text
        if i >= 0 and not after:
            return ""                                    # calls made: it may end here
        begun = after.lstrip("\n")
        if not TOOL_OPEN.startswith(begun):
            return None
        v = shortest(call)
        return None if v is None else TOOL_OPEN[len(begun):] + "\n" + v + tail
    body = text[i + len(TOOL_OPEN):]
    if not body:
        v = shortest(call)
        return None if v is None else "\n" + v + tail
    for k in range(len(tail) - 1, 0, -1):              # the JSON done, its closing tag begun
        if body.endswith(tail[:k]) and close(body[1:-k], call) == "":
            return tail[k:]
    rest = close(body[1:], call)
    return None if rest is None else rest + tail
