"""The tool manager: the use case behind the Tools syscalls. A registry of tools with JSON-schema
arguments. Built-ins run in the kernel; `python` and every registered tool run in the jail (`jail.py`).
Who may call a private tool is decided here, once per call.

Names: public tools (built-ins, operators' tools, tools registered public) share one namespace; an agent's
private tools live in its own. A caller names its own and public tools by name (its own first) and a
private tool granted to it by "owner/name". A private tool that the caller may not use answers exactly like
one that does not exist, and registering a name never tells of another agent's private tool.

Registered tools are kept (`registry.py`): they outlive a restart, and every node of a cluster serves them; a node
picks up what another registered or removed before it next looks one up. Built-ins and mounted MCP servers'
tools are the kernel's own, made at each start.

Irreversible tools park the call until an operator confirms or denies it; a timeout denies.

Tool work runs apart from the kernel's own: on a bounded pool of its own threads (not the one that serves
storage, memory and access), at most `max_concurrent_calls` at once, `max_calls_per_agent` per agent,
`max_calls_per_group` per group and the tool's own `max_concurrency`; a freed slot goes to the waiting call
whose agent runs the fewest (`slots.py`). A draining kernel refuses new calls, lets running ones finish until its
deadline, then kills their jails."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from kernos.abi.errors import StatusError

from . import sandbox
from .builtins import BUILTINS
from .jail import Jail, Limits
from .registry import ToolStore, spec_of
from .slots import FairSlots
from .spec import Call, Tool, ToolSpec

log = logging.getLogger("kernos.tools")

NAME_RE = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_ARGS = 64 * 1024


class ToolManager:
    def __init__(self, memory, access, config, store: ToolStore | None = None):
        self.memory = memory  # () -> the long-term vector memory, opened on first use
        self.access = access
        self.config = config  # ToolsConfig
        self.confirm_timeout_s = config.confirm_timeout_s
        self.tools: dict[str, Tool] = {t.name: t for t in BUILTINS}
        self.calls: dict[str, Call] = {}      # irreversible calls, pending or decided, until collected
        self.log: deque[Call] = deque(maxlen=500)   # the last finished calls of every tool (the console's log)
        self.pool = ThreadPoolExecutor(max_workers=config.max_concurrent_calls, thread_name_prefix="tool")
        per_group = config.max_calls_per_group or max(1, config.max_concurrent_calls // 2)
        self.slots = FairSlots(config.max_concurrent_calls, config.max_calls_per_agent, per_group,
                               access.groups_of)
        self._procs: set = set()
        self._procs_lock = threading.Lock()
        self._running = 0
        self.stopping = False
        self.jail, self.no_code_reason = self._jail()
        self.store = store
        self._sync()

    def _jail(self) -> tuple[Jail | None, str]:
        """The jail if it holds; else None, and why code cannot run (empty when the operator allowed it)."""
        jail = Jail()
        problem = sandbox.self_test(jail)
        if problem is None:
            log.info("tool jail: bubblewrap, interpreter %s%s", jail.python,
                     ", as uid nobody" if jail.drop_to_nobody else "")
            return jail, ""
        if self.config.unsafe_no_jail:
            log.warning("tool jail does not work here (%s); tools.unsafe_no_jail = true: tool code runs WITHOUT "
                        "a jail and can read the kernel's files", problem)
            return None, ""
        log.error("tool jail does not work here (%s): the python tool and registered tools are disabled "
                  "(install bubblewrap, or set tools.unsafe_no_jail = true on a single-user machine)", problem)
        return None, f"tool code cannot run on this kernel: no working jail ({problem})"

    def _sync(self) -> None:
        """The registered tools as the store holds them, when it changed (another node, another process): the
        kernel's own tools stay, and a tool whose registration did not change stays the same object (its
        running calls' concurrency is counted on it)."""
        if self.store is None or not self.store.changed():
            return
        kept = {k: t for k, t in self.tools.items() if t.kernels_own}
        for t in self.store.load():
            if t.key in kept:
                continue                           # a mounted tool took the name here first
            old = self.tools.get(t.key)
            kept[t.key] = old if old is not None and spec_of(old) == spec_of(t) else t
        self.tools = kept

    async def in_pool(self, fn, *args):
        """Run blocking tool work on the tools' own threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def register(self, principal, spec: ToolSpec) -> Tool:
        from jsonschema import Draft202012Validator, SchemaError

        self._sync()
        owner = principal.agent_id
        if not NAME_RE.match(spec.name):
            raise StatusError("INVALID_ARGUMENT", "tool names are 1-64 characters of a-z, 0-9 and '_'")
        public = self.tools.get(spec.name)        # only public names can clash: they are public knowledge
        if public is not None and public.owner != owner:
            raise StatusError("ALREADY_EXISTS", f"'{spec.name}' is the name of a public tool")
        if not spec.code.strip():
            raise StatusError("INVALID_ARGUMENT", "a registered tool needs code (Python, run in the jail)")
        if self.no_code_reason:
            raise StatusError("FAILED_PRECONDITION", self.no_code_reason)
        try:
            compile(spec.code, f"<tool {spec.name}>", "exec")
        except SyntaxError as e:
            raise StatusError("INVALID_ARGUMENT", f"the tool's code does not compile: line {e.lineno}: {e.msg}") \
                from None
        except ValueError as e:                   # e.g. a NUL byte in the source
            raise StatusError("INVALID_ARGUMENT", f"the tool's code does not compile: {e}") from None
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
            min(spec.timeout_s or 10.0, self.config.max_wall_s),
            min(spec.max_concurrency or 4, 64),
            min(spec.cpu_s or 5.0, 120.0),
            min(spec.memory_mb or 256, 4096),
            spec.public or principal.operator,
        )
        other = spec.name if not tool.public else f"{owner}/{spec.name}"    # its other version
        if self.store is not None and not self.store.put(tool, other):
            raise StatusError("ALREADY_EXISTS", f"'{spec.name}' is the name of a public tool")
        self.tools.pop(other, None)
        self.tools[tool.key] = tool
        return tool

    def unregister(self, principal, name: str) -> Tool:
        """Remove a registered tool: the caller's own (its private one first, as calls resolve names), or any
        registered tool by its key for an operator. The kernel's own tools stay."""
        self._sync()
        key = name if principal.operator or "/" in name else (
            f"{principal.agent_id}/{name}" if f"{principal.agent_id}/{name}" in self.tools else name)
        tool = self.tools.get(key)
        if tool is None or not (principal.operator or tool.owner == principal.agent_id):
            raise StatusError("NOT_FOUND", f"no tool '{name[:130]}' registered by this agent")
        if tool.kernels_own:
            raise StatusError("FAILED_PRECONDITION", f"'{name[:64]}' is the kernel's own tool "
                              f"({tool.source or 'builtin'}): it cannot be removed")
        if self.store is not None:
            self.store.delete(key)
        self.tools.pop(key, None)
        return tool

    # -- mounted MCP servers ([[tools.mcp]]) --------------------------------------------------------------------
    def mount(self, source: str, tools: list[Tool]) -> None:
        """Replace the tools `source` provides (a mounted MCP server's, after each (re)start)."""
        kept = {k: t for k, t in self.tools.items() if t.source != source}
        for t in tools:
            if t.key in kept:
                log.warning("%s: tool '%s' clashes with an existing tool and is not mounted", source, t.name)
                continue
            t.source = source
            kept[t.key] = t
        self.tools = kept

    async def start_mounts(self) -> None:
        """Supervise the configured MCP servers (in the kernel's event loop)."""
        from .mcp_mounts import McpMount

        self.mounts = [McpMount(c, self) for c in self.config.mcp]
        self._mount_tasks = [asyncio.create_task(m.run(), name=f"mcp-{m.config.name}") for m in self.mounts]

    async def stop_mounts(self) -> None:
        for t in getattr(self, "_mount_tasks", []):
            t.cancel()
        await asyncio.gather(*getattr(self, "_mount_tasks", []), return_exceptions=True)

    def visible(self, principal) -> list[Tool]:
        """Public tools, the caller's own, and private tools it has been granted (operators: all)."""
        self._sync()
        return [t for t in self.tools.values() if t.public or t.owner == principal.agent_id
                or self.access.decide_named(principal, "tool", t.key)[0]]

    def owner(self, key: str) -> tuple[str, bool]:
        """For access control: a tool's owner and whether it is private ("owner/name" names a private tool
        of that owner, registered or not; unknown plain names: the kernel's, public)."""
        self._sync()
        tool = self.tools.get(key)
        if tool is not None:
            return tool.owner, not tool.public
        return (key.split("/", 1)[0], True) if "/" in key else ("kernel", False)

    def resolve(self, principal, name: str) -> Tool:
        """The tool `principal` means by `name`: its own private one, else the public one; "owner/name": a
        private tool granted to it. NOT_FOUND for anything else, whether or not it exists."""
        self._sync()
        tool = (self.tools.get(name) if "/" in name
                else self.tools.get(f"{principal.agent_id}/{name}") or self.tools.get(name))
        if tool is not None:
            try:
                self.access.authorize_tool(principal, tool.key)   # audited; private tools need a grant
                return tool
            except StatusError as e:
                if e.code != "PERMISSION_DENIED":
                    raise
        raise StatusError("NOT_FOUND", f"no tool '{name[:130]}' that this agent may call")

    async def call(self, principal, name: str, args_json: str) -> Call:
        from jsonschema import Draft202012Validator

        tool = self.resolve(principal, name)
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
        call = Call(uuid.uuid4().hex[:16], tool.key, principal, args)
        if tool.irreversible:  # kept until decided and collected; immediate calls are never stored
            mine = sum(1 for c in self.calls.values() if c.state == "pending" and c.agent_id == principal.agent_id)
            if mine >= self.config.max_pending_per_agent:     # 300 of one agent once waited for an operator
                raise StatusError("RESOURCE_EXHAUSTED", f"'{principal.agent_id}' has {mine} irreversible calls "
                                  "waiting for an operator (tools.max_pending_per_agent)", self.confirm_timeout_s)
            self._prune()
            self.calls[call.call_id] = call
            asyncio.get_running_loop().call_later(self.confirm_timeout_s, self._expire, call.call_id)
            return call
        await self._run(tool, principal, call)
        return call

    async def call_and_wait(self, principal, name: str, args_json: str) -> Call:
        """A call for a client that cannot come back for the result (MCP, AIOS): an irreversible one is waited
        on until an operator decides or the confirmation timeout denies it."""
        call = await self.call(principal, name, args_json)
        if call.state == "pending":
            call = await self.wait(principal, call.call_id, self.confirm_timeout_s + 1)
        return call

    def _prune(self, keep: int = 10_000) -> None:
        if len(self.calls) >= keep:
            for cid in [c.call_id for c in self.calls.values() if c.state != "pending"][: len(self.calls) // 2]:
                del self.calls[cid]

    async def _run(self, tool: Tool, principal, call: Call) -> None:
        if self.stopping:
            raise StatusError("UNAVAILABLE", "the kernel is shutting down")
        if tool.builtin is None and self.no_code_reason:
            raise StatusError("FAILED_PRECONDITION", self.no_code_reason)
        if tool.semaphore is None:
            tool.semaphore = asyncio.Semaphore(tool.max_concurrency)
        t0 = time.monotonic()
        groups = await self.slots.acquire(principal.agent_id)
        self._running += 1
        try:
            async with tool.semaphore:
                if tool.builtin is not None:
                    call.result = await asyncio.wait_for(tool.builtin(self, principal, call.args), tool.timeout_s)
                    call.state = "done"
                else:
                    limits = Limits(cpu_s=tool.cpu_s, memory_mb=tool.memory_mb,
                                    wall_s=min(tool.timeout_s, self.config.max_wall_s),
                                    processes=self.config.max_processes)
                    out = await self.in_pool(sandbox.run_python, tool.code, call.args, limits, self.jail,
                                             self._started)
                    call.state, call.result, call.error = ("done" if out.ok else "error"), out.result, out.error
        except asyncio.TimeoutError:
            call.state, call.error = "error", f"timed out after {tool.timeout_s:g} s"
        finally:
            self._running -= 1
            self.slots.release(principal.agent_id, groups)
        call.duration_ms = (time.monotonic() - t0) * 1e3
        call.decided.set()
        self.log.append(call)

    def _started(self, proc) -> None:
        with self._procs_lock:
            self._procs = {p for p in self._procs if p.poll() is None} | {proc}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def drain(self, deadline: float) -> None:
        """Refuse new calls, let running ones finish until `deadline` (monotonic), then kill their jails."""
        self.stopping = True
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._procs_lock:
            procs = list(self._procs)
        for p in procs:
            sandbox.kill(p)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _pending(self, call_id: str) -> Call:
        call = self.calls.get(call_id)
        if call is None:
            raise StatusError("NOT_FOUND", f"no tool call '{call_id[:32]}'")
        return call

    async def confirm(self, call_id: str) -> Call:
        call = self._pending(call_id)
        if call.state != "pending":
            raise StatusError("FAILED_PRECONDITION", f"call '{call_id}' is already {call.state}")
        self._sync()
        tool = self.tools.get(call.tool)
        if tool is None:
            raise StatusError("FAILED_PRECONDITION", f"tool '{call.tool}' is no longer registered")
        call.state = "running"
        await self._run(tool, call.principal, call)
        return call

    def deny(self, call_id: str, reason: str = "denied by an operator") -> Call:
        call = self._pending(call_id)
        if call.state != "pending":
            raise StatusError("FAILED_PRECONDITION", f"call '{call_id}' is already {call.state}")
        call.state, call.error = "denied", reason
        call.decided.set()
        self.log.append(call)
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
