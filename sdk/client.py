"""The synchronous client. `connect()` registers an agent (or resumes one with its token) and returns a
`Session` whose attributes group the syscalls by service."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc

from kernos.proto.v1 import (tools_pb2, tools_pb2_grpc, tuner_pb2, tuner_pb2_grpc, access_pb2, access_pb2_grpc, kernel_pb2, kernel_pb2_grpc, llm_pb2, llm_pb2_grpc, memory_pb2, memory_pb2_grpc,
                             storage_pb2, storage_pb2_grpc)

from ._wire import (CHANNEL_OPTIONS, auth_metadata, build_dataset_request, edit_block_request, feedback_request,
                    finetune_request, generate_request, memory_items, resolve_address, tls_credentials)
from .errors import from_rpc_error
from .types import (AdapterInfo, AgentInfo, JobInfo, Chunk, Completion, ContextBlock, ContextInfo, FileHit, FileInfo, GrantInfo, ToolResult, MemoryItem, Messages,
                    ModelInfo)


def _call(fn, request, metadata, timeout=None):
    try:
        return fn(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


def _chunks(call) -> Iterator[Chunk]:
    """A streaming call's chunks; leaving early (break, error) cancels it in the kernel."""
    try:
        for c in call:
            yield Chunk.from_proto(c)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        call.cancel()


