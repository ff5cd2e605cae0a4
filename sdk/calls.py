"""The SDK's call table: every syscall written once, as the RPC it calls, the request it builds and the
converter of its reply. `kernos.sdk.client` runs this table with a blocking executor and `kernos.sdk.aio`
with an asyncio one, so the two SDKs cannot drift: same methods, same signatures, same RPCs.

A method here returns a `Call` (unary RPCs), a `Call` whose converter applies to each chunk (streaming
RPCs), or is a generator of Calls and `Sleep`s that returns a result (a client-side loop such as
`tuner.wait`); the executors turn each into a blocking call or an awaitable.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kernos.proto.v1 import access_pb2, kernel_pb2, llm_pb2, memory_pb2, storage_pb2, tools_pb2, tuner_pb2

from ._wire import (
    build_dataset_request,
    edit_block_request,
    feedback_request,
    finetune_request,
    generate_request,
    memory_items,
)
from .functions import parse_reply
from .types import (
    AdapterInfo,
    AgentInfo,
    Chunk,
    Completion,
    ContextBlock,
    ContextInfo,
    FileHit,
    FileInfo,
    GrantInfo,
    JobInfo,
    MemoryItem,
    Messages,
    ModelInfo,
    ToolResult,
)


@dataclass(frozen=True)
class Call:
    service: str
    rpc: str
    request: Any
    convert: Callable[[Any], Any]
    timeout: float | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


def _same(x):
    return x


def rpc(service: str, name: str, kind: str = "unary"):
    """Mark a table method: it calls `service.name`; kind "unary", "stream" or "loop" (a generator)."""

    def mark(fn):
        fn.rpc, fn.kind = (service, name), kind
        return fn

    return mark


class CallGroup:
    """A group of calls bound to a session's executor (`session.llm`, `session.storage`, ...)."""

    def __init__(self, executor):
        self._x = executor

    @staticmethod
    def _call(service: str, name: str, request, convert: Callable = _same, timeout: float | None = None) -> Call:
        return Call(service, name, request, convert, timeout)


