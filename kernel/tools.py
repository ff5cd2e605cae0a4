"""The tool manager: a registry of tools with JSON-schema arguments, run as syscalls with per-tool
concurrency limits and timeouts. Built-ins run in the kernel (a safe arithmetic evaluator, memory and
storage search on the caller's own data); `python` and every registered tool run in the sandbox.
Irreversible tools park the call until an operator confirms or denies it; a timeout denies."""
from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import re
import time
import uuid
from dataclasses import dataclass, field

from kernos.storage.status import StatusError

from . import sandbox

NAME_RE = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_ARGS = 64 * 1024


@dataclass
class Tool:
    name: str
    description: str
    schema: dict
    owner: str = "kernel"
    code: str = ""
    irreversible: bool = False
    timeout_s: float = 10.0
    max_concurrency: int = 4
    cpu_s: float = 5.0
    memory_mb: int = 256
    public: bool = True
    builtin: object = None           # async fn(kernel, principal, args) for built-ins
    semaphore: asyncio.Semaphore | None = None


@dataclass
class Call:
    call_id: str
    tool: str
    agent_id: str
    args: dict
    state: str = "pending"           # pending -> done | error | denied
    result: object = None
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    duration_ms: float = 0.0
    decided: asyncio.Event = field(default_factory=asyncio.Event)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}
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
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not allowed in a calculation: {ast.dump(node)[:60]}")
    if len(expression) > 1000:
        raise ValueError("expression longer than 1000 characters")
    return ev(ast.parse(expression, mode="eval"))


async def _calculator(kernel, principal, args):
    try:
        return calculate(args["expression"])
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError) as e:
        raise StatusError("INVALID_ARGUMENT", f"calculator: {e}") from None


async def _memory_search(kernel, principal, args):
    hits = await asyncio.to_thread(kernel.memory.search, principal.agent_id, args["query"], args.get("k", 5))
    return [{"id": h.id, "text": h.text, "distance": h.distance} for h in hits]


async def _storage_search(kernel, principal, args):
    hits = await asyncio.to_thread(kernel.memory.search, principal.agent_id, args["query"], args.get("k", 5) * 4,
                                   {"kind": "file"})
    seen, out = set(), []
    for h in hits:
        if h.metadata["path"] not in seen:
            seen.add(h.metadata["path"])
            out.append({"path": h.metadata["path"], "snippet": h.text[:400], "distance": h.distance})
    return out[:args.get("k", 5)]