class LLM:
    """Generation syscalls (`session.llm`)."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = llm_pb2_grpc.LLMStub(session.channel)

    def chat(self, messages: Messages, *, timeout: float | None = None, **sampling) -> Completion:
        """Generate the assistant's reply to `messages` (a string, or a list of {"role", "content"}).

        Sampling keywords: model, adapter, temperature (0 = greedy), top_p, top_k, max_tokens, stop, seed,
        priority. Raises InvalidArgument, NotFound, ResourceExhausted, ... on a rejected request."""
        req = generate_request(messages, **sampling)
        return Completion.from_proto(_call(self._stub.Generate, req, self._s.metadata, timeout))

    def complete(self, prompt: str, *, timeout: float | None = None, **sampling) -> Completion:
        """Continue a raw prompt (no chat template)."""
        req = generate_request(prompt=prompt, **sampling)
        return Completion.from_proto(_call(self._stub.Generate, req, self._s.metadata, timeout))

    def stream(self, messages: Messages | None = None, *, prompt: str | None = None, timeout: float | None = None,
               **sampling) -> Iterator[Chunk]:
        """Yield chunks of text as the kernel produces them; the last has done=True and the completion.
        Breaking out of the loop cancels the generation in the kernel."""
        req = generate_request(messages, prompt, **sampling)
        yield from _chunks(self._stub.GenerateStream(req, metadata=self._s.metadata, timeout=timeout))

    def suspend(self, request_id: str) -> str:
        """Preempt one of this agent's running generations and park it (its state kept by the kernel) until
        `resume`; its stream stays open and continues after resume. Frees the batch slot while the agent
        waits on something else (a tool, a human)."""
        return _call(self._stub.Suspend, llm_pb2.SuspendRequest(request_id=request_id), self._s.metadata).state

    def resume(self, request_id: str) -> str:
        """Make a suspended generation schedulable again."""
        return _call(self._stub.Resume, llm_pb2.ResumeRequest(request_id=request_id), self._s.metadata).state

    def snapshot(self, request_id: str) -> str:
        """Checkpoint one of this agent's generations to disk and release it; its open call ends with
        finish_reason "snapshot". Returns the snapshot id for `restore` (also after a kernel restart)."""
        return _call(self._stub.Snapshot, llm_pb2.SnapshotRequest(request_id=request_id),
                     self._s.metadata).snapshot_id

    def restore(self, snapshot_id: str, *, timeout: float | None = None) -> Iterator[Chunk]:
        """Continue a snapshotted generation; yields chunks of the new text, the last with the whole reply."""
        yield from _chunks(self._stub.Restore(llm_pb2.RestoreRequest(snapshot_id=snapshot_id),
                                              metadata=self._s.metadata, timeout=timeout))

    def models(self) -> list[ModelInfo]:
        reply = _call(self._stub.ListModels, llm_pb2.ListModelsRequest(), self._s.metadata)
        return [ModelInfo(name=m.name, architecture=m.architecture, device=m.device, adapters=list(m.adapters),
                          context_length=m.context_length, is_default=m.is_default) for m in reply.models]


class Storage:
    """The agent's durable, versioned files (`session.storage`). Every write is a new version, acknowledged
    only once on disk. Paths are relative ('notes/today.md'); '..', absolute paths and NUL are refused."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = storage_pb2_grpc.StorageStub(session.channel)

    def write(self, path: str, data: bytes | str, metadata: dict[str, str] | None = None,
              index: bool = False, owner: str = "") -> FileInfo:
        """Store a new version. `index=True` (UTF-8 text) makes its content findable by `search`.
        Every method takes `owner=` to use another agent's space where a grant allows it."""
        data = data.encode() if isinstance(data, str) else data
        return FileInfo.from_proto(_call(self._stub.Write, storage_pb2.WriteRequest(
            path=path, data=data, metadata=metadata or {}, index=index, owner=owner), self._s.metadata))

    def search(self, query: str, k: int = 5, owner: str = "") -> list[FileHit]:
        """Files written with index=True whose content best matches `query`, one hit per file."""
        reply = _call(self._stub.Search, storage_pb2.SearchFilesRequest(query=query, k=k, owner=owner),
                      self._s.metadata)
        return [FileHit(path=h.path, version=h.version, snippet=h.snippet, distance=h.distance) for h in reply.hits]

    def read(self, path: str, version: int = 0, owner: str = "") -> bytes:
        """The content of the latest version (or of `version`)."""
        return _call(self._stub.Read, storage_pb2.ReadRequest(path=path, version=version, owner=owner),
                     self._s.metadata).data

    def read_text(self, path: str, version: int = 0, owner: str = "") -> str:
        return self.read(path, version, owner).decode()

    def stat(self, path: str, version: int = 0, owner: str = "") -> FileInfo:
        return FileInfo.from_proto(_call(self._stub.Stat, storage_pb2.StatRequest(
            path=path, version=version, owner=owner), self._s.metadata))

    def list(self, prefix: str = "", owner: str = "") -> list[FileInfo]:
        reply = _call(self._stub.List, storage_pb2.ListFilesRequest(prefix=prefix, owner=owner), self._s.metadata)
        return [FileInfo.from_proto(f) for f in reply.files]

    def delete(self, path: str, owner: str = "") -> FileInfo:
        return FileInfo.from_proto(_call(self._stub.Delete, storage_pb2.DeleteFileRequest(path=path, owner=owner),
                                         self._s.metadata))

    def history(self, path: str, owner: str = "") -> list[FileInfo]:
        reply = _call(self._stub.History, storage_pb2.HistoryRequest(path=path, owner=owner), self._s.metadata)
        return [FileInfo.from_proto(f) for f in reply.files]

    def rollback(self, path: str, version: int, owner: str = "") -> FileInfo:
        """Make `version`'s content current again (as a new version)."""
        return FileInfo.from_proto(_call(self._stub.Rollback, storage_pb2.RollbackRequest(
            path=path, version=version, owner=owner), self._s.metadata))


