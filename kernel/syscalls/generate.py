"""The generate syscall: one use case for every generation, an agent's (Generate, GenerateStream, Restore)
or the kernel's own on an agent's behalf (context summaries, data-set sampling).

A request is validated once, here: its model and adapter are decided by access control (the adapter may
be the agent's default one), its prompt is formatted and counted, it is admitted by the agent's quota
and handed to the model's engine; events come back as they happen. Tokens are accounted to the agent
either way; agent syscalls are traced by the transport, the kernel's own generations here."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import time
import uuid
from dataclasses import replace

from kernos.abi.errors import StatusError, exhausted, invalid, not_found, unavailable
from kernos.abi.trace import TraceRecord

from ..llm.core import LLMCore, ServedModel
from ..llm.structured import output_spec
from ..llm.tool_calls import ToolCallStream
from ..llm.types import Failed, Final, Finish, GenRequest, RequestHandle, TextDelta
from .contexts import ContextAssembler
from .generation import Accepted, Choice, Generation, Reply, ToolCallDeltas, ToolRun
from .snapshots import SnapshotStore

ROLES = {"system", "user", "assistant", "tool"}
MAX_STOP_LEN = 256


async def _merged(handles: list[RequestHandle]):
    """(index, event) from several handles as they come; one handle is read directly."""
    if len(handles) == 1:
        async for ev in handles[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        async for ev in h.events():
            await queue.put((i, ev))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        ended = 0
        while ended < len(handles):
            i, ev = await queue.get()
            if isinstance(ev, (Final, Failed)):
                ended += 1
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


class Generate:
    def __init__(
        self,
        llm: LLMCore,
        limits,
        agents,
        quotas,
        access,
        adapters,
        traces,
        lifecycle,
        contexts,
        memory,
        summary_max_tokens: int,
        snapshots: SnapshotStore,
        tools=None,
        observe=None,
    ):
        self.llm = llm
        self.limits = limits
        self.agents = agents
        self.quotas = quotas
        self.access = access
        self.adapters = adapters
        self.traces = traces
        self.lifecycle = lifecycle
        self.snapshots = snapshots
        self.contexts = ContextAssembler(contexts, memory, summary_max_tokens, self.internal)
        # request id -> (agent id, model, handle), while it runs
        self.live: dict[str, tuple[str, ServedModel, RequestHandle]] = {}
        self.suspended: dict[str, set[str]] = {}            # agent id -> its suspended request ids (may be stale)
        self.tools = tools                                   # the tool manager: kernel tools for the tool loop
        self.observe = observe or (lambda *a: None)   # metrics: a finished generation's latencies

    # -- validation: the one place a request is checked -------------------------------------------------------
    def _prepare(self, g: Generation, principal) -> tuple[ServedModel, GenRequest]:
        lim = self.limits
        if g.size > lim.max_request_bytes:
            raise exhausted(
                f"request is {g.size} bytes; the limit is {lim.max_request_bytes} (limits.max_request_bytes)"
            )
        model = self.llm.get(g.model)
        if model is None:
            raise not_found(f"unknown model '{g.model}'; served models: {sorted(self.llm.models)}")
        if g.adapter and g.adapter not in model.adapters:
            raise not_found(f"model '{model.name}' has no adapter '{g.adapter}'; loaded: {model.adapters}")
        default = self.adapters.default(principal.agent_id, model.name)
        adapter = self.access.authorize_model(
            principal, model.name, g.adapter or None, default if default in model.adapters else None
        )
        if g.messages and g.prompt:
            raise invalid("give either messages (chat) or prompt (raw text), not both")
        if not g.messages and not g.prompt:
            raise invalid("empty request: give messages (chat) or prompt (raw text)")
        _check_messages(g.messages)
        output = output_spec(g.tools, _tool_choice(g), g.parallel_tool_calls, g.response_format, g.schema_json,
                             lim.max_schema_bytes, g.strict, lim.max_schema_repeats)
        if output is not None and output.tools and not g.messages:
            raise invalid("tools need the chat form (messages), not a raw prompt")
        if g.prompt and not g.prompt.strip():
            raise invalid("prompt is empty")
        max_tokens = g.max_tokens if g.max_tokens is not None else lim.default_max_tokens
        if max_tokens <= 0:
            raise invalid(f"sampling.max_tokens must be > 0, got {max_tokens}")
        if max_tokens > lim.max_tokens_cap:
            raise invalid(f"sampling.max_tokens is {max_tokens}; the kernel's cap is {lim.max_tokens_cap}")
        temperature = g.temperature if g.temperature is not None else lim.default_temperature
        if not math.isfinite(temperature) or not 0 <= temperature <= 10:
            raise invalid(f"sampling.temperature must be in [0, 10], got {temperature}")
        top_p = g.top_p if g.top_p is not None else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise invalid(f"sampling.top_p must be in (0, 1], got {top_p}")
        if len(g.stop) > lim.max_stop_strings:
            raise invalid(f"{len(g.stop)} stop strings; the limit is {lim.max_stop_strings}")
        if any(not x or len(x) > MAX_STOP_LEN for x in g.stop):
            raise invalid(f"stop strings must be 1 to {MAX_STOP_LEN} characters")
        if not 1 <= g.n <= lim.max_n:
            raise invalid(f"n must be 1 to {lim.max_n} (limits.max_n), got {g.n}")
        if g.n > 1 and (g.context_id or g.tool_execution == "kernel"):
            raise invalid("n > 1 takes neither a context_id nor tool_execution 'kernel'")
        if not 0 <= g.top_logprobs <= 20:
            raise invalid(f"top_logprobs must be 0 to 20, got {g.top_logprobs}")
        if g.top_logprobs and not g.logprobs:
            raise invalid("top_logprobs needs logprobs = true")
        if g.messages and not model.chat:
            raise invalid(f"model '{model.name}' has no chat template: send a raw prompt")
        try:
            ids = model.encode_chat(g.messages, output) if g.messages else model.encode_prompt(g.prompt)
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise invalid(f"cannot format the messages with the model's chat template: {e}") from None
        if not ids:
            raise invalid("the prompt encodes to no tokens")
        if len(ids) > lim.max_prompt_tokens:
            raise exhausted(
                f"prompt is {len(ids)} tokens; the limit is {lim.max_prompt_tokens} (limits.max_prompt_tokens)"
            )
        if len(ids) + max_tokens > model.context_length:
            raise invalid(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context length of "
                f"'{model.name}' ({model.context_length})"
            )
        return model, GenRequest(
            request_id=uuid.uuid4().hex,
            agent_id=principal.agent_id,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(g.top_k),
            stop=list(g.stop),
            seed=g.seed,
            adapter=adapter,
            priority=int(g.priority),
            output=output,
            logprobs=bool(g.logprobs),
            top_logprobs=int(g.top_logprobs),
        )

    async def _compile(self, model: ServedModel, req: GenRequest) -> None:
        """Give a structured request its own compiled grammar (off the event loop, within a time limit)."""
        if req.output is None:
            return
        limit = self.limits.grammar_compile_s
        try:
            req.matcher = await asyncio.wait_for(asyncio.to_thread(model.matcher, req.output), limit)
        except asyncio.TimeoutError:
            raise invalid(f"the requested output did not compile to a grammar within {limit:g} s "
                          "(limits.grammar_compile_s): simplify the schema") from None
        except (ValueError, RuntimeError) as e:   # llguidance's own errors on a schema it cannot take
            raise invalid(f"the requested output cannot be compiled to a grammar: {str(e)[:400]}") from None

    # -- running ------------------------------------------------------------------------------------------------
    async def run(self, principal, g: Generation):
        """Yield Accepted, then TextDelta (and ToolCallDeltas) events, then the Reply (Generate and
        GenerateStream). With kernel tools run by the kernel: that per round, with a ToolRun per call run."""
        if g.tool_execution not in ("", "client", "kernel"):
            raise invalid(f"tool_execution must be 'client' or 'kernel', got '{g.tool_execution[:32]}'")
        if g.kernel_tools or g.tool_execution == "kernel":
            g, names = await self._offer_kernel_tools(principal, g)
            if g.tool_execution == "kernel":
                async for ev in self._tool_loop(principal, g, names):
                    yield ev
                return
        async for ev in self._run_once(principal, g):
            yield ev

    async def _offer_kernel_tools(self, principal, g: Generation) -> tuple[Generation, dict[str, str]]:
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

    async def _tool_loop(self, principal, g: Generation, names: dict[str, str]):
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
            async for ev in self._run_once(principal, replace(g, messages=messages)):
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
                run = await self._run_tool(principal, names[c["name"]], c)
                runs.append(run)
                yield run
                content = json.dumps(run.result) if run.state == "done" else f"error: {run.error}"
                messages.append({"role": "tool", "content": content, "tool_call_id": c["id"], "name": c["name"]})
            if g.tool_choice not in ("", "auto", "none"):
                g = replace(g, tool_choice="auto")       # a forced call is made; now the model may answer

    async def _run_tool(self, principal, key: str, c: dict) -> ToolRun:
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

    async def _run_once(self, principal, g: Generation):
        if self.lifecycle.stopping:
            raise unavailable("the kernel is shutting down")
        context_id = g.context_id
        if context_id:  # the context's blocks plus the new messages, within its budget
            model_name, messages = await self.contexts.assemble(principal, g, self.llm)
            g = replace(g, messages=messages, model=model_name, context_id="", prompt="")
        model, req = self._prepare(g, principal)
        await self._compile(model, req)
        siblings = []
        if g.n > 1:          # the other samples: their own ids, seeds (seed + i) and grammar states
            req.group, req.group_size = req.request_id, g.n
            for i in range(1, g.n):
                r = replace(req, request_id=uuid.uuid4().hex, matcher=None,
                            seed=None if req.seed is None else (req.seed + i) % (1 << 64))
                await self._compile(model, r)
                siblings.append(r)
        async for ev in self._events(principal, model, req, model.engine.submit, refuse=True, siblings=siblings):
            if isinstance(ev, Reply) and context_id and ev.finish in (Finish.STOP, Finish.LENGTH):
                await self.contexts.record_reply(principal, context_id, ev.text)
            yield ev

    async def restore(self, principal, snapshot_id: str):
        """Continue a snapshotted generation: the same events as `run`."""
        if self.lifecycle.stopping:
            raise unavailable("the kernel is shutting down")
        folder, state = await asyncio.to_thread(self.snapshots.load, snapshot_id, principal.agent_id)
        model = self.llm.get(state["model"])
        if model is None:
            raise not_found(f"snapshot '{snapshot_id}' is of model '{state['model']}', which is not served now")
        req = await asyncio.to_thread(model.engine.snapshot_request, folder, uuid.uuid4().hex)
        # Access is decided again, as for a new request: a grant revoked since the snapshot ends its use.
        if req.adapter and req.adapter not in model.adapters:
            raise not_found(f"snapshot '{snapshot_id}' runs adapter '{req.adapter}', which model '{model.name}' "
                            "no longer serves")
        self.access.authorize_model(principal, model.name, req.adapter or None)
        await self._compile(model, req)

        async def submit(r, handle):
            await asyncio.to_thread(model.engine.restore, folder, r, handle)

        async for ev in self._events(principal, model, req, submit, refuse=True):
            if isinstance(ev, Reply) and ev.finish in (Finish.STOP, Finish.LENGTH, Finish.TOOL_CALLS):
                await asyncio.to_thread(shutil.rmtree, folder, True)  # the snapshot is consumed
            yield ev

    async def _events(self, principal, model: ServedModel, req: GenRequest, submit, refuse: bool,
                      siblings: list[GenRequest] | None = None):
        """Submit a request (and the other samples of its prompt, n > 1) and turn the engine's events into the
        use case's: Accepted; TextDelta / ToolCallDeltas tagged with their sample's index; one Reply."""
        reqs = [req] + list(siblings or [])
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(r, loop) for r in reqs]
        with self.quotas.generation(principal.agent_id, len(req.prompt_ids), refuse=refuse) as lease:
            for r, h in zip(reqs, handles):
                result = submit(r, h)
                if asyncio.iscoroutine(result):
                    await result
                self.live[r.request_id] = (principal.agent_id, model, h)
            streams = [ToolCallStream(r.output) for r in reqs]   # tool calls out of the text (else text as is)
            finals: list[Final | None] = [None] * len(reqs)
            try:
                yield Accepted(req.request_id)
                async for i, ev in _merged(handles):
                    if isinstance(ev, TextDelta):
                        text, deltas = streams[i].feed(ev.text)
                        if text:
                            yield TextDelta(text, ev.tokens, i)
                        if deltas:
                            yield ToolCallDeltas(deltas, i)
                    elif isinstance(ev, Failed):
                        raise StatusError("INTERNAL", ev.message)
                    else:
                        finals[i] = ev
                        self.observe(model.name, ev, reqs[i].request_id, principal.agent_id)
                        _, _, rest = streams[i].finish()
                        if rest:
                            yield TextDelta(rest, ev.completion_tokens, i)
                completion = sum(f.completion_tokens for f in finals)
                lease.completed(completion)
                self.agents.add_tokens(principal, finals[0].prompt_tokens, completion)
                yield self._reply(model, req, finals, streams)
            except (asyncio.CancelledError, GeneratorExit):
                for h in handles:
                    h.cancel()  # the client went away: free the batch slots
                raise
            finally:
                for r in reqs:
                    self.live.pop(r.request_id, None)

    @staticmethod
    def _reply(model: ServedModel, req: GenRequest, finals: list[Final], streams: list[ToolCallStream]) -> Reply:
        choices = []
        for i, (final, calls) in enumerate(zip(finals, streams)):
            text = "".join(calls.content) if calls.enabled else final.text
            finish = Finish.TOOL_CALLS if calls.calls and final.finish == Finish.STOP else final.finish
            logprobs = [(model.token_text(t), t, lp, [(model.token_text(a), a, b) for a, b in top])
                        for t, lp, top in final.logprobs]
            choices.append(Choice(i, text, finish, list(calls.calls), final.completion_tokens, logprobs))
        first, head = finals[0], choices[0]
        return Reply(req.request_id, head.text, model.name, req.adapter or "", head.finish, first.prompt_tokens,
                     sum(c.completion_tokens for c in choices), first.queue_wait_ms, first.ttft_ms,
                     max(f.total_ms for f in finals), first.snapshot_id, head.tool_calls, choices=choices)

    async def internal(
        self,
        principal,
        messages: list[dict],
        max_tokens: int,
        *,
        cause: str,
        model: str = "",
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Reply:
        """A generation the kernel runs for `principal` (a summary, a data-set sample): its base model, the
        newest `limits.max_prompt_tokens` of the prompt; accounted to the agent and traced as 'llm.internal'."""
        served = self.llm.get(model)
        if served is None:
            raise not_found(f"unknown model '{model}'")
        ids = served.encode_chat(messages)[-self.limits.max_prompt_tokens :]
        req = GenRequest(
            request_id=uuid.uuid4().hex,
            agent_id=principal.agent_id,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
        )
        t0 = time.monotonic()
        reply, status = None, "INTERNAL"
        try:
            async for ev in self._events(principal, served, req, served.engine.submit, refuse=False):
                if isinstance(ev, Reply):
                    reply, status = ev, "OK"
        finally:
            self.traces.record(
                TraceRecord(
                    principal.agent_id,
                    "llm.internal",
                    status,
                    {
                        "cause": cause,
                        "model": served.name,
                        "messages": messages,
                        "max_tokens": max_tokens,
                        "temperature": temperature,
                        "seed": seed,
                    },
                    {"request_id": req.request_id, "text": reply.text, "completion_tokens": reply.completion_tokens}
                    if reply
                    else {},
                    {"syscall_ms": (time.monotonic() - t0) * 1e3},
                )
            )
        if reply is None:
            raise StatusError("INTERNAL", "the engine closed the request without a result")
        return reply

    # -- an agent's control of its running generations ----------------------------------------------------------
    def _entry(self, principal, request_id: str, operators: bool = False):
        entry = self.live.get(request_id)
        if entry is None:
            raise not_found(f"no running generation '{request_id[:64]}' (finished, or never existed)")
        if entry[0] != principal.agent_id and not (operators and principal.operator):
            raise StatusError("PERMISSION_DENIED", f"generation '{request_id}' belongs to another agent")
        return entry

    def _own(self, principal, request_id: str) -> ServedModel:
        return self._entry(principal, request_id)[1]

    async def cancel(self, principal, request_id: str) -> None:
        """End a live generation (its owner's, or any for operators): it finishes as `cancelled` and its
        caller gets what was generated so far (an idle engine notices within half a second)."""
        self._entry(principal, request_id, operators=True)[2].cancel()

    async def _engine_call(self, principal, request_id: str, action: str, *args):
        model = self._own(principal, request_id)
        return await asyncio.wrap_future(getattr(model.engine, action)(request_id, *args))

    async def suspend(self, principal, request_id: str) -> str:
        """Park a live generation (its KV swapped out) until `resume`: at most limits.max_suspended_per_agent an
        agent (16 of one agent once took 3.7 GiB of swap)."""
        self._own(principal, request_id)
        mine = self.suspended.setdefault(principal.agent_id, set())
        mine.intersection_update(self.live)                      # ended ones no longer count
        cap = self.limits.max_suspended_per_agent
        if cap and request_id not in mine and len(mine) >= cap:
            raise exhausted(f"'{principal.agent_id}' keeps {len(mine)} generations suspended, its limit "
                            "(limits.max_suspended_per_agent): resume or cancel one first", 1.0)
        state = await self._engine_call(principal, request_id, "suspend")
        mine.add(request_id)
        return state

    async def resume(self, principal, request_id: str) -> str:
        _, model, handle = self._entry(principal, request_id)
        self.access.authorize_model(principal, model.name, handle.request.adapter or None)   # decided again
        state = await self._engine_call(principal, request_id, "resume")
        self.suspended.get(principal.agent_id, set()).discard(request_id)
        return state

    async def snapshot(self, principal, request_id: str) -> str:
        self._own(principal, request_id)
        await asyncio.to_thread(self.snapshots.check_room, principal.agent_id)
        folder = await self._engine_call(principal, request_id, "checkpoint", self.snapshots.folder(request_id))
        return folder.name


def _tool_choice(g: Generation) -> str:
    """`first_tool_choice` while no tool result follows the last user message, else `tool_choice`."""
    if g.first_tool_choice:
        last_user = max((i for i, m in enumerate(g.messages) if m["role"] == "user"), default=-1)
        if not any(m["role"] == "tool" for m in g.messages[last_user + 1:]):
            return g.first_tool_choice
    return g.tool_choice


def _check_messages(messages: list[dict]) -> None:
    """Roles, tool calls and the results that answer them; INVALID_ARGUMENT naming the field."""
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {sorted(ROLES)}, got '{m['role'][:32]}'")
        for j, c in enumerate(m.get("tool_calls") or ()):
            if m["role"] != "assistant":
                raise invalid(f"messages[{i}].tool_calls: only an assistant message carries tool calls")
            if not c.get("id") or not c.get("name"):
                raise invalid(f"messages[{i}].tool_calls[{j}] needs an id and a name")
            try:
                args = json.loads(c.get("arguments") or "{}")
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise invalid(f"messages[{i}].tool_calls[{j}].arguments must be a JSON object (as a string)")
            call_ids.add(c["id"])
        if m["role"] == "tool" and m.get("tool_call_id") not in call_ids:
            raise invalid(f"messages[{i}].tool_call_id '{(m.get('tool_call_id') or '')[:64]}' answers no earlier "
                          "tool call of an assistant message")
    if messages and not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise invalid("every message is empty")
