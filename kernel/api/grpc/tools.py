"""The Tools service: converts to and from the tool manager (the tools use case)."""
from __future__ import annotations

import json

from kernos.proto.v1 import tools_pb2 as pb
from kernos.proto.v1 import tools_pb2_grpc as rpc

from ...tools.manager import ToolManager
from ...tools.spec import Call, Tool, ToolSpec
from .interceptor import current_principal


def _info(t: Tool, principal) -> pb.ToolInfo:
    return pb.ToolInfo(name=t.name_for(principal), description=t.description, schema_json=json.dumps(t.schema),
                       irreversible=t.irreversible, owner=t.owner, public=t.public)


def _reply(c: Call) -> pb.ToolCallReply:
    return pb.ToolCallReply(call_id=c.call_id, state=c.state, tool=c.tool, agent_id=c.agent_id, error=c.error,
                            result_json=json.dumps(c.result) if c.state == "done" else "", duration_ms=c.duration_ms)


class ToolsServicer(rpc.ToolsServicer):
    def __init__(self, tools: ToolManager):
        self.tools = tools

    async def Register(self, r, context):
        spec = ToolSpec(r.name, r.code, r.schema_json, r.description, r.irreversible, r.public, r.timeout_s,
                        r.max_concurrency, r.cpu_s, r.memory_mb)
        return _info(self.tools.register(current_principal(), spec), current_principal())

    async def Unregister(self, r, context):
        return _info(self.tools.unregister(current_principal(), r.name), current_principal())

    async def List(self, r, context):
        me = current_principal()
        return pb.ListToolsReply(tools=[_info(t, me) for t in self.tools.visible(me)])

    async def Call(self, r, context):
        return _reply(await self.tools.call(current_principal(), r.name, r.args_json))

    async def Wait(self, r, context):
        remaining = context.time_remaining()
        return _reply(await self.tools.wait(current_principal(), r.call_id, min(remaining or 600.0, 600.0)))

    async def Confirm(self, r, context):
        return _reply(await self.tools.confirm(r.call_id))

    async def Deny(self, r, context):
        return _reply(self.tools.deny(r.call_id))

    async def ListPending(self, r, context):
        return pb.ListPendingReply(calls=[_reply(c) for c in self.tools.pending()])
