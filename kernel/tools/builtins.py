"""The built-in tools: a safe arithmetic evaluator, search over the caller's own memory and indexed files,
and `python` (run in the jail like every registered tool). A built-in is `async fn(tools, principal, args)`:
`tools.memory()` opens the long-term vector memory, `tools.in_pool(fn)` runs blocking work on the tools'
own threads. The calculator bounds its input (length, nesting), exponents and every intermediate result
(at most 1000 digits): anything else is INVALID_ARGUMENT, never an internal error."""

from __future__ import annotations

import ast
import math
import operator

from kernos.abi.errors import StatusError
from kernos.memory.fair import as_owner

from .spec import Tool
from .spec import schema as _schema

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCS = {n: getattr(math, n) for n in ("sqrt", "sin", "cos", "tan", "log", "log10", "exp", "floor", "ceil")}
_FUNCS.update(abs=abs, round=round, min=min, max=max)
_CONSTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> float:
    """Arithmetic only: numbers, + - * / // % **, parentheses and a few math functions. No names, no calls
    to anything else, bounded exponents."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e6):
                raise ValueError("exponent too large")
            return bounded(_OPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return bounded(_OPS[type(node.op)](ev(node.operand)))
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and not node.keywords
        ):
            return bounded(_FUNCS[node.func.id](*[ev(a) for a in node.args]))
        raise ValueError(f"not allowed in a calculation: {ast.dump(node)[:60]}")

    def bounded(value):
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise ValueError(f"a result over {MAX_DIGITS} digits")
        return value

    if len(expression) > 1000:
        raise ValueError("expression longer than 1000 characters")
    try:
        return ev(ast.parse(expression, mode="eval"))
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


MAX_DIGITS = 1000
MAX_INT_BITS = int(MAX_DIGITS * 3.3219)     # log2(10) bits a digit


async def _calculator(tools, principal, args):
    try:
        return calculate(args["expression"])
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError, MemoryError) as e:
        raise StatusError("INVALID_ARGUMENT", f"calculator: {e}") from None


async def _memory_search(tools, principal, args):
    hits = await tools.in_pool(as_owner(principal.agent_id, lambda: tools.memory().search(
        principal.agent_id, args["query"], args.get("k", 5))))
    return [{"id": h.id, "text": h.text, "distance": h.distance} for h in hits]


async def _storage_search(tools, principal, args):
    hits = await tools.in_pool(as_owner(principal.agent_id, lambda: tools.memory().search(
        principal.agent_id, args["query"], args.get("k", 5) * 4, {"kind": "file"})))
    seen, out = set(), []
    for h in hits:
        if h.metadata["path"] not in seen:
            seen.add(h.metadata["path"])
            out.append({"path": h.metadata["path"], "snippet": h.text[:400], "distance": h.distance})
    return out[: args.get("k", 5)]


BUILTINS = [
    Tool(
        "calculator",
        "Evaluate an arithmetic expression.",
        _schema({"expression": {"type": "string", "maxLength": 1000}}, ["expression"]),
        builtin=_calculator,
    ),
    Tool(
        "memory_search",
        "Search the caller's long-term memory by meaning.",
        _schema(
            {"query": {"type": "string", "minLength": 1}, "k": {"type": "integer", "minimum": 1, "maximum": 50}},
            ["query"],
        ),
        builtin=_memory_search,
    ),
    Tool(
        "storage_search",
        "Search the caller's indexed files by meaning.",
        _schema(
            {"query": {"type": "string", "minLength": 1}, "k": {"type": "integer", "minimum": 1, "maximum": 50}},
            ["query"],
        ),
        builtin=_storage_search,
    ),
    Tool(
        "python",
        "Run Python in a sandbox (no network, CPU/memory/wall limits, a temp dir); set `result`.",
        _schema({"code": {"type": "string", "maxLength": 20000}}, ["code"]),
        code="exec(args['code'])",
        source="builtin",
    ),
]