class LLMCalls(CallGroup):
    """Generation syscalls (`session.llm`)."""

    @rpc("LLM", "Generate")
    def chat(self, messages: Messages, *, timeout: float | None = None, **sampling) -> Completion:
        """Generate the assistant's reply to `messages` (a string, or a list of messages: {"role", "content"},
        assistant messages with "tool_calls", "tool" messages with "tool_call_id"; OpenAI's shape works).

        Sampling keywords: model, adapter, temperature (0 = greedy), top_p, top_k, max_tokens, stop, seed,
        priority, context_id, program_id (the agent program the call belongs to: its calls share accounting,
        program scheduling and KV kept through tool pauses; unset: its context's, else its conversation's);
        n (samples of the prompt, in `reply.choices`), logprobs, top_logprobs;
        frequency_penalty, presence_penalty, repetition_penalty, logit_bias ({token id: bias}), min_p,
        stop_token_ids, min_tokens, ignore_eos (OpenAI's and vLLM's meanings).
        Tools: `tools` (Python functions or OpenAI-style dicts), `tool_choice` ("auto",
        "none", "required" or a tool's name), `parallel_tool_calls`; the reply's `tool_calls` are always
        valid for their tool's schema. `kernel_tools` offers tools registered in the kernel (built-ins,
        `tools.register`ed ones); with `tool_execution="kernel"` the kernel runs the model's calls to them and
        continues, up to `max_tool_rounds` rounds (`reply.tool_runs` lists them). `response_format`:
        "json_object", OpenAI's json_schema dict, or a pydantic model class (then `reply.parsed` is one).
        Raises InvalidArgument, NotFound, ResourceExhausted, ... on a rejected request."""
        fmt = sampling.get("response_format")
        return self._call("LLM", "Generate", generate_request(messages, **sampling),
                          lambda r: parse_reply(Completion.from_proto(r), fmt), timeout)

    @rpc("LLM", "Generate")
    def complete(self, prompt: str | list[int], *, timeout: float | None = None, **sampling) -> Completion:
        """Continue a raw prompt (no chat template): its text, or its token ids."""
        return self._call("LLM", "Generate", generate_request(**_raw(prompt), **sampling), Completion.from_proto,
                          timeout)

    @rpc("LLM", "Generate")
    def score(self, prompt: str | list[int], *, top_logprobs: int = 0, timeout: float | None = None,
              **sampling) -> Completion:
        """Score a raw prompt without generating: `reply.prompt_logprobs` holds each token's log-probability
        given the tokens before it (and `top_logprobs` alternatives), `reply.prompt_logprob` their sum, from the
        model's own forward. `model` / `adapter` choose what scores it."""
        return self._call("LLM", "Generate", generate_request(
            **_raw(prompt), max_tokens=0, prompt_logprobs=True, top_logprobs=top_logprobs, **sampling),
            Completion.from_proto, timeout)

    @rpc("LLM", "GenerateStream", "stream")
    def stream(
        self, messages: Messages | None = None, *, prompt: str | None = None, timeout: float | None = None, **sampling
    ) -> Iterator[Chunk]:
        """Chunks of text as the kernel produces them; the last has done=True and the completion. Leaving the
        loop early cancels the generation in the kernel."""
        return self._call(
            "LLM", "GenerateStream", generate_request(messages, prompt, **sampling), Chunk.from_proto, timeout
        )

    @rpc("LLM", "Suspend")
    def suspend(self, request_id: str) -> str:
        """Preempt one of this agent's running generations and park it (its state kept by the kernel) until
        `resume`; its stream stays open and continues after resume. Frees the batch slot while the agent
        waits on something else (a tool, a human)."""
        return self._call("LLM", "Suspend", llm_pb2.SuspendRequest(request_id=request_id), lambda r: r.state)

    @rpc("LLM", "Resume")
    def resume(self, request_id: str) -> str:
        """Make a suspended generation schedulable again."""
        return self._call("LLM", "Resume", llm_pb2.ResumeRequest(request_id=request_id), lambda r: r.state)

    @rpc("LLM", "Snapshot")
    def snapshot(self, request_id: str) -> str:
        """Checkpoint one of this agent's generations to disk and release it; its open call ends with
        finish_reason "snapshot". Returns the snapshot id for `restore` (also after a kernel restart)."""
        return self._call("LLM", "Snapshot", llm_pb2.SnapshotRequest(request_id=request_id), lambda r: r.snapshot_id)

    @rpc("LLM", "Restore", "stream")
    def restore(self, snapshot_id: str, *, timeout: float | None = None) -> Iterator[Chunk]:
        """Continue a snapshotted generation; chunks of the new text, the last with the whole reply."""
        return self._call("LLM", "Restore", llm_pb2.RestoreRequest(snapshot_id=snapshot_id), Chunk.from_proto, timeout)

    @rpc("LLM", "ListModels")
    def models(self) -> list[ModelInfo]:
        return self._call(
            "LLM",
            "ListModels",
            llm_pb2.ListModelsRequest(),
            lambda r: [
                ModelInfo(
                    name=m.name,
                    architecture=m.architecture,
                    device=m.device,
                    adapters=list(m.adapters),
                    context_length=m.context_length,
                    is_default=m.is_default,
                )
                for m in r.models
            ],
        )


def _files(reply) -> list[FileInfo]:
    return [FileInfo.from_proto(f) for f in reply.files]


