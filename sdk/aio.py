"""The asyncio twin of `kernos.sdk`: same names, awaitable calls, async iteration for streams.

    async with await kernos.sdk.aio.connect(address, agent="planner") as s:
        reply = await s.llm.chat("Plan a trip")
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kernos.proto.v1 import (access_pb2, access_pb2_grpc, kernel_pb2, kernel_pb2_grpc, llm_pb2, llm_pb2_grpc, memory_pb2, memory_pb2_grpc,
                             storage_pb2, storage_pb2_grpc, tuner_pb2, tuner_pb2_grpc)

from ._wire import (CHANNEL_OPTIONS, auth_metadata, build_dataset_request, edit_block_request, feedback_request,
                    finetune_request, generate_request, memory_items, resolve_address, tls_credentials)
from .errors import Unavailable, from_rpc_error
from .types import (AdapterInfo, AgentInfo, JobInfo, Chunk, Completion, ContextBlock, ContextInfo, FileHit, FileInfo, GrantInfo, MemoryItem, Messages,
                    ModelInfo)


async def _call(fn, request, metadata, timeout=None):
    try:
        return await fn(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


class LLM:
    def __init__(self, session: "Session"):
        self._s = session
        self._stub = llm_pb2_grpc.LLMStub(session.channel)

    async def chat(self, messages: Messages, *, timeout: float | None = None, **sampling) -> Completion:
        """See `kernos.sdk.client.LLM.chat`."""
        req = generate_request(messages, **sampling)
        return Completion.from_proto(await _call(self._stub.Generate, req, self._s.metadata, timeout))

    async def complete(self, prompt: str, *, timeout: float | None = None, **sampling) -> Completion:
        req = generate_request(prompt=prompt, **sampling)
        return Completion.from_proto(await _call(self._stub.Generate, req, self._s.metadata, timeout))

    async def stream(self, messages: Messages | None = None, *, prompt: str | None = None,
                     timeout: float | None = None, **sampling) -> AsyncIterator[Chunk]:
        req = generate_request(messages, prompt, **sampling)
        call = self._stub.GenerateStream(req, metadata=self._s.metadata, timeout=timeout)
        try:
            async for c in call:
                yield Chunk.from_proto(c)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def suspend(self, request_id: str) -> str:
        """See `kernos.sdk.client.LLM.suspend`."""
        return (await _call(self._stub.Suspend, llm_pb2.SuspendRequest(request_id=request_id),
                            self._s.metadata)).state

    async def resume(self, request_id: str) -> str:
        return (await _call(self._stub.Resume, llm_pb2.ResumeRequest(request_id=request_id), self._s.metadata)).state

    async def snapshot(self, request_id: str) -> str:
        """See `kernos.sdk.client.LLM.snapshot`."""
        return (await _call(self._stub.Snapshot, llm_pb2.SnapshotRequest(request_id=request_id),
                            self._s.metadata)).snapshot_id

    async def restore(self, snapshot_id: str, *, timeout: float | None = None) -> AsyncIterator[Chunk]:
        call = self._stub.Restore(llm_pb2.RestoreRequest(snapshot_id=snapshot_id), metadata=self._s.metadata,
                                  timeout=timeout)
        try:
            async for c in call:
                yield Chunk.from_proto(c)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def models(self) -> list[ModelInfo]:
        reply = await _call(self._stub.ListModels, llm_pb2.ListModelsRequest(), self._s.metadata)
        return [ModelInfo(name=m.name, architecture=m.architecture, device=m.device, adapters=list(m.adapters),
                          context_length=m.context_length, is_default=m.is_default) for m in reply.models]


class Storage:
    """See `kernos.sdk.client.Storage`."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = storage_pb2_grpc.StorageStub(session.channel)

    async def write(self, path: str, data: bytes | str, metadata: dict[str, str] | None = None,
                    index: bool = False, owner: str = "") -> FileInfo:
        data = data.encode() if isinstance(data, str) else data
        return FileInfo.from_proto(await _call(self._stub.Write, storage_pb2.WriteRequest(
            path=path, data=data, metadata=metadata or {}, index=index, owner=owner), self._s.metadata))

    async def search(self, query: str, k: int = 5, owner: str = "") -> list[FileHit]:
        reply = await _call(self._stub.Search, storage_pb2.SearchFilesRequest(query=query, k=k, owner=owner),
                            self._s.metadata)
        return [FileHit(path=h.path, version=h.version, snippet=h.snippet, distance=h.distance) for h in reply.hits]

    async def read(self, path: str, version: int = 0, owner: str = "") -> bytes:
        return (await _call(self._stub.Read, storage_pb2.ReadRequest(path=path, version=version, owner=owner),
                            self._s.metadata)).data

    async def stat(self, path: str, version: int = 0) -> FileInfo:
        return FileInfo.from_proto(await _call(self._stub.Stat, storage_pb2.StatRequest(path=path, version=version),
                                               self._s.metadata))

    async def list(self, prefix: str = "", owner: str = "") -> list[FileInfo]:
        reply = await _call(self._stub.List, storage_pb2.ListFilesRequest(prefix=prefix, owner=owner),
                            self._s.metadata)
        return [FileInfo.from_proto(f) for f in reply.files]

    async def delete(self, path: str) -> FileInfo:
        return FileInfo.from_proto(await _call(self._stub.Delete, storage_pb2.DeleteFileRequest(path=path),
                                               self._s.metadata))

    async def history(self, path: str) -> list[FileInfo]:
        reply = await _call(self._stub.History, storage_pb2.HistoryRequest(path=path), self._s.metadata)
        return [FileInfo.from_proto(f) for f in reply.files]

    async def rollback(self, path: str, version: int) -> FileInfo:
        return FileInfo.from_proto(await _call(self._stub.Rollback, storage_pb2.RollbackRequest(
            path=path, version=version), self._s.metadata))