class Memory:
    """Long-term vector memory and working contexts (`session.memory`), in the agent's own namespace."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = memory_pb2_grpc.MemoryStub(session.channel)

    def _c(self, fn, req):
        return _call(fn, req, self._s.metadata)

    def add(self, texts: str | list[str], metadata: dict | list[dict] | None = None,
            ids: list[str] | None = None, namespace: str = "") -> list[str]:
        """Embed and store texts (with string metadata); returns their ids. Every entry method takes
        `namespace=` to use another agent's namespace where a grant allows it."""
        return list(self._c(self._stub.Add, memory_pb2.AddMemoryRequest(items=memory_items(texts, metadata, ids),
                                                                         namespace=namespace)).ids)

    def search(self, query: str, k: int = 5, where: dict[str, str] | None = None,
               namespace: str = "") -> list[MemoryItem]:
        """The k nearest entries to `query`, optionally filtered by metadata equality."""
        reply = self._c(self._stub.Search, memory_pb2.SearchMemoryRequest(query=query, k=k, where=where or {},
                                                                           namespace=namespace))
        return [MemoryItem.from_proto(h.item, h.distance) for h in reply.hits]

    def get(self, ids: list[str], namespace: str = "") -> list[MemoryItem]:
        reply = self._c(self._stub.Get, memory_pb2.GetMemoryRequest(ids=ids, namespace=namespace))
        return [MemoryItem.from_proto(m) for m in reply.items]

    def update(self, id: str, text: str | None = None, metadata: dict[str, str] | None = None,
               namespace: str = "") -> MemoryItem:
        return MemoryItem.from_proto(self._c(self._stub.Update, memory_pb2.UpdateMemoryRequest(
            id=id, text=text or "", metadata=metadata or {}, replace_metadata=metadata is not None,
            namespace=namespace)))

    def delete(self, ids: list[str], namespace: str = "") -> int:
        return self._c(self._stub.Delete, memory_pb2.DeleteMemoryRequest(ids=ids, namespace=namespace)).deleted

    def create_context(self, context_id: str, budget_tokens: int = 0, summarize: bool = False, system: str = "",
                       model: str | None = None) -> ContextInfo:
        """A working context: pass `context_id=` to `llm.chat` and the kernel keeps the conversation within
        `budget_tokens` (its model's tokens), evicting old turns to long-term memory."""
        return ContextInfo.from_proto(self._c(self._stub.CreateContext, memory_pb2.CreateContextRequest(
            context_id=context_id, budget_tokens=budget_tokens, summarize=summarize, system=system, model=model or "")))

    def contexts(self) -> list[ContextInfo]:
        return [ContextInfo.from_proto(c) for c in
                self._c(self._stub.ListContexts, memory_pb2.ListContextsRequest()).contexts]

    def delete_context(self, context_id: str) -> ContextInfo:
        return ContextInfo.from_proto(self._c(self._stub.DeleteContext, memory_pb2.ContextRef(context_id=context_id)))

    def blocks(self, context_id: str) -> tuple[list[ContextBlock], int]:
        """The context's blocks in order, and the assembled prompt's size in tokens."""
        reply = self._c(self._stub.ListBlocks, memory_pb2.ContextRef(context_id=context_id))
        return [ContextBlock.from_proto(b) for b in reply.blocks], reply.tokens

    def add_block(self, context_id: str, content: str, role: str = "system", pinned: bool = True,
                  label: str = "") -> ContextBlock:
        return ContextBlock.from_proto(self._c(self._stub.AddBlock, memory_pb2.AddBlockRequest(
            context_id=context_id, role=role, content=content, pinned=pinned, label=label)))

    def edit_block(self, context_id: str, block_id: str, content: str | None = None,
                   pinned: bool | None = None) -> ContextBlock:
        return ContextBlock.from_proto(self._c(self._stub.EditBlock,
                                               edit_block_request(context_id, block_id, content, pinned)))

    def delete_block(self, context_id: str, block_id: str) -> ContextBlock:
        return ContextBlock.from_proto(self._c(self._stub.DeleteBlock, memory_pb2.BlockRef(
            context_id=context_id, block_id=block_id)))