class StorageCalls(CallGroup):
    """The agent's durable, versioned files (`session.storage`). Every write is a new version, acknowledged
    only once on disk. Paths are relative ('notes/today.md'); '..', absolute paths and NUL are refused.
    Every method takes `owner=` to use another agent's space where a grant allows it."""

    @rpc("Storage", "Write")
    def write(
        self, path: str, data: bytes | str, metadata: dict[str, str] | None = None, index: bool = False, owner: str = ""
    ) -> FileInfo:
        """Store a new version. `index=True` (UTF-8 text) makes its content findable by `search`."""
        data = data.encode() if isinstance(data, str) else data
        return self._call(
            "Storage",
            "Write",
            storage_pb2.WriteRequest(path=path, data=data, metadata=metadata or {}, index=index, owner=owner),
            FileInfo.from_proto,
        )

    @rpc("Storage", "Search")
    def search(self, query: str, k: int = 5, owner: str = "") -> list[FileHit]:
        """Files written with index=True whose content best matches `query`, one hit per file."""
        return self._call(
            "Storage",
            "Search",
            storage_pb2.SearchFilesRequest(query=query, k=k, owner=owner),
            lambda r: [FileHit(path=h.path, version=h.version, snippet=h.snippet, distance=h.distance) for h in r.hits],
        )

    @rpc("Storage", "Read")
    def read(self, path: str, version: int = 0, owner: str = "") -> bytes:
        """The content of the latest version (or of `version`)."""
        return self._call(
            "Storage", "Read", storage_pb2.ReadRequest(path=path, version=version, owner=owner), lambda r: r.data
        )

    @rpc("Storage", "Read")
    def read_text(self, path: str, version: int = 0, owner: str = "") -> str:
        return self._call(
            "Storage",
            "Read",
            storage_pb2.ReadRequest(path=path, version=version, owner=owner),
            lambda r: r.data.decode(),
        )

    @rpc("Storage", "Stat")
    def stat(self, path: str, version: int = 0, owner: str = "") -> FileInfo:
        return self._call(
            "Storage", "Stat", storage_pb2.StatRequest(path=path, version=version, owner=owner), FileInfo.from_proto
        )

    @rpc("Storage", "List")
    def list(self, prefix: str = "", owner: str = "") -> list[FileInfo]:
        return self._call("Storage", "List", storage_pb2.ListFilesRequest(prefix=prefix, owner=owner), _files)

    @rpc("Storage", "Delete")
    def delete(self, path: str, owner: str = "") -> FileInfo:
        return self._call(
            "Storage", "Delete", storage_pb2.DeleteFileRequest(path=path, owner=owner), FileInfo.from_proto
        )

    @rpc("Storage", "History")
    def history(self, path: str, owner: str = "") -> list[FileInfo]:
        return self._call("Storage", "History", storage_pb2.HistoryRequest(path=path, owner=owner), _files)

    @rpc("Storage", "Rollback")
    def rollback(self, path: str, version: int, owner: str = "") -> FileInfo:
        """Make `version`'s content current again (as a new version)."""
        return self._call(
            "Storage",
            "Rollback",
            storage_pb2.RollbackRequest(path=path, version=version, owner=owner),
            FileInfo.from_proto,
        )


