"""The gRPC side of the syscall vocabulary: which syscall each method of each `kernos.v1` service is, the
resource its request names, and how its messages look in a trace. The only place that knows the methods'
names (a test checks this table against the `.proto` files)."""
from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict

from kernos.abi.syscalls import Syscall, syscall

from ..edge import MAX_TRACED_STRING

PACKAGE = "kernos.v1"
METHODS: dict[str, dict[str, str]] = {
    "Kernel": {"Register": "kernel.register", "Heartbeat": "kernel.heartbeat", "Exit": "kernel.exit",
               "ListAgents": "kernel.list_agents", "Stats": "kernel.stats"},
    "LLM": {"Generate": "llm.generate", "GenerateStream": "llm.generate", "ListModels": "llm.list_models",
            "Suspend": "llm.suspend", "Resume": "llm.resume", "Snapshot": "llm.snapshot", "Restore": "llm.restore"},
    "Memory": {"Add": "memory.add", "Search": "memory.search", "Get": "memory.get", "Update": "memory.update",
               "Delete": "memory.delete", "CreateContext": "memory.create_context",
               "ListContexts": "memory.list_contexts", "DeleteContext": "memory.delete_context",
               "ListBlocks": "memory.list_blocks", "AddBlock": "memory.add_block", "EditBlock": "memory.edit_block",
               "DeleteBlock": "memory.delete_block"},
    "Storage": {"Write": "storage.write", "Read": "storage.read", "Stat": "storage.stat", "List": "storage.list",
                "Delete": "storage.delete", "History": "storage.history", "Rollback": "storage.rollback",
                "Search": "storage.search"},
    "Tools": {"Register": "tools.register", "Unregister": "tools.unregister", "List": "tools.list",
              "Call": "tools.call", "Wait": "tools.wait",
              "Confirm": "tools.confirm", "Deny": "tools.deny", "ListPending": "tools.list_pending"},
    "Tuner": {"Feedback": "tuner.feedback", "BuildDataset": "tuner.build_dataset",
              "StartFinetune": "tuner.start_finetune", "GetJob": "tuner.get_job", "ListJobs": "tuner.list_jobs",
              "CancelJob": "tuner.cancel_job", "ListAdapters": "tuner.list_adapters",
              "SetDefaultAdapter": "tuner.set_default_adapter", "Continual": "tuner.continual"},
    "Access": {"Grant": "access.grant", "Revoke": "access.revoke", "ListGrants": "access.list_grants",
               "CreateGroup": "access.create_group", "AddMember": "access.add_member",
               "RemoveMember": "access.remove_member", "ListGroups": "access.list_groups",
               "SetCapabilities": "access.set_capabilities", "GetCapabilities": "access.get_capabilities",
               "CreateToken": "access.create_token", "RevokeToken": "access.revoke_token", "Audit": "access.audit"},
}
SYSCALL_OF = {f"/{PACKAGE}.{service}/{rpc}": name for service, rpcs in METHODS.items() for rpc, name in rpcs.items()}
# gRPC's own services: health checks and reflection, answered without a token and not traced.
INFRASTRUCTURE = ("/grpc.health.", "/grpc.reflection.")
SECRET_FIELDS = {"token"}


def call_of(method: str, request) -> Syscall:
    """The syscall a method's request makes, naming the owner, namespace and path or prefix it carries."""
    return syscall(SYSCALL_OF[method], owner=getattr(request, "owner", ""),
                   namespace=getattr(request, "namespace", ""),
                   path=getattr(request, "path", "") or getattr(request, "prefix", ""))


def summary(msg) -> dict:
    """A bounded view of a message: scalars (long strings cut), sizes of bytes and repeated fields."""
    out = {}
    for fd, value in msg.ListFields():
        if fd.name in SECRET_FIELDS:
            out[fd.name] = "<redacted>"
        elif fd.is_repeated:
            out[fd.name] = {"count": len(value)}
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            out[fd.name] = summary(value)
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            out[fd.name] = {"bytes": len(value)}
        elif isinstance(value, str):
            out[fd.name] = value[:MAX_TRACED_STRING]
        else:
            out[fd.name] = value
    return out


def trace_view(call: Syscall, msg) -> dict:
    """A request or reply as its trace keeps it: whole for generations and tool calls (the fine-tuner learns
    from them, tool calls are worth replaying), a bounded summary for the rest."""
    if msg is None:
        return {}
    if call.spec.traced_whole:
        if msg.DESCRIPTOR.fields_by_name.get("reply") is not None and msg.HasField("reply"):
            msg = msg.reply                   # a stream's last chunk carries the whole reply
        return MessageToDict(msg, preserving_proto_field_name=True)
    return summary(msg)