class Memory:
    """Long-term vector memory and working contexts (`session.memory`); see `kernos.sdk.client.Memory`."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = memory_pb2_grpc.MemoryStub(session.channel)

    async def _c(self, fn, req):
        return await _call(fn, req, self._s.metadata)

    async def add(self, texts: str | list[str], metadata: dict | list[dict] | None = None,
                  ids: list[str] | None = None, namespace: str = "") -> list[str]:
        r = await self._c(self._stub.Add, memory_pb2.AddMemoryRequest(items=memory_items(texts, metadata, ids),
                                                                       namespace=namespace))
        return list(r.ids)

    async def search(self, query: str, k: int = 5, where: dict[str, str] | None = None,
                     namespace: str = "") -> list[MemoryItem]:
        r = await self._c(self._stub.Search, memory_pb2.SearchMemoryRequest(query=query, k=k, where=where or {},
                                                                             namespace=namespace))
        return [MemoryItem.from_proto(h.item, h.distance) for h in r.hits]

    async def get(self, ids: list[str], namespace: str = "") -> list[MemoryItem]:
        r = await self._c(self._stub.Get, memory_pb2.GetMemoryRequest(ids=ids, namespace=namespace))
        return [MemoryItem.from_proto(m) for m in r.items]

    async def update(self, id: str, text: str | None = None, metadata: dict[str, str] | None = None) -> MemoryItem:
        r = await self._c(self._stub.Update, memory_pb2.UpdateMemoryRequest(
            id=id, text=text or "", metadata=metadata or {}, replace_metadata=metadata is not None))
        return MemoryItem.from_proto(r)

    async def delete(self, ids: list[str]) -> int:
        return (await self._c(self._stub.Delete, memory_pb2.DeleteMemoryRequest(ids=ids))).deleted

    async def create_context(self, context_id: str, budget_tokens: int = 0, summarize: bool = False,
                             system: str = "", model: str | None = None) -> ContextInfo:
        r = await self._c(self._stub.CreateContext, memory_pb2.CreateContextRequest(
            context_id=context_id, budget_tokens=budget_tokens, summarize=summarize, system=system, model=model or ""))
        return ContextInfo.from_proto(r)

    async def contexts(self) -> list[ContextInfo]:
        r = await self._c(self._stub.ListContexts, memory_pb2.ListContextsRequest())
        return [ContextInfo.from_proto(c) for c in r.contexts]

    async def delete_context(self, context_id: str) -> ContextInfo:
        return ContextInfo.from_proto(await self._c(self._stub.DeleteContext, memory_pb2.ContextRef(context_id=context_id)))

    async def blocks(self, context_id: str) -> tuple[list[ContextBlock], int]:
        r = await self._c(self._stub.ListBlocks, memory_pb2.ContextRef(context_id=context_id))
        return [ContextBlock.from_proto(b) for b in r.blocks], r.tokens

    async def add_block(self, context_id: str, content: str, role: str = "system", pinned: bool = True,
                        label: str = "") -> ContextBlock:
        return ContextBlock.from_proto(await self._c(self._stub.AddBlock, memory_pb2.AddBlockRequest(
            context_id=context_id, role=role, content=content, pinned=pinned, label=label)))

    async def edit_block(self, context_id: str, block_id: str, content: str | None = None,
                         pinned: bool | None = None) -> ContextBlock:
        return ContextBlock.from_proto(await self._c(self._stub.EditBlock,
                                                     edit_block_request(context_id, block_id, content, pinned)))

    async def delete_block(self, context_id: str, block_id: str) -> ContextBlock:
        return ContextBlock.from_proto(await self._c(self._stub.DeleteBlock, memory_pb2.BlockRef(
            context_id=context_id, block_id=block_id)))


class Access:
    """Access control (`session.access`); see `kernos.sdk.client.Access`."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = access_pb2_grpc.AccessStub(session.channel)

    async def _c(self, fn, req):
        return await _call(fn, req, self._s.metadata)

    async def grant(self, grantee: str, kind: str, permission: str = "read", resource: str = "", owner: str = "",
                    ttl_s: float = 0) -> GrantInfo:
        r = await self._c(self._stub.Grant, access_pb2.GrantRequest(
            grantee=grantee, kind=kind, owner=owner, resource=resource, permission=permission, ttl_s=ttl_s))
        return GrantInfo.from_proto(r)

    async def revoke(self, grant_id: str) -> GrantInfo:
        return GrantInfo.from_proto(await self._c(self._stub.Revoke, access_pb2.RevokeRequest(grant_id=grant_id)))

    async def grants(self, include_revoked: bool = False) -> list[GrantInfo]:
        r = await self._c(self._stub.ListGrants, access_pb2.ListGrantsRequest(include_revoked=include_revoked))
        return [GrantInfo.from_proto(g) for g in r.grants]

    async def create_group(self, name: str) -> list[str]:
        return list((await self._c(self._stub.CreateGroup, access_pb2.GroupRequest(name=name))).members)

    async def add_member(self, group: str, agent_id: str) -> list[str]:
        r = await self._c(self._stub.AddMember, access_pb2.MemberRequest(group=group, agent_id=agent_id))
        return list(r.members)

    async def remove_member(self, group: str, agent_id: str) -> list[str]:
        r = await self._c(self._stub.RemoveMember, access_pb2.MemberRequest(group=group, agent_id=agent_id))
        return list(r.members)

    async def groups(self) -> dict[str, list[str]]:
        r = await self._c(self._stub.ListGroups, access_pb2.ListGroupsRequest())
        return {g.name: list(g.members) for g in r.groups}

    async def capabilities(self, agent_id: str = "") -> list[str]:
        r = await self._c(self._stub.GetCapabilities, access_pb2.CapabilitiesRequest(agent_id=agent_id))
        return list(r.families)

    async def set_capabilities(self, agent_id: str, families: list[str]) -> list[str]:
        r = await self._c(self._stub.SetCapabilities, access_pb2.CapabilitiesRequest(agent_id=agent_id,
                                                                                     families=families))
        return list(r.families)

    async def create_token(self, name: str, ttl_s: float = 0) -> str:
        r = await self._c(self._stub.CreateToken, access_pb2.CreateTokenRequest(name=name, admin=True, ttl_s=ttl_s))
        return r.token

    async def revoke_token(self, name: str) -> bool:
        return (await self._c(self._stub.RevokeToken, access_pb2.RevokeTokenRequest(name=name))).revoked

    async def audit(self, principal: str = "", limit: int = 100, denied_only: bool = False) -> list[dict]:
        r = await self._c(self._stub.Audit, access_pb2.AuditRequest(principal=principal, limit=limit,
                                                                    denied_only=denied_only))
        return [{"ts": e.ts, "principal": e.principal, "method": e.method, "decision": e.decision,
                 "capability": e.capability, "reason": e.reason} for e in r.entries]