class MemoryCalls(CallGroup):
    """Long-term vector memory and working contexts (`session.memory`), in the agent's own namespace. Every
    entry method takes `namespace=` to use another agent's namespace where a grant allows it."""

    @rpc("Memory", "Add")
    def add(
        self,
        texts: str | list[str],
        metadata: dict | list[dict] | None = None,
        ids: list[str] | None = None,
        namespace: str = "",
    ) -> list[str]:
        """Embed and store texts (with string metadata); returns their ids."""
        return self._call(
            "Memory",
            "Add",
            memory_pb2.AddMemoryRequest(items=memory_items(texts, metadata, ids), namespace=namespace),
            lambda r: list(r.ids),
        )

    @rpc("Memory", "Search")
    def search(
        self, query: str, k: int = 5, where: dict[str, str] | None = None, namespace: str = ""
    ) -> list[MemoryItem]:
        """The k nearest entries to `query`, optionally filtered by metadata equality."""
        return self._call(
            "Memory",
            "Search",
            memory_pb2.SearchMemoryRequest(query=query, k=k, where=where or {}, namespace=namespace),
            lambda r: [MemoryItem.from_proto(h.item, h.distance) for h in r.hits],
        )

    @rpc("Memory", "Get")
    def get(self, ids: list[str], namespace: str = "") -> list[MemoryItem]:
        return self._call(
            "Memory",
            "Get",
            memory_pb2.GetMemoryRequest(ids=ids, namespace=namespace),
            lambda r: [MemoryItem.from_proto(m) for m in r.items],
        )

    @rpc("Memory", "Update")
    def update(
        self, id: str, text: str | None = None, metadata: dict[str, str] | None = None, namespace: str = ""
    ) -> MemoryItem:
        return self._call(
            "Memory",
            "Update",
            memory_pb2.UpdateMemoryRequest(
                id=id,
                text=text or "",
                metadata=metadata or {},
                replace_metadata=metadata is not None,
                namespace=namespace,
            ),
            MemoryItem.from_proto,
        )

    @rpc("Memory", "Delete")
    def delete(self, ids: list[str], namespace: str = "") -> int:
        return self._call(
            "Memory", "Delete", memory_pb2.DeleteMemoryRequest(ids=ids, namespace=namespace), lambda r: r.deleted
        )

    @rpc("Memory", "CreateContext")
    def create_context(
        self,
        context_id: str,
        budget_tokens: int = 0,
        summarize: bool = False,
        system: str = "",
        model: str | None = None,
    ) -> ContextInfo:
        """A working context: pass `context_id=` to `llm.chat` and the kernel keeps the conversation within
        `budget_tokens` (its model's tokens), evicting old turns to long-term memory."""
        return self._call(
            "Memory",
            "CreateContext",
            memory_pb2.CreateContextRequest(
                context_id=context_id,
                budget_tokens=budget_tokens,
                summarize=summarize,
                system=system,
                model=model or "",
            ),
            ContextInfo.from_proto,
        )

    @rpc("Memory", "ListContexts")
    def contexts(self) -> list[ContextInfo]:
        return self._call(
            "Memory",
            "ListContexts",
            memory_pb2.ListContextsRequest(),
            lambda r: [ContextInfo.from_proto(c) for c in r.contexts],
        )

    @rpc("Memory", "DeleteContext")
    def delete_context(self, context_id: str) -> ContextInfo:
        return self._call(
            "Memory", "DeleteContext", memory_pb2.ContextRef(context_id=context_id), ContextInfo.from_proto
        )

    @rpc("Memory", "ListBlocks")
    def blocks(self, context_id: str) -> tuple[list[ContextBlock], int]:
        """The context's blocks in order, and the assembled prompt's size in tokens."""
        return self._call(
            "Memory",
            "ListBlocks",
            memory_pb2.ContextRef(context_id=context_id),
            lambda r: ([ContextBlock.from_proto(b) for b in r.blocks], r.tokens),
        )

    @rpc("Memory", "AddBlock")
    def add_block(
        self, context_id: str, content: str, role: str = "system", pinned: bool = True, label: str = ""
    ) -> ContextBlock:
        return self._call(
            "Memory",
            "AddBlock",
            memory_pb2.AddBlockRequest(context_id=context_id, role=role, content=content, pinned=pinned, label=label),
            ContextBlock.from_proto,
        )

    @rpc("Memory", "EditBlock")
    def edit_block(
        self, context_id: str, block_id: str, content: str | None = None, pinned: bool | None = None
    ) -> ContextBlock:
        return self._call(
            "Memory", "EditBlock", edit_block_request(context_id, block_id, content, pinned), ContextBlock.from_proto
        )

    @rpc("Memory", "DeleteBlock")
    def delete_block(self, context_id: str, block_id: str) -> ContextBlock:
        return self._call(
            "Memory",
            "DeleteBlock",
            memory_pb2.BlockRef(context_id=context_id, block_id=block_id),
            ContextBlock.from_proto,
        )


def _members(reply) -> list[str]:
    return list(reply.members)


def _families(reply) -> list[str]:
    return list(reply.families)