class Access:
    """Access control (`session.access`): grant other agents or groups access to this agent's memory
    namespace or storage paths; operators (admin tokens) also manage groups, capabilities and tokens."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = access_pb2_grpc.AccessStub(session.channel)

    def _c(self, fn, req):
        return _call(fn, req, self._s.metadata)

    def grant(self, grantee: str, kind: str, permission: str = "read", resource: str = "", owner: str = "",
              ttl_s: float = 0) -> GrantInfo:
        """Let `grantee` (an agent id or "group:NAME") read or write this agent's `kind` ("memory" or
        "storage"; storage `resource` is a path prefix, "" for all). Returns the grant (revoke by id)."""
        return GrantInfo.from_proto(self._c(self._stub.Grant, access_pb2.GrantRequest(
            grantee=grantee, kind=kind, owner=owner, resource=resource, permission=permission, ttl_s=ttl_s)))

    def revoke(self, grant_id: str) -> GrantInfo:
        return GrantInfo.from_proto(self._c(self._stub.Revoke, access_pb2.RevokeRequest(grant_id=grant_id)))

    def grants(self, include_revoked: bool = False) -> list[GrantInfo]:
        reply = self._c(self._stub.ListGrants, access_pb2.ListGrantsRequest(include_revoked=include_revoked))
        return [GrantInfo.from_proto(g) for g in reply.grants]

    def create_group(self, name: str) -> list[str]:
        return list(self._c(self._stub.CreateGroup, access_pb2.GroupRequest(name=name)).members)

    def add_member(self, group: str, agent_id: str) -> list[str]:
        return list(self._c(self._stub.AddMember, access_pb2.MemberRequest(group=group, agent_id=agent_id)).members)

    def remove_member(self, group: str, agent_id: str) -> list[str]:
        return list(self._c(self._stub.RemoveMember, access_pb2.MemberRequest(group=group, agent_id=agent_id)).members)

    def groups(self) -> dict[str, list[str]]:
        return {g.name: list(g.members) for g in self._c(self._stub.ListGroups, access_pb2.ListGroupsRequest()).groups}

    def capabilities(self, agent_id: str = "") -> list[str]:
        return list(self._c(self._stub.GetCapabilities, access_pb2.CapabilitiesRequest(agent_id=agent_id)).families)

    def set_capabilities(self, agent_id: str, families: list[str]) -> list[str]:
        return list(self._c(self._stub.SetCapabilities, access_pb2.CapabilitiesRequest(
            agent_id=agent_id, families=families)).families)

    def create_token(self, name: str, ttl_s: float = 0) -> str:
        """A new operator token (shown once)."""
        return self._c(self._stub.CreateToken, access_pb2.CreateTokenRequest(name=name, admin=True, ttl_s=ttl_s)).token

    def revoke_token(self, name: str) -> bool:
        return self._c(self._stub.RevokeToken, access_pb2.RevokeTokenRequest(name=name)).revoked

    def audit(self, principal: str = "", limit: int = 100, denied_only: bool = False) -> list[dict]:
        reply = self._c(self._stub.Audit, access_pb2.AuditRequest(principal=principal, limit=limit,
                                                                  denied_only=denied_only))
        return [{"ts": e.ts, "principal": e.principal, "method": e.method, "decision": e.decision,
                 "capability": e.capability, "reason": e.reason} for e in reply.entries]


class Tools:
    """Tools (`session.tools`): call built-ins (calculator, memory_search, storage_search, python) and
    registered tools with JSON arguments; register tools whose Python code runs in the kernel's sandbox."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = tools_pb2_grpc.ToolsStub(session.channel)

    def _c(self, fn, req, timeout=None):
        return _call(fn, req, self._s.metadata, timeout)

    def call(self, name: str, **args) -> ToolResult:
        """Call a tool. An irreversible tool returns state "pending": `wait(result.call_id)` for the decision."""
        return ToolResult.from_proto(self._c(self._stub.Call, tools_pb2.ToolCallRequest(name=name,
                                                                                       args_json=json.dumps(args))))

    def wait(self, call_id: str, timeout: float = 600) -> ToolResult:
        return ToolResult.from_proto(self._c(self._stub.Wait, tools_pb2.CallRef(call_id=call_id), timeout))

    def register(self, name: str, code: str, schema: dict | None = None, description: str = "",
                 irreversible: bool = False, public: bool = False, timeout_s: float = 0, max_concurrency: int = 0,
                 cpu_s: float = 0, memory_mb: int = 0) -> dict:
        """Register a tool: `code` is Python that reads `args` and sets `result`, run in the sandbox."""
        t = self._c(self._stub.Register, tools_pb2.ToolSpec(
            name=name, code=code, schema_json=json.dumps(schema or {"type": "object"}), description=description,
            irreversible=irreversible, public=public, timeout_s=timeout_s, max_concurrency=max_concurrency,
            cpu_s=cpu_s, memory_mb=memory_mb))
        return {"name": t.name, "owner": t.owner, "irreversible": t.irreversible, "public": t.public}

    def list(self) -> list[dict]:
        return [{"name": t.name, "description": t.description, "schema": json.loads(t.schema_json),
                 "irreversible": t.irreversible, "owner": t.owner}
                for t in self._c(self._stub.List, tools_pb2.ListToolsRequest()).tools]

    def confirm(self, call_id: str) -> ToolResult:
        """Operators: run a pending irreversible call."""
        return ToolResult.from_proto(self._c(self._stub.Confirm, tools_pb2.CallRef(call_id=call_id)))

    def deny(self, call_id: str) -> ToolResult:
        return ToolResult.from_proto(self._c(self._stub.Deny, tools_pb2.CallRef(call_id=call_id)))

    def pending(self) -> list[ToolResult]:
        return [ToolResult.from_proto(c) for c in self._c(self._stub.ListPending, tools_pb2.ListPendingRequest()).calls]