def _schema(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


BUILTINS = [
    Tool("calculator", "Evaluate an arithmetic expression.",
         _schema({"expression": {"type": "string", "maxLength": 1000}}, ["expression"]), builtin=_calculator),
    Tool("memory_search", "Search the caller's long-term memory by meaning.",
         _schema({"query": {"type": "string", "minLength": 1}, "k": {"type": "integer", "minimum": 1, "maximum": 50}},
                 ["query"]), builtin=_memory_search),
    Tool("storage_search", "Search the caller's indexed files by meaning.",
         _schema({"query": {"type": "string", "minLength": 1}, "k": {"type": "integer", "minimum": 1, "maximum": 50}},
                 ["query"]), builtin=_storage_search),
    Tool("python", "Run Python in a sandbox (no network, CPU/memory/wall limits, a temp dir); set `result`.",
         _schema({"code": {"type": "string", "maxLength": 20000}}, ["code"]), code="exec(args['code'])"),
]


class ToolManager:
    def __init__(self, kernel, confirm_timeout_s: float = 300.0):
        self.k = kernel
        self.confirm_timeout_s = confirm_timeout_s
        self.tools: dict[str, Tool] = {t.name: t for t in BUILTINS}
        self.calls: dict[str, Call] = {}

    def register(self, owner: str, spec) -> Tool:
        from jsonschema import Draft202012Validator, SchemaError

        if not NAME_RE.match(spec.name):
            raise StatusError("INVALID_ARGUMENT", "tool names are 1-64 characters of a-z, 0-9 and '_'")
        existing = self.tools.get(spec.name)
        if existing is not None and (existing.owner == "kernel" or existing.owner != owner):
            raise StatusError("ALREADY_EXISTS", f"tool '{spec.name}' exists and belongs to '{existing.owner}'")
        if not spec.code.strip():
            raise StatusError("INVALID_ARGUMENT", "a registered tool needs code (Python, run in the sandbox)")
        try:
            schema = json.loads(spec.schema_json or '{"type": "object"}')
            Draft202012Validator.check_schema(schema)
        except (ValueError, SchemaError) as e:
            raise StatusError("INVALID_ARGUMENT", f"schema_json is not a valid JSON Schema: {str(e)[:300]}") from None
        if schema.get("type") != "object":
            raise StatusError("INVALID_ARGUMENT", "the arguments schema must describe an object")
        tool = Tool(spec.name, spec.description[:1000], schema, owner, spec.code, spec.irreversible,
                    min(spec.timeout_s or 10.0, 300.0), min(spec.max_concurrency or 4, 64), min(spec.cpu_s or 5.0, 120.0),
                    min(spec.memory_mb or 256, 4096), spec.public or owner.startswith("admin:"))
        self.tools[spec.name] = tool
        return tool

    def visible(self, principal) -> list[Tool]:
        return [t for t in self.tools.values() if t.public or t.owner == principal.agent_id
                or principal.agent_id.startswith("admin:")]

    def _tool(self, principal, name: str) -> Tool:
        tool = self.tools.get(name)
        if tool is None:
            raise StatusError("NOT_FOUND", f"no tool '{name[:64]}'")
        return tool  # who may call it was decided by access control (private tools need a grant)

    async def call(self, principal, name: str, args_json: str) -> Call:
        from jsonschema import Draft202012Validator

        tool = self._tool(principal, name)
        if len(args_json) > MAX_ARGS:
            raise StatusError("RESOURCE_EXHAUSTED", f"arguments over {MAX_ARGS} bytes")
        try:
            args = json.loads(args_json or "{}")
        except ValueError as e:
            raise StatusError("INVALID_ARGUMENT", f"args_json is not JSON: {e}") from None
        errors = sorted(Draft202012Validator(tool.schema).iter_errors(args), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "(arguments)"
            raise StatusError("INVALID_ARGUMENT", f"{name}: {where}: {errors[0].message[:300]}")
        call = Call(uuid.uuid4().hex[:16], name, principal.agent_id, args)
        if tool.irreversible:  # kept until decided and collected; immediate calls are never stored
            self._prune()
            self.calls[call.call_id] = call
            asyncio.get_running_loop().call_later(self.confirm_timeout_s, self._expire, call.call_id)
            return call
        await self._run(tool, principal, call)
        return call

    def _prune(self, keep: int = 10_000) -> None:
        if len(self.calls) >= keep:
            for cid in [c.call_id for c in self.calls.values() if c.state != "pending"][: len(self.calls) // 2]:
                del self.calls[cid]

    async def _run(self, tool: Tool, principal, call: Call) -> None:
        if tool.semaphore is None:
            tool.semaphore = asyncio.Semaphore(tool.max_concurrency)
        t0 = time.monotonic()
        async with tool.semaphore:
            try:
                if tool.builtin is not None:
                    call.result = await asyncio.wait_for(tool.builtin(self.k, principal, call.args), tool.timeout_s)
                    call.state = "done"
                else:
                    out = await asyncio.to_thread(sandbox.run_python, tool.code, call.args, tool.cpu_s,
                                                  tool.memory_mb, tool.timeout_s)
                    call.state, call.result, call.error = ("done" if out.ok else "error"), out.result, out.error
            except asyncio.TimeoutError:
                call.state, call.error = "error", f"timed out after {tool.timeout_s:g} s"
        call.duration_ms = (time.monotonic() - t0) * 1e3
        call.decided.set()

    def _pending(self, call_id: str) -> Call:
        call = self.calls.get(call_id)
        if call is None:
            raise StatusError("NOT_FOUND", f"no tool call '{call_id[:32]}'")
        return call

    async def confirm(self, call_id: str) -> Call:
        call = self._pending(call_id)
        if call.state != "pending":
            raise StatusError("FAILED_PRECONDITION", f"call '{call_id}' is already {call.state}")
        call.state = "running"
        principal = type("P", (), {"agent_id": call.agent_id})()
        await self._run(self.tools[call.tool], principal, call)
        return call

    def deny(self, call_id: str, reason: str = "denied by an operator") -> Call:
        call = self._pending(call_id)
        if call.state != "pending":
            raise StatusError("FAILED_PRECONDITION", f"call '{call_id}' is already {call.state}")
        call.state, call.error = "denied", reason
        call.decided.set()
        return call

    def _expire(self, call_id: str) -> None:
        call = self.calls.get(call_id)
        if call is not None and call.state == "pending":
            self.deny(call_id, f"no confirmation within {self.confirm_timeout_s:g} s")

    async def wait(self, principal, call_id: str, timeout: float) -> Call:
        call = self._pending(call_id)
        if call.agent_id != principal.agent_id and not principal.agent_id.startswith("admin:"):
            raise StatusError("PERMISSION_DENIED", "that call belongs to another agent")
        try:
            await asyncio.wait_for(call.decided.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return call

    def pending(self) -> list[Call]:
        return [c for c in self.calls.values() if c.state == "pending"]