class AccessCalls(CallGroup):
    """Access control (`session.access`): grant other agents or groups access to this agent's memory
    namespace or storage paths; operators (admin tokens) also manage groups, capabilities and tokens."""

    @rpc("Access", "Grant")
    def grant(
        self, grantee: str, kind: str, permission: str = "read", resource: str = "", owner: str = "", ttl_s: float = 0
    ) -> GrantInfo:
        """Let `grantee` (an agent id or "group:NAME") read or write this agent's `kind` ("memory" or
        "storage"; storage `resource` is a path prefix, "" for all). Returns the grant (revoke by id)."""
        return self._call(
            "Access",
            "Grant",
            access_pb2.GrantRequest(
                grantee=grantee, kind=kind, owner=owner, resource=resource, permission=permission, ttl_s=ttl_s
            ),
            GrantInfo.from_proto,
        )

    @rpc("Access", "Revoke")
    def revoke(self, grant_id: str) -> GrantInfo:
        return self._call("Access", "Revoke", access_pb2.RevokeRequest(grant_id=grant_id), GrantInfo.from_proto)

    @rpc("Access", "ListGrants")
    def grants(self, include_revoked: bool = False) -> list[GrantInfo]:
        return self._call(
            "Access",
            "ListGrants",
            access_pb2.ListGrantsRequest(include_revoked=include_revoked),
            lambda r: [GrantInfo.from_proto(g) for g in r.grants],
        )

    @rpc("Access", "CreateGroup")
    def create_group(self, name: str) -> list[str]:
        return self._call("Access", "CreateGroup", access_pb2.GroupRequest(name=name), _members)

    @rpc("Access", "AddMember")
    def add_member(self, group: str, agent_id: str) -> list[str]:
        return self._call("Access", "AddMember", access_pb2.MemberRequest(group=group, agent_id=agent_id), _members)

    @rpc("Access", "RemoveMember")
    def remove_member(self, group: str, agent_id: str) -> list[str]:
        return self._call("Access", "RemoveMember", access_pb2.MemberRequest(group=group, agent_id=agent_id), _members)

    @rpc("Access", "ListGroups")
    def groups(self) -> dict[str, list[str]]:
        return self._call(
            "Access",
            "ListGroups",
            access_pb2.ListGroupsRequest(),
            lambda r: {g.name: list(g.members) for g in r.groups},
        )

    @rpc("Access", "GetCapabilities")
    def capabilities(self, agent_id: str = "") -> list[str]:
        return self._call("Access", "GetCapabilities", access_pb2.CapabilitiesRequest(agent_id=agent_id), _families)

    @rpc("Access", "SetCapabilities")
    def set_capabilities(self, agent_id: str, families: list[str]) -> list[str]:
        return self._call(
            "Access", "SetCapabilities", access_pb2.CapabilitiesRequest(agent_id=agent_id, families=families), _families
        )

    @rpc("Access", "CreateToken")
    def create_token(self, name: str, ttl_s: float = 0) -> str:
        """A new operator token (shown once)."""
        return self._call(
            "Access",
            "CreateToken",
            access_pb2.CreateTokenRequest(name=name, admin=True, ttl_s=ttl_s),
            lambda r: r.token,
        )

    @rpc("Access", "RevokeToken")
    def revoke_token(self, name: str) -> bool:
        return self._call("Access", "RevokeToken", access_pb2.RevokeTokenRequest(name=name), lambda r: r.revoked)

    @rpc("Access", "Audit")
    def audit(self, principal: str = "", limit: int = 100, denied_only: bool = False) -> list[dict]:
        return self._call(
            "Access",
            "Audit",
            access_pb2.AuditRequest(principal=principal, limit=limit, denied_only=denied_only),
            lambda r: [
                {
                    "ts": e.ts,
                    "principal": e.principal,
                    "method": e.method,
                    "decision": e.decision,
                    "capability": e.capability,
                    "reason": e.reason,
                }
                for e in r.entries
            ],
        )