class Tuner:
    """The fine-tuner (`session.tuner`): outcomes on generations, data sets, fine-tuning jobs, adapters."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = tuner_pb2_grpc.TunerStub(session.channel)

    def feedback(self, request_id: str, reward: float | None = None, success: bool | None = None,
                 note: str = "", preferred: str = "") -> int:
        """Attach an outcome to one of this agent's generations (`Completion.request_id`): a reward, a
        success flag, and/or a preferred reply (SFT learns it; with the generated one it forms a pair)."""
        req = feedback_request(request_id, reward, success, note, preferred)
        return _call(self._stub.Feedback, req, self._s.metadata).outcomes

    def build_dataset(self, name: str, kind: str = "sft", min_reward: float | None = None,
                      eval_fraction: float = 0.1, *, samples: int = 0, reward_regex: str = "",
                      temperature: float = 0.0, model: str = "", max_tokens: int = 0,
                      items: list[dict] | None = None, distractors: int = 0, oracle_fraction: float | None = None,
                      seed: int = 0) -> dict:
        """Build a data set from this agent's traces into storage (datasets/NAME.{train,eval}.jsonl and
        .card.json); returns its card. kind: "sft"; "raft" (samples, reward_regex, temperature, model,
        max_tokens); "rag" (items: [{"question", "oracle_id", "answer"}], distractors, oracle_fraction, seed)."""
        req = build_dataset_request(name, kind, min_reward, eval_fraction, samples, reward_regex, temperature, model,
                                    max_tokens, items, distractors, oracle_fraction, seed)
        return json.loads(_call(self._stub.BuildDataset, req, self._s.metadata).card_json)

    def finetune(self, name: str, dataset: str, model: str = "", config: dict | None = None,
                 set_default: bool = False, min_improvement: float = 0.0) -> JobInfo:
        """Queue a LoRA job on a data set; once trained it is published as AGENT:NAME only if it beats the
        base model on the held-out split, hot-loaded, and (set_default) used by this agent's generations."""
        req = finetune_request(name, dataset, model, config, set_default, min_improvement)
        return JobInfo.from_proto(_call(self._stub.StartFinetune, req, self._s.metadata))

    def job(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(_call(self._stub.GetJob, tuner_pb2.JobRequest(job_id=job_id), self._s.metadata))

    def jobs(self, all_agents: bool = False) -> list[JobInfo]:
        reply = _call(self._stub.ListJobs, tuner_pb2.ListJobsRequest(all_agents=all_agents), self._s.metadata)
        return [JobInfo.from_proto(j) for j in reply.jobs]

    def cancel(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(_call(self._stub.CancelJob, tuner_pb2.JobRequest(job_id=job_id), self._s.metadata))

    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.5) -> JobInfo:
        """Poll a job until it ends (published, rejected, failed or cancelled); TimeoutError past `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.done:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} at step {job.step}/{job.total_steps}")
            time.sleep(poll_s)

    def adapters(self) -> list[AdapterInfo]:
        reply = _call(self._stub.ListAdapters, tuner_pb2.ListAdaptersRequest(), self._s.metadata)
        return [AdapterInfo.from_proto(a) for a in reply.adapters]

    def set_default_adapter(self, adapter: str, model: str = "") -> None:
        """Make `adapter` the one this agent's generations on `model` use when they name none ("" clears)."""
        _call(self._stub.SetDefaultAdapter, tuner_pb2.DefaultAdapterRequest(model=model, adapter=adapter),
              self._s.metadata)


class KernelCalls:
    """Kernel service syscalls (`session.kernel`)."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = kernel_pb2_grpc.KernelStub(session.channel)

    def heartbeat(self) -> float:
        return _call(self._stub.Heartbeat, kernel_pb2.HeartbeatRequest(), self._s.metadata).server_time

    def agents(self, include_exited: bool = False) -> list[AgentInfo]:
        reply = _call(self._stub.ListAgents, kernel_pb2.ListAgentsRequest(include_exited=include_exited),
                      self._s.metadata)
        return [AgentInfo.from_proto(a) for a in reply.agents]

    def stats(self) -> kernel_pb2.StatsReply:
        """Kernel-wide statistics (the raw StatsReply message: models, requests, counters)."""
        return _call(self._stub.Stats, kernel_pb2.StatsRequest(), self._s.metadata)


class Session:
    """A registered agent's connection to the kernel. Use as a context manager to exit on leave."""

    def __init__(self, channel: grpc.Channel, agent_id: str, token: str):
        self.channel = channel
        self.agent_id = agent_id
        self.token = token
        self.metadata = auth_metadata(token)
        self.llm = LLM(self)
        self.kernel = KernelCalls(self)
        self.storage = Storage(self)
        self.memory = Memory(self)
        self.access = Access(self)
        self.tools = Tools(self)
        self.tuner = Tuner(self)

    def exit(self) -> None:
        """End the registration (revokes the token) and close the channel."""
        try:
            _call(kernel_pb2_grpc.KernelStub(self.channel).Exit, kernel_pb2.ExitRequest(), self.metadata)
        finally:
            self.channel.close()

    def close(self) -> None:
        """Close the channel but keep the registration: reconnect later with `token`."""
        self.channel.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()


def connect(address: str | None = None, agent: str = "agent", token: str | None = None, *, description: str = "",
            labels: dict[str, str] | None = None, timeout: float = 10.0, tls_ca: str | None = None,
            tls_cert: str | None = None, tls_key: str | None = None) -> Session:
    """Connect to a kernel at `address` (default: $KERNOS_ADDRESS or 127.0.0.1:7070).

    Without `token`, registers `agent` and receives a new token (`session.token`); with it, resumes that
    agent's registration. Waits up to `timeout` seconds for the kernel to be reachable.

    `address` may be "unix:/path/kernos.sock". For a TLS kernel give `tls_ca` (the CA file that signed its
    certificate) and, for mTLS, `tls_cert` / `tls_key` (this client's certificate and key files)."""
    creds = tls_credentials(tls_ca, tls_cert, tls_key)
    channel = (grpc.secure_channel(resolve_address(address), creds, options=CHANNEL_OPTIONS) if creds
               else grpc.insecure_channel(resolve_address(address), options=CHANNEL_OPTIONS))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        from .errors import Unavailable
        raise Unavailable(f"no kernel answered at {resolve_address(address)} within {timeout} s") from None
    stub = kernel_pb2_grpc.KernelStub(channel)
    try:
        if token is None:
            reply = _call(stub.Register, kernel_pb2.RegisterRequest(name=agent, description=description,
                                                                     labels=labels or {}), ())
            return Session(channel, reply.agent_id, reply.token)
        _call(stub.Heartbeat, kernel_pb2.HeartbeatRequest(), auth_metadata(token))
        return Session(channel, agent, token)
    except Exception:
        channel.close()
        raise
