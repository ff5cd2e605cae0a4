"""The tool manager: the use case behind the Tools syscalls. A registry of tools with JSON-schema
arguments, run with per-tool concurrency limits and timeouts. Built-ins run in the kernel; `python` and
every registered tool run in the sandbox. Who may call a private tool is decided here, once per call.
Irreversible tools park the call until an operator confirms or denies it; a timeout denies."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from kernos.storage.status import StatusError

from . import sandbox
from .builtins import BUILTINS
from .spec import Call, Tool, ToolSpec

NAME_RE = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_ARGS = 64 * 1024


class ToolManager:
    def __init__(self, memory, access, confirm_timeout_s: float = 300.0):
        self.memory = memory  # () -> the long-term vector memory, opened on first use
        self.access = access
        self.confirm_timeout_s = confirm_timeout_s
        self.tools: dict[str, Tool] = {t.name: t for t in BUILTINS}
        self.calls: dict[str, Call] = {}

    def register(self, principal, spec: ToolSpec) -> Tool:
        from jsonschema import Draft202012Validator, SchemaError

        owner = principal.agent_id
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
        tool = Tool(
            spec.name,
            spec.description[:1000],
            schema,
            owner,
            spec.code,
            spec.irreversible,
            min(spec.timeout_s or 10.0, 300.0),
            min(spec.max_concurrency or 4, 64),
            min(spec.cpu_s or 5.0, 120.0),
            min(spec.memory_mb or 256, 4096),
            spec.public or principal.operator,
        )
        self.tools[spec.name] = tool
        return tool

    def visible(self, principal) -> list[Tool]:
        return [t for t in self.tools.values() if t.public or t.owner == principal.agent_id or principal.operator]

    def owner(self, name: str) -> tuple[str, bool]:
        """For access control: a tool's owner and whether it is private (unknown tools: the kernel's, public)."""
        tool = self.tools.get(name)
        return (tool.owner, not tool.public) if tool else ("kernel", False)

    def _tool(self, principal, name: str) -> Tool:
        tool = self.tools.get(name)
        if tool is None:
            raise StatusError("NOT_FOUND", f"no tool '{name[:64]}'")
        self.access.authorize_tool(principal, name)  # private tools need their owner's grant
        return tool

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
        call = Call(uuid.uuid4().hex[:16], name, principal, args)
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
                    call.result = await asyncio.wait_for(
                        tool.builtin(self.memory, principal, call.args), tool.timeout_s
                    )
                    call.state = "done"
                else:
                    out = await asyncio.to_thread(
                        sandbox.run_python, tool.code, call.args, tool.cpu_s, tool.memory_mb, tool.timeout_s
                    )
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
        await self._run(self.tools[call.tool], call.principal, call)
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
        if call.agent_id != principal.agent_id and not principal.operator:
            raise StatusError("PERMISSION_DENIED", "that call belongs to another agent")
        try:
            await asyncio.wait_for(call.decided.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return call

    def pending(self) -> list[Call]:
        return [c for c in self.calls.values() if c.state == "pending"]