class ToolsCalls(CallGroup):
    """Tools (`session.tools`): call built-ins (calculator, memory_search, storage_search, python) and
    registered tools with JSON arguments; register tools whose Python code runs in the kernel's sandbox (kept
    until unregistered: across restarts, and on every node of a cluster)."""

    @rpc("Tools", "Call")
    def call(self, name: str, **args) -> ToolResult:
        """Call a tool. An irreversible tool returns state "pending": `wait(result.call_id)` for the decision."""
        return self._call(
            "Tools", "Call", tools_pb2.ToolCallRequest(name=name, args_json=json.dumps(args)), ToolResult.from_proto
        )

    @rpc("Tools", "Wait")
    def wait(self, call_id: str, timeout: float = 600) -> ToolResult:
        return self._call("Tools", "Wait", tools_pb2.CallRef(call_id=call_id), ToolResult.from_proto, timeout)

    @rpc("Tools", "Register")
    def register(
        self,
        name: str,
        code: str,
        schema: dict | None = None,
        description: str = "",
        irreversible: bool = False,
        public: bool = False,
        timeout_s: float = 0,
        max_concurrency: int = 0,
        cpu_s: float = 0,
        memory_mb: int = 0,
    ) -> dict:
        """Register a tool: `code` is Python that reads `args` and sets `result`, run in the sandbox."""
        return self._call(
            "Tools",
            "Register",
            tools_pb2.ToolSpec(
                name=name,
                code=code,
                schema_json=json.dumps(schema or {"type": "object"}),
                description=description,
                irreversible=irreversible,
                public=public,
                timeout_s=timeout_s,
                max_concurrency=max_concurrency,
                cpu_s=cpu_s,
                memory_mb=memory_mb,
            ),
            lambda t: {"name": t.name, "owner": t.owner, "irreversible": t.irreversible, "public": t.public},
        )

    @rpc("Tools", "Unregister")
    def unregister(self, name: str) -> dict:
        """Remove a tool this agent registered (registered tools are kept across restarts, on every node of a
        cluster, until removed). Operators remove anyone's by "owner/name" (a public one by its name)."""
        return self._call(
            "Tools", "Unregister", tools_pb2.ToolRef(name=name),
            lambda t: {"name": t.name, "owner": t.owner, "irreversible": t.irreversible, "public": t.public},
        )

    @rpc("Tools", "List")
    def list(self) -> list[dict]:
        return self._call(
            "Tools",
            "List",
            tools_pb2.ListToolsRequest(),
            lambda r: [
                {
                    "name": t.name,
                    "description": t.description,
                    "schema": json.loads(t.schema_json),
                    "irreversible": t.irreversible,
                    "owner": t.owner,
                }
                for t in r.tools
            ],
        )

    @rpc("Tools", "Confirm")
    def confirm(self, call_id: str) -> ToolResult:
        """Operators: run a pending irreversible call."""
        return self._call("Tools", "Confirm", tools_pb2.CallRef(call_id=call_id), ToolResult.from_proto)

    @rpc("Tools", "Deny")
    def deny(self, call_id: str) -> ToolResult:
        return self._call("Tools", "Deny", tools_pb2.CallRef(call_id=call_id), ToolResult.from_proto)

    @rpc("Tools", "ListPending")
    def pending(self) -> list[ToolResult]:
        return self._call(
            "Tools",
            "ListPending",
            tools_pb2.ListPendingRequest(),
            lambda r: [ToolResult.from_proto(c) for c in r.calls],
        )


