"""Every syscall of the kernel as a typed value, whatever the transport that carries it.

A `Spec` says what a syscall is: its name (also the kind its trace records carry), the capability family and
permission it needs, and what kind of resource its request names. A `Syscall` is one call of it: the spec and
the resource this request names (an owner, a memory namespace, a storage path or prefix). Security decides on
that value; gRPC, the OpenAI routes, MCP, AIOS and the console each build it from their own wire format.

What a request names (`Spec.names`):
- "none": nothing beyond the capability family (listing models, embedding text);
- "own": the caller's own resources only (its contexts, generations, jobs, grants);
- "named": a model/adapter or a tool, which only the use case can resolve (the adapter a generation uses may
  be the agent's default one): security decides there (`authorize_model`, `authorize_tool`);
- "namespace": another agent's memory namespace, if the request names one;
- "path": a file path or prefix in another agent's storage space, if the request names an owner.
Family "kernel" needs only an authenticated caller; family "access" manages the caller's own grants.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    name: str                   # "storage.read": the syscall, and the kind of its trace records
    family: str                 # the capability family it needs: llm, memory, storage, tools, tuner, access, ...
    permission: str             # read, write or execute
    names: str = "none"         # what its request names (see above)
    public: bool = False        # answered without a token (registration)
    trace_kind: str = ""        # when its records belong with another syscall's (a restored generation)
    traced_whole: bool = False  # request and reply traced whole (generations, tool calls), not summarised

    @property
    def kind(self) -> str:
        return self.trace_kind or self.name


def _specs(service: str, family: str, permission: str, names: str, *calls: str, **extra) -> dict[str, Spec]:
    return {f"{service}.{c}": Spec(f"{service}.{c}", family, permission, names, **extra) for c in calls}


SYSCALLS: dict[str, Spec] = {
    # the kernel service: authentication is enough
    "kernel.register": Spec("kernel.register", "kernel", "write", public=True),
    **_specs("kernel", "kernel", "read", "own", "heartbeat", "exit", "list_agents", "stats"),
    # generation and its control calls
    "llm.generate": Spec("llm.generate", "llm", "execute", "named", traced_whole=True),
    "llm.list_models": Spec("llm.list_models", "llm", "read"),
    **_specs("llm", "llm", "execute", "own", "suspend", "resume", "snapshot"),
    # stored responses (/v1/responses): the caller's own
    "llm.get_response": Spec("llm.get_response", "llm", "read", "own"),
    "llm.delete_response": Spec("llm.delete_response", "llm", "write", "own"),
    "llm.restore": Spec("llm.restore", "llm", "execute", "own", trace_kind="llm.generate", traced_whole=True),
    # memory: long-term entries in a namespace; working-memory contexts are the caller's own
    **_specs("memory", "memory", "write", "namespace", "add", "update", "delete"),
    **_specs("memory", "memory", "read", "namespace", "search", "get"),
    "memory.embed": Spec("memory.embed", "memory", "read"),        # HTTP /v1/embeddings
    **_specs("memory", "memory", "write", "own", "create_context", "list_contexts", "delete_context", "list_blocks",
             "add_block", "edit_block", "delete_block"),
    # storage: paths in the caller's space, or in an owner's that granted them
    **_specs("storage", "storage", "read", "path", "read", "stat", "list", "history", "search"),
    **_specs("storage", "storage", "write", "path", "write", "delete", "rollback"),
    # tools
    **_specs("tools", "tools", "execute", "own", "register", "unregister", "list", "wait", traced_whole=True),
    "tools.call": Spec("tools.call", "tools", "execute", "named", traced_whole=True),
    **_specs("tools", "admin", "write", "none", "confirm", "deny", "list_pending", traced_whole=True),
    # the fine-tuner
    **_specs("tuner", "tuner", "write", "own", "feedback", "build_dataset", "start_finetune", "cancel_job",
             "set_default_adapter", "continual"),
    **_specs("tuner", "tuner", "read", "own", "get_job", "list_jobs", "list_adapters"),
    # access control: grants on the caller's own resources; groups, capabilities and tokens for operators
    **_specs("access", "access", "write", "own", "grant", "revoke"),
    **_specs("access", "access", "read", "own", "list_grants", "list_groups", "get_capabilities"),
    **_specs("access", "admin", "write", "none", "create_group", "add_member", "remove_member",
             "set_capabilities", "create_token", "revoke_token", "audit"),
}


@dataclass(frozen=True)
class Syscall:
    """One call: what it is and the resource its request names ("" = the caller's own)."""
    spec: Spec
    owner: str = ""            # whose storage space (storage calls)
    namespace: str = ""        # whose memory namespace (memory calls)
    path: str = ""             # the file path, or the prefix a listing covers

    @property
    def name(self) -> str:
        return self.spec.name


def syscall(name: str, owner: str = "", namespace: str = "", path: str = "") -> Syscall:
    """The call `name` naming the given resource; a KeyError for a name that is no syscall."""
    return Syscall(SYSCALLS[name], owner or "", namespace or "", path or "")