class KernelCalls:
    def __init__(self, session: "Session"):
        self._s = session
        self._stub = kernel_pb2_grpc.KernelStub(session.channel)

    async def heartbeat(self) -> float:
        return (await _call(self._stub.Heartbeat, kernel_pb2.HeartbeatRequest(), self._s.metadata)).server_time

    async def agents(self, include_exited: bool = False) -> list[AgentInfo]:
        reply = await _call(self._stub.ListAgents, kernel_pb2.ListAgentsRequest(include_exited=include_exited),
                            self._s.metadata)
        return [AgentInfo.from_proto(a) for a in reply.agents]

    async def stats(self) -> kernel_pb2.StatsReply:
        return await _call(self._stub.Stats, kernel_pb2.StatsRequest(), self._s.metadata)


class Tuner:
    """The fine-tuner (`session.tuner`); see `kernos.sdk.client.Tuner`."""

    def __init__(self, session: "Session"):
        self._s = session
        self._stub = tuner_pb2_grpc.TunerStub(session.channel)

    async def _c(self, fn, req):
        return await _call(fn, req, self._s.metadata)

    async def feedback(self, request_id: str, reward: float | None = None, success: bool | None = None,
                       note: str = "", preferred: str = "") -> int:
        return (await self._c(self._stub.Feedback, feedback_request(request_id, reward, success, note, preferred))).outcomes

    async def build_dataset(self, name: str, kind: str = "sft", min_reward: float | None = None,
                            eval_fraction: float = 0.1, *, samples: int = 0, reward_regex: str = "",
                            temperature: float = 0.0, model: str = "", max_tokens: int = 0,
                            items: list[dict] | None = None, distractors: int = 0,
                            oracle_fraction: float | None = None, seed: int = 0) -> dict:
        import json

        req = build_dataset_request(name, kind, min_reward, eval_fraction, samples, reward_regex, temperature, model,
                                    max_tokens, items, distractors, oracle_fraction, seed)
        return json.loads((await self._c(self._stub.BuildDataset, req)).card_json)

    async def finetune(self, name: str, dataset: str, model: str = "", config: dict | None = None,
                       set_default: bool = False, min_improvement: float = 0.0) -> JobInfo:
        req = finetune_request(name, dataset, model, config, set_default, min_improvement)
        return JobInfo.from_proto(await self._c(self._stub.StartFinetune, req))

    async def job(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(await self._c(self._stub.GetJob, tuner_pb2.JobRequest(job_id=job_id)))

    async def jobs(self, all_agents: bool = False) -> list[JobInfo]:
        reply = await self._c(self._stub.ListJobs, tuner_pb2.ListJobsRequest(all_agents=all_agents))
        return [JobInfo.from_proto(j) for j in reply.jobs]

    async def cancel(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(await self._c(self._stub.CancelJob, tuner_pb2.JobRequest(job_id=job_id)))

    async def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.5) -> JobInfo:
        import asyncio
        import time

        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job.done:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} at step {job.step}/{job.total_steps}")
            await asyncio.sleep(poll_s)

    async def adapters(self) -> list[AdapterInfo]:
        reply = await self._c(self._stub.ListAdapters, tuner_pb2.ListAdaptersRequest())
        return [AdapterInfo.from_proto(a) for a in reply.adapters]

    async def set_default_adapter(self, adapter: str, model: str = "") -> None:
        await self._c(self._stub.SetDefaultAdapter, tuner_pb2.DefaultAdapterRequest(model=model, adapter=adapter))