class TunerCalls(CallGroup):
    """The fine-tuner (`session.tuner`): outcomes on generations, data sets, fine-tuning jobs, adapters."""

    @rpc("Tuner", "Feedback")
    def feedback(
        self,
        request_id: str,
        reward: float | None = None,
        success: bool | None = None,
        note: str = "",
        preferred: str = "",
    ) -> int:
        """Attach an outcome to one of this agent's generations (`Completion.request_id`): a reward, a
        success flag, and/or a preferred reply (SFT learns it; with the generated one it forms a pair)."""
        return self._call(
            "Tuner", "Feedback", feedback_request(request_id, reward, success, note, preferred), lambda r: r.outcomes
        )

    @rpc("Tuner", "BuildDataset")
    def build_dataset(
        self,
        name: str,
        kind: str = "sft",
        min_reward: float | None = None,
        eval_fraction: float = 0.1,
        *,
        samples: int = 0,
        reward_regex: str = "",
        temperature: float = 0.0,
        model: str = "",
        max_tokens: int = 0,
        items: list[dict] | None = None,
        distractors: int = 0,
        oracle_fraction: float | None = None,
        seed: int = 0,
        reward: str = "",
        adapter: str = "",
    ) -> dict:
        """Build a data set from this agent's traces into storage (datasets/NAME.{train,eval}.jsonl and
        .card.json); returns its card. kind: "sft"; "dpo" (preferred/rejected pairs: corrections, replies of
        one prompt with different rewards); "kto" (replies labelled by feedback; min_reward: the threshold,
        unset: the reward's sign); "grpo" (samples >= 2 replies of the base model per prompt of the traces,
        temperature (default 1.0), max_tokens, scored by reward: "regex:PATTERN", "json", "json_schema:{...}",
        "exact" / "contains" (the prompt's corrected or successful reply is the answer), "tool_call" (the
        reply's tool calls equal the successful reply's; prompts are sampled with their tools), or "tool:NAME" (the
        agent's tool, run jailed, gets {"messages", "reply", "reference"} and returns a number), or
        "judge[:MODEL[:RUBRIC]]" (a served model scores each group's replies side by side, 0 to 1)); "raft"
        (samples, reward_regex, temperature, model, max_tokens); "rag" (items: [{"question", "oracle_id",
        "answer"}], distractors, oracle_fraction, seed). grpo and raft sample from `adapter` when given
        ("current": this agent's default adapter; or one of its adapters' names), not the base."""
        return self._call(
            "Tuner",
            "BuildDataset",
            build_dataset_request(
                name,
                kind,
                min_reward,
                eval_fraction,
                samples,
                reward_regex,
                temperature,
                model,
                max_tokens,
                items,
                distractors,
                oracle_fraction,
                seed,
                reward,
                adapter,
            ),
            lambda r: json.loads(r.card_json),
        )

    @rpc("Tuner", "StartFinetune")
    def finetune(
        self,
        name: str,
        dataset: str,
        model: str = "",
        config: dict | None = None,
        set_default: bool = False,
        min_improvement: float = 0.0,
        method: str = "",
        start_from: str = "",
    ) -> JobInfo:
        """Queue a LoRA job on a data set; once trained it is published as AGENT:NAME only if it beats the
        base model on the held-out split, hot-loaded, and (set_default) used by this agent's generations.
        method: "sft", "dpo" or "kto" (TRL's trainers, the served base as reference); empty: the data set's
        own (a "dpo" or "kto" data set trains by its kind, the others by SFT). start_from: "current" (this
        agent's default adapter on the model) or one of its adapters' names: training continues from it (it is
        the reference and the "base" to beat), and the result is one adapter on the base."""
        return self._call(
            "Tuner",
            "StartFinetune",
            finetune_request(name, dataset, model, config, set_default, min_improvement, method, start_from),
            JobInfo.from_proto,
        )

    @rpc("Tuner", "GetJob")
    def job(self, job_id: str) -> JobInfo:
        return self._call("Tuner", "GetJob", tuner_pb2.JobRequest(job_id=job_id), JobInfo.from_proto)

    @rpc("Tuner", "ListJobs")
    def jobs(self, all_agents: bool = False) -> list[JobInfo]:
        return self._call(
            "Tuner",
            "ListJobs",
            tuner_pb2.ListJobsRequest(all_agents=all_agents),
            lambda r: [JobInfo.from_proto(j) for j in r.jobs],
        )

    @rpc("Tuner", "CancelJob")
    def cancel(self, job_id: str) -> JobInfo:
        return self._call("Tuner", "CancelJob", tuner_pb2.JobRequest(job_id=job_id), JobInfo.from_proto)

    @rpc("Tuner", "GetJob", "loop")
    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.5) -> JobInfo:
        """Poll a job until it ends (published, rejected, failed or cancelled); TimeoutError past `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = yield TunerCalls.job(self, job_id)
            if job.done:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} at step {job.step}/{job.total_steps}")
            yield Sleep(poll_s)

    @rpc("Tuner", "ListAdapters")
    def adapters(self) -> list[AdapterInfo]:
        return self._call(
            "Tuner",
            "ListAdapters",
            tuner_pb2.ListAdaptersRequest(),
            lambda r: [AdapterInfo.from_proto(a) for a in r.adapters],
        )

    @rpc("Tuner", "Continual")
    def continual(self, **spec) -> dict | None:
        """Continual tuning of this agent, configured with keywords (none: only read the state): enabled,
        kind ("sft", "dpo", "kto", "grpo"), reward (grpo), model, min_feedback (new outcomes that start a
        round), min_reward, eval_fraction, canary_share, canary_calls (rewarded calls per arm before the
        decision), max_drop (the candidate is promoted unless its mean reward is lower by more), config
        (TrainConfig), continue_from_current (rounds continue from the agent's default adapter, and grpo rounds
        sample from it). Returns the state: phase (idle, training, canary), round, candidate, arms, history."""
        return self._call("Tuner", "Continual", tuner_pb2.ContinualRequest(spec_json=json.dumps(spec) if spec else ""),
                          lambda r: json.loads(r.state_json) if r.state_json else None)

    @rpc("Tuner", "SetDefaultAdapter")
    def set_default_adapter(self, adapter: str, model: str = "") -> None:
        """Make `adapter` the one this agent's generations on `model` use when they name none ("" clears)."""
        return self._call(
            "Tuner", "SetDefaultAdapter", tuner_pb2.DefaultAdapterRequest(model=model, adapter=adapter), lambda r: None
        )


