"""The kernel's tool loop as a syscall (`tool_execution="kernel"`): the kernel tools a request names are
offered to the model under names it can write; then generate, run the calls the model made to kernel tools
(as the agent: access checks, the jail, confirmation), append their results, generate again, one scheduling
decision per round, until the model answers without calls, calls a tool of the client's, or the rounds run
out."""
from __future__ import annotations

import json
import re
import time
from dataclasses import replace

from kernos.abi.errors import StatusError, invalid, unavailable
from kernos.abi.trace import TraceRecord

from ..generation import Generation, Reply, ToolRun


class ToolLoop:
    def __init__(self, tools, traces, limits):
        self.tools = tools                       # the tool manager (None: this kernel runs no tools)
        self.traces = traces
        self.limits = limits

    async def offer(self, principal, g: Generation) -> tuple[Generation, dict[str, str]]:
        """Add the kernel tools a request names to its tools, under names a model can write; the map from
        those names to the tools' own ("owner/name" for one granted)."""
        if self.tools is None:
            raise unavailable("this kernel runs no tools")
        if len(g.kernel_tools) > 64:
            raise invalid("kernel_tools: at most 64")
        names, defs = {}, []
        taken = {t["name"] for t in g.tools}
        for i, key in enumerate(g.kernel_tools):
            try:
                tool = self.tools.resolve(principal, key)
            except StatusError as e:
                raise invalid(f"kernel_tools[{i}]: {e.message}") from None
            name = re.sub(r"[^A-Za-z0-9_-]", "_", tool.name_for(principal))[:64]
            if name in taken:
                raise invalid(f"kernel_tools[{i}]: the name '{name}' is taken by another tool of the request")
            taken.add(name)
            names[name] = key
            defs.append({"name": name, "description": tool.description, "parameters_json": json.dumps(tool.schema)})
        if g.tool_execution == "kernel" and not names:
            raise invalid("tool_execution 'kernel' needs kernel_tools: the tools the kernel may run")
        if g.tool_execution == "kernel" and g.context_id:
            raise invalid("tool_execution 'kernel' does not take a context_id yet: send the messages")
        return replace(g, tools=g.tools + defs), names

    async def run(self, principal, g: Generation, names: dict[str, str], run_once):
        """The tool loop as a syscall: generate; run the calls the model made to kernel tools (as the agent:
        access checks, the jail, confirmation); append their results; generate again, one scheduling decision
        per round, until the model answers without calls, calls a tool of the client's, or the rounds run out."""
        lim = self.limits
        rounds = g.max_tool_rounds or lim.default_tool_rounds
        if rounds > lim.max_tool_rounds:
            raise invalid(f"max_tool_rounds is {rounds}; the kernel's cap is {lim.max_tool_rounds}")
        messages, runs, prompt_tokens, completion_tokens = list(g.messages), [], 0, 0
        for round_ in range(rounds + 1):
            reply = None
            async for ev in run_once(principal, replace(g, messages=messages)):
                if isinstance(ev, Reply):
                    reply = ev
                else:
                    yield ev
            prompt_tokens += reply.prompt_tokens
            completion_tokens += reply.completion_tokens
            mine = [c for c in reply.tool_calls if c["name"] in names]
            if not mine or len(mine) < len(reply.tool_calls) or round_ == rounds:
                yield replace(reply, tool_runs=runs, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
                return
            messages.append({"role": "assistant", "content": reply.text, "tool_calls": reply.tool_calls})
            for c in mine:
                run = await self._call(principal, names[c["name"]], c)
                runs.append(run)
                yield run
                content = json.dumps(run.result) if run.state == "done" else f"error: {run.error}"
                messages.append({"role": "tool", "content": content, "tool_call_id": c["id"], "name": c["name"]})
            if g.tool_choice not in ("", "auto", "none"):
                g = replace(g, tool_choice="auto")       # a forced call is made; now the model may answer

    async def _call(self, principal, key: str, c: dict) -> ToolRun:
        """One call through the tool syscall's use case, traced as the agent's 'tools.call'."""
        t0 = time.monotonic()
        try:
            call = await self.tools.call(principal, key, c["arguments"])
            if call.state == "pending":                  # irreversible: an operator decides (or the timeout)
                call = await self.tools.wait(principal, call.call_id, self.tools.confirm_timeout_s + 5)
            run = ToolRun(c, call.state, call.result, call.error, call.duration_ms)
        except StatusError as e:                          # bad arguments, limits: the model gets the error
            run = ToolRun(c, "error", None, f"{e.code}: {e.message}", (time.monotonic() - t0) * 1e3)
        self.traces.record(TraceRecord(principal.agent_id, "tools.call", "OK" if run.state == "done" else "ERROR",
                                       {"name": key, "args_json": c["arguments"], "cause": "llm.tool_loop"},
                                       {"state": run.state, "result": run.result, "error": run.error},
                                       {"syscall_ms": run.duration_ms}))
        return run