class Session:
    def __init__(self, channel: grpc.aio.Channel, agent_id: str, token: str):
        self.channel = channel
        self.agent_id = agent_id
        self.token = token
        self.metadata = auth_metadata(token)
        self.llm = LLM(self)
        self.kernel = KernelCalls(self)
        self.storage = Storage(self)
        self.memory = Memory(self)
        self.access = Access(self)
        self.tuner = Tuner(self)

    async def exit(self) -> None:
        try:
            await _call(kernel_pb2_grpc.KernelStub(self.channel).Exit, kernel_pb2.ExitRequest(), self.metadata)
        finally:
            await self.channel.close()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.exit()


async def connect(address: str | None = None, agent: str = "agent", token: str | None = None, *,
                  description: str = "", labels: dict[str, str] | None = None, timeout: float = 10.0,
                  tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None) -> Session:
    """See `kernos.sdk.connect`."""
    import asyncio

    creds = tls_credentials(tls_ca, tls_cert, tls_key)
    channel = (grpc.aio.secure_channel(resolve_address(address), creds, options=CHANNEL_OPTIONS) if creds
               else grpc.aio.insecure_channel(resolve_address(address), options=CHANNEL_OPTIONS))
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        await channel.close()
        raise Unavailable(f"no kernel answered at {resolve_address(address)} within {timeout} s") from None
    stub = kernel_pb2_grpc.KernelStub(channel)
    try:
        if token is None:
            reply = await _call(stub.Register, kernel_pb2.RegisterRequest(name=agent, description=description,
                                                                           labels=labels or {}), ())
            return Session(channel, reply.agent_id, reply.token)
        await _call(stub.Heartbeat, kernel_pb2.HeartbeatRequest(), auth_metadata(token))
        return Session(channel, agent, token)
    except BaseException:
        await channel.close()
        raise