class KernelCalls(CallGroup):
    """Kernel service syscalls (`session.kernel`)."""

    @rpc("Kernel", "Heartbeat")
    def heartbeat(self) -> float:
        return self._call("Kernel", "Heartbeat", kernel_pb2.HeartbeatRequest(), lambda r: r.server_time)

    @rpc("Kernel", "ListAgents")
    def agents(self, include_exited: bool = False) -> list[AgentInfo]:
        return self._call(
            "Kernel",
            "ListAgents",
            kernel_pb2.ListAgentsRequest(include_exited=include_exited),
            lambda r: [AgentInfo.from_proto(a) for a in r.agents],
        )

    @rpc("Kernel", "Stats")
    def stats(self) -> kernel_pb2.StatsReply:
        """Kernel-wide statistics (the raw StatsReply message: models, requests, counters)."""
        return self._call("Kernel", "Stats", kernel_pb2.StatsRequest())

    @rpc("Kernel", "Register")
    def _register(self, name: str, description: str, labels: dict[str, str] | None):
        """(agent id, token) of a newly registered agent: `connect` calls it."""
        return self._call(
            "Kernel",
            "Register",
            kernel_pb2.RegisterRequest(name=name, description=description, labels=labels or {}),
            lambda r: (r.agent_id, r.token),
        )

    @rpc("Kernel", "Exit")
    def _exit(self):
        """End the registration: `Session.exit` calls it."""
        return self._call("Kernel", "Exit", kernel_pb2.ExitRequest(), lambda r: None)


GROUPS = {
    "llm": LLMCalls,
    "kernel": KernelCalls,
    "storage": StorageCalls,
    "memory": MemoryCalls,
    "access": AccessCalls,
    "tools": ToolsCalls,
    "tuner": TunerCalls,
}


def table_methods(cls) -> dict[str, Callable]:
    """The call-table methods of a group class (public ones and those `connect`/`exit` use)."""
    return {n: f for n, f in vars(cls).items() if getattr(f, "kind", None)}


def bind(cls, wrap) -> type:
    """A subclass of group `cls` whose table methods run through `wrap(kind, fn)` (an executor's wrapper)."""
    return type(
        cls.__name__.removesuffix("Calls") if cls is not KernelCalls else "KernelCalls",
        (cls,),
        {n: wrap(f.kind, f) for n, f in table_methods(cls).items()},
    )


def _raw(prompt) -> dict:
    """A raw prompt as the request names it: text, or token ids."""
    return {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": list(prompt)}
