"""The LLM service: validates a generation syscall once, at the boundary, then hands it to the model's
engine and relays its events (whole reply, or a stream of chunks)."""
from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import time
import uuid
from pathlib import Path

import grpc

from google.protobuf.json_format import MessageToDict

from kernos.memory.context import ContextError, plan
from kernos.proto.v1 import llm_pb2 as pb
from kernos.proto.v1 import llm_pb2_grpc as rpc
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import SyscallError, exhausted, invalid, not_found, syscall, unavailable
from .kernel import Kernel
from .llm.core import ServedModel
from .llm.types import EngineClosed, Failed, Final, Finish, GenRequest, RequestHandle, RequestTooLarge, TextDelta

ROLES = {"system", "user", "assistant"}
MAX_STOP_LEN = 256
_FINISH = {Finish.STOP: pb.FINISH_REASON_STOP, Finish.LENGTH: pb.FINISH_REASON_LENGTH,
           Finish.CANCELLED: pb.FINISH_REASON_CANCELLED, Finish.SNAPSHOT: pb.FINISH_REASON_SNAPSHOT}
SNAPSHOT_ID = re.compile(r"^[0-9a-f]{32}$")


class LLMServicer(rpc.LLMServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel
        self.live: dict[str, tuple[str, ServedModel]] = {}   # request id -> (agent id, model), while it runs

    # -- validation: the one place a request is checked -----------------------------------------------------
    def _prepare(self, request: pb.GenerateRequest, agent_id: str) -> tuple[ServedModel, GenRequest]:
        lim = self.k.config.limits
        size = request.ByteSize()
        if size > lim.max_request_bytes:
            raise exhausted(f"request is {size} bytes; the limit is {lim.max_request_bytes} (limits.max_request_bytes)")
        model = self.k.llm.get(request.model)
        if model is None:
            raise not_found(f"unknown model '{request.model}'; served models: {sorted(self.k.llm.models)}")
        if request.adapter and request.adapter not in model.adapters:
            raise not_found(f"model '{model.name}' has no adapter '{request.adapter}'; loaded: {model.adapters}")
        if request.messages and request.prompt:
            raise invalid("give either messages (chat) or prompt (raw text), not both")
        if not request.messages and not request.prompt:
            raise invalid("empty request: give messages (chat) or prompt (raw text)")
        for i, m in enumerate(request.messages):
            if m.role not in ROLES:
                raise invalid(f"messages[{i}].role must be one of {sorted(ROLES)}, got '{m.role[:32]}'")
        if request.messages and not any(m.content.strip() for m in request.messages):
            raise invalid("every message is empty")
        if request.prompt and not request.prompt.strip():
            raise invalid("prompt is empty")
        s = request.sampling
        max_tokens = s.max_tokens if s.HasField("max_tokens") else lim.default_max_tokens
        if max_tokens <= 0:
            raise invalid(f"sampling.max_tokens must be > 0, got {max_tokens}")
        if max_tokens > lim.max_tokens_cap:
            raise invalid(f"sampling.max_tokens is {max_tokens}; the kernel's cap is {lim.max_tokens_cap}")
        temperature = s.temperature if s.HasField("temperature") else lim.default_temperature
        if not math.isfinite(temperature) or not 0 <= temperature <= 10:
            raise invalid(f"sampling.temperature must be in [0, 10], got {temperature}")
        top_p = s.top_p if s.HasField("top_p") else 1.0
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise invalid(f"sampling.top_p must be in (0, 1], got {top_p}")
        if len(s.stop) > lim.max_stop_strings:
            raise invalid(f"{len(s.stop)} stop strings; the limit is {lim.max_stop_strings}")
        if any(not x or len(x) > MAX_STOP_LEN for x in s.stop):
            raise invalid(f"stop strings must be 1 to {MAX_STOP_LEN} characters")
        if request.messages and not model.chat:
            raise invalid(f"model '{model.name}' has no chat template: send a raw prompt")
        try:
            if request.messages:
                ids = model.encode_chat([{"role": m.role, "content": m.content} for m in request.messages])
            else:
                ids = model.encode_prompt(request.prompt)
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise invalid(f"cannot format the messages with the model's chat template: {e}") from None
        if not ids:
            raise invalid("the prompt encodes to no tokens")
        if len(ids) > lim.max_prompt_tokens:
            raise exhausted(f"prompt is {len(ids)} tokens; the limit is {lim.max_prompt_tokens} (limits.max_prompt_tokens)")
        if len(ids) + max_tokens > model.context_length:
            raise invalid(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context length of "
                          f"'{model.name}' ({model.context_length})")
        req = GenRequest(
            request_id=uuid.uuid4().hex, agent_id=agent_id, prompt_ids=ids, max_tokens=max_tokens,
            temperature=float(temperature), top_p=float(top_p), top_k=int(s.top_k), stop=list(s.stop),
            seed=int(s.seed) if s.HasField("seed") else None,
            adapter=request.adapter or self.k.default_adapter(agent_id, model),
            priority=int(request.priority),
        )
        return model, req

    def _reply(self, model: ServedModel, req: GenRequest, final: Final) -> pb.GenerateReply:
        return pb.GenerateReply(
            request_id=req.request_id, text=final.text, model=model.name, adapter=req.adapter or "",
            finish_reason=_FINISH[final.finish],
            usage=pb.Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
            timings=pb.Timings(queue_wait_ms=final.queue_wait_ms, time_to_first_token_ms=final.ttft_ms,
                               total_ms=final.total_ms),
            snapshot_id=final.snapshot_id,
        )

    def _trace(self, agent_id: str, request, reply: pb.GenerateReply | None, status: str, t0: float) -> None:
        self.k.traces.record(TraceRecord(
            agent_id=agent_id, kind="llm.generate", status=status,
            request=MessageToDict(request, preserving_proto_field_name=True),
            response=MessageToDict(reply, preserving_proto_field_name=True) if reply is not None else {},
            timings={"syscall_ms": (time.monotonic() - t0) * 1e3},
        ))

    @property
    def snapshots(self) -> Path:
        return self.k.config.data_dir / "snapshots"

    def _prepare_restore(self, snapshot_id: str, agent_id: str) -> tuple[ServedModel, GenRequest, Path]:
        if not SNAPSHOT_ID.match(snapshot_id):
            raise invalid("snapshot_id must be the 32 hex characters Snapshot returned")
        folder = self.snapshots / snapshot_id
        try:
            state = json.loads((folder / "state.json").read_text())
        except FileNotFoundError:
            raise not_found(f"no snapshot '{snapshot_id}'") from None
        if state["agent_id"] != agent_id:
            raise SyscallError(grpc.StatusCode.PERMISSION_DENIED, f"snapshot '{snapshot_id}' belongs to another agent")
        model = self.k.llm.get(state["model"])
        if model is None:
            raise not_found(f"snapshot '{snapshot_id}' is of model '{state['model']}', which is not served now")
        return model, model.engine.snapshot_request(folder, uuid.uuid4().hex), folder

    # -- working contexts --------------------------------------------------------------------------------
    async def _prepare_in_context(self, request, agent) -> tuple[ServedModel, GenRequest, str]:
        """Assemble the context's blocks and the new messages within its token budget (evicting the oldest
        turns to long-term memory, and rewriting the summary block when the context asks for one), record
        the new messages as turns, and prepare the request on the assembled conversation."""
        aid, cid = agent.agent_id, request.context_id
        if request.prompt:
            raise invalid("a context takes chat messages, not a raw prompt")
        if not request.messages:
            raise invalid("give the new messages to add to the context")
        for i, m in enumerate(request.messages):
            if m.role not in ROLES or not m.content.strip():
                raise invalid(f"messages[{i}]: role must be one of {sorted(ROLES)} and content non-empty")
        ctx = self.k.contexts.get(aid, cid)
        model = self.k.llm.get(ctx.model)
        if model is None:
            raise not_found(f"context '{cid}' uses model '{ctx.model}', which is not served now")
        if request.model and request.model != ctx.model:
            raise invalid(f"context '{cid}' is bound to model '{ctx.model}'")
        new = [{"role": m.role, "content": m.content} for m in request.messages]

        def count(messages):
            return len(model.encode_chat(messages))
        summarized = False
        while True:
            try:
                messages, evicted, _ = plan(self.k.contexts.blocks(aid, cid), new, count, ctx.budget_tokens)
            except ContextError:
                if await asyncio.to_thread(self._shrink_summary, aid, cid):
                    continue
                raise
            if not evicted:
                break
            await self._evict(agent, ctx, model, evicted, summarize=ctx.summarize and not summarized)
            summarized = True
        for m in new:
            await asyncio.to_thread(self.k.contexts.add_block, aid, cid, m["role"], m["content"], False, "", "turn")
        assembled = pb.GenerateRequest()
        assembled.CopyFrom(request)
        assembled.context_id = ""
        del assembled.messages[:]
        assembled.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        assembled.model = ctx.model
        model, req = self._prepare(assembled, aid)
        return model, req, cid

    def _shrink_summary(self, aid: str, cid: str) -> bool:
        """Halve the summary block (drop it when short); False when there is none to give up."""
        for b in self.k.contexts.blocks(aid, cid):
            if b.kind == "summary":
                if len(b.content) < 80:
                    self.k.contexts.delete_block(aid, cid, b.block_id)
                else:
                    self.k.contexts.edit_block(aid, cid, b.block_id, content=b.content[:len(b.content) // 2])
                return True
        return False

    async def _evict(self, agent, ctx, model: ServedModel, evicted, summarize: bool) -> None:
        texts = [f"{b.role}: {b.content}" for b in evicted]
        # Into long-term memory first, then out of the context: a crash between the two duplicates, never loses.
        await asyncio.to_thread(self.k.memory.add, agent.agent_id, texts,
                                [{"kind": "evicted_turn", "context": ctx.context_id, "role": b.role} for b in evicted])
        if summarize:
            old = next((b.content for b in self.k.contexts.blocks(agent.agent_id, ctx.context_id)
                        if b.kind == "summary"), "")
            # A summary may use at most a quarter of the budget: it must never crowd out the conversation.
            cap = max(8, min(self.k.config.memory.summary_max_tokens, ctx.budget_tokens // 4))
            summary = await self._generate_internal(model, agent, [
                {"role": "system", "content": "Summarize the conversation below in a few sentences. Keep facts, "
                                              "names, numbers and decisions."},
                {"role": "user", "content": (old + "\n" if old else "") + "\n".join(texts)}], cap)
            ids = model.encode_prompt(summary)
            if len(ids) > cap:  # decoding and re-encoding need not round-trip exactly
                summary = model.tokenizer.decode(ids[:cap])
            if summary.strip():
                await asyncio.to_thread(self.k.contexts.set_summary, agent.agent_id, ctx.context_id,
                                        "Summary of the earlier conversation: " + summary.strip())
        await asyncio.to_thread(self.k.contexts.evict, agent.agent_id, ctx.context_id, evicted)

    async def _generate_internal(self, model: ServedModel, agent, messages: list[dict], max_tokens: int) -> str:
        try:
            final = await self.k.llm.complete(model, agent.agent_id, messages, max_tokens,
                                              max_prompt_tokens=self.k.config.limits.max_prompt_tokens)
        except RuntimeError as e:
            raise SyscallError(grpc.StatusCode.INTERNAL, str(e)) from e
        self.k.agents.add_tokens(agent, final.prompt_tokens, final.completion_tokens)
        return final.text

    async def _run(self, request, context, restore: str | None = None):
        """Yield the request id (on acceptance), text deltas, then the final reply; shared by Generate,
        GenerateStream and Restore (which continues the snapshot `restore` instead of a new request)."""
        agent = current_agent()
        t0 = time.monotonic()
        if self.k.stopping:
            raise unavailable("the kernel is shutting down")
        folder = context_id = None
        try:
            if restore is not None:
                model, req, folder = self._prepare_restore(restore, agent.agent_id)
            elif request.context_id:
                model, req, context_id = await self._prepare_in_context(request, agent)
            else:
                model, req = self._prepare(request, agent.agent_id)
        except SyscallError as e:
            self._trace(agent.agent_id, request, None, e.code.name, t0)
            raise
        from .quotas import QuotaExceeded

        try:
            self.k.quotas.start_generation(agent.agent_id, len(req.prompt_ids))
        except QuotaExceeded as e:
            self._trace(agent.agent_id, request, None, "RESOURCE_EXHAUSTED", t0)
            raise SyscallError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s) from None
        completion = 0
        handle = RequestHandle(req, asyncio.get_running_loop())
        with self.k.track():
            try:
                if folder is None:
                    model.engine.submit(req, handle)
                else:
                    model.engine.restore(folder, req, handle)
                self.live[req.request_id] = (agent.agent_id, model)
            except EngineClosed as e:
                self.k.quotas.end_generation(agent.agent_id, 0)
                raise unavailable(str(e)) from None
            except RequestTooLarge as e:
                self.k.quotas.end_generation(agent.agent_id, 0)
                self._trace(agent.agent_id, request, None, "RESOURCE_EXHAUSTED", t0)
                raise exhausted(str(e)) from None
            try:
                yield req.request_id  # accepted
                async for ev in handle.events():
                    if isinstance(ev, TextDelta):
                        yield ev
                    elif isinstance(ev, Failed):
                        self._trace(agent.agent_id, request, None, "INTERNAL", t0)
                        raise SyscallError(grpc.StatusCode.INTERNAL, ev.message)
                    else:
                        completion = ev.completion_tokens
                        reply = self._reply(model, req, ev)
                        self.k.agents.add_tokens(agent, ev.prompt_tokens, ev.completion_tokens)
                        self._trace(agent.agent_id, request, reply, "OK", t0)
                        if folder is not None and ev.finish in (Finish.STOP, Finish.LENGTH):
                            shutil.rmtree(folder, ignore_errors=True)  # the snapshot is consumed
                        if context_id and ev.finish in (Finish.STOP, Finish.LENGTH) and ev.text.strip():
                            await asyncio.to_thread(self.k.contexts.add_block, agent.agent_id, context_id,
                                                    "assistant", ev.text, False, "", "turn")
                        yield reply
            except (asyncio.CancelledError, GeneratorExit):
                handle.cancel()  # the client went away: free the batch slot
                raise
            finally:
                self.live.pop(req.request_id, None)
                self.k.quotas.end_generation(agent.agent_id, completion)

    @syscall
    async def Generate(self, request, context):
        reply = None
        async for item in self._run(request, context):  # consumed to the end so the syscall is accounted
            if isinstance(item, pb.GenerateReply):
                reply = item
        return reply

    @syscall
    async def GenerateStream(self, request, context):
        async for chunk in self._stream(request, context):
            yield chunk

    @syscall
    async def Restore(self, request, context):
        async for chunk in self._stream(request, context, restore=request.snapshot_id):
            yield chunk

    async def _stream(self, request, context, restore: str | None = None):
        request_id = ""
        async for item in self._run(request, context, restore):
            if isinstance(item, str):
                request_id = item
                yield pb.GenerateChunk(request_id=request_id)
            elif isinstance(item, pb.GenerateReply):
                yield pb.GenerateChunk(request_id=request_id, tokens=item.usage.completion_tokens, done=True,
                                       reply=item)
            else:
                yield pb.GenerateChunk(request_id=request_id, text=item.text, tokens=item.tokens)

    async def _own(self, request_id: str) -> ServedModel:
        entry = self.live.get(request_id)
        if entry is None:
            raise not_found(f"no running generation '{request_id[:64]}' (finished, or never existed)")
        owner, model = entry
        if owner != current_agent().agent_id:
            raise SyscallError(grpc.StatusCode.PERMISSION_DENIED, f"generation '{request_id}' belongs to another agent")
        return model

    async def _engine_call(self, model: ServedModel, fn, request_id: str, *args):
        try:
            return await asyncio.wrap_future(fn(request_id, *args))
        except NotImplementedError:
            raise SyscallError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model '{model.name}' ({model.architecture}) cannot suspend generations") from None
        except KeyError:
            raise not_found(f"generation '{request_id}' has already finished") from None

    @syscall
    async def Suspend(self, request, context):
        model = await self._own(request.request_id)
        state = await self._engine_call(model, model.engine.suspend, request.request_id)
        self.k.traces.record(TraceRecord(current_agent().agent_id, "llm.suspend", "OK",
                                         {"request_id": request.request_id}, {"state": state}, {}))
        return pb.SuspendReply(state=state)

    @syscall
    async def Resume(self, request, context):
        model = await self._own(request.request_id)
        state = await self._engine_call(model, model.engine.resume, request.request_id)
        self.k.traces.record(TraceRecord(current_agent().agent_id, "llm.resume", "OK",
                                         {"request_id": request.request_id}, {"state": state}, {}))
        return pb.ResumeReply(state=state)

    @syscall
    async def Snapshot(self, request, context):
        model = await self._own(request.request_id)
        folder = await self._engine_call(model, model.engine.checkpoint, request.request_id,
                                         self.snapshots / request.request_id)
        self.k.traces.record(TraceRecord(current_agent().agent_id, "llm.snapshot", "OK",
                                         {"request_id": request.request_id}, {"snapshot_id": folder.name}, {}))
        return pb.SnapshotReply(snapshot_id=folder.name)

    @syscall
    async def ListModels(self, request, context):
        self.k.traces.record(TraceRecord(current_agent().agent_id, "llm.list_models", "OK", {}, {}, {}))
        return pb.ListModelsReply(models=[
            pb.ModelInfo(name=m.name, architecture=m.architecture, device=m.device, adapters=m.adapters,
                         context_length=m.context_length, is_default=(m.name == self.k.llm.default))
            for m in self.k.llm.models.values()])
