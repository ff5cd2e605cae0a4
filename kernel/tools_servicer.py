"""The Tools service: register, list and call tools; operators confirm or deny irreversible calls."""
from __future__ import annotations

import json

from kernos.proto.v1 import tools_pb2 as pb
from kernos.proto.v1 import tools_pb2_grpc as rpc
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import syscall
from .kernel import Kernel
from .tools import Call, Tool


def _info(t: Tool) -> pb.ToolInfo:
    return pb.ToolInfo(name=t.name, description=t.description, schema_json=json.dumps(t.schema),
                       irreversible=t.irreversible, owner=t.owner, public=t.public)


def _reply(c: Call) -> pb.ToolCallReply:
    return pb.ToolCallReply(call_id=c.call_id, state=c.state, tool=c.tool, agent_id=c.agent_id, error=c.error,
                            result_json=json.dumps(c.result) if c.state == "done" else "", duration_ms=c.duration_ms)


class ToolsServicer(rpc.ToolsServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    def _trace(self, kind: str, c: Call) -> None:
        self.k.traces.record(TraceRecord(current_agent().agent_id, kind, c.state.upper(),
                                         {"tool": c.tool, "args": c.args}, {"result": c.result, "error": c.error},
                                         {"duration_ms": c.duration_ms}))

    @syscall
    async def Register(self, request, context):
        return _info(self.k.tools.register(current_agent().agent_id, request))

    @syscall
    async def List(self, request, context):
        return pb.ListToolsReply(tools=[_info(t) for t in self.k.tools.visible(current_agent())])

    @syscall
    async def Call(self, request, context):
        call = await self.k.tools.call(current_agent(), request.name, request.args_json)
        self._trace("tools.call", call)
        return _reply(call)

    @syscall
    async def Wait(self, request, context):
        remaining = context.time_remaining()
        call = await self.k.tools.wait(current_agent(), request.call_id, min(remaining or 600.0, 600.0))
        return _reply(call)

    @syscall
    async def Confirm(self, request, context):
        call = await self.k.tools.confirm(request.call_id)
        self._trace("tools.confirm", call)
        return _reply(call)

    @syscall
    async def Deny(self, request, context):
        call = self.k.tools.deny(request.call_id)
        self._trace("tools.deny", call)
        return _reply(call)

    @syscall
    async def ListPending(self, request, context):
        return pb.ListPendingReply(calls=[_reply(c) for c in self.k.tools.pending()])
