"""The Access service: grants, groups, capabilities, operator tokens and the audit log. Who may call what
is decided by the interceptor (`Kernel.authorize`); ownership of a grant is checked here."""
from __future__ import annotations

import asyncio

import grpc

from kernos.proto.v1 import access_pb2 as pb
from kernos.proto.v1 import access_pb2_grpc as rpc

from .access import Grant
from .auth import current_agent
from .errors import SyscallError, syscall
from .kernel import Kernel


def _grant(g: Grant) -> pb.GrantInfo:
    return pb.GrantInfo(grant_id=g.grant_id, grantee=g.grantee, kind=g.kind, owner=g.owner, resource=g.resource,
                        permission=g.permission, created=g.created, expires=g.expires, revoked=g.revoked,
                        granted_by=g.granted_by)


class AccessServicer(rpc.AccessServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    async def _call(self, fn, *args):
        return await asyncio.to_thread(fn, *args)  # an AccessError becomes its status in @syscall

    @syscall
    async def Grant(self, request, context):
        me = current_agent().agent_id
        g = await self._call(self.k.access.grant, me, request.grantee, request.kind, request.owner or me,
                             request.resource, request.permission, request.ttl_s)
        return _grant(g)

    @syscall
    async def Revoke(self, request, context):
        return _grant(await self._call(self.k.access.revoke, current_agent().agent_id, request.grant_id))

    @syscall
    async def ListGrants(self, request, context):
        grants = await self._call(self.k.access.grants, current_agent().agent_id, request.include_revoked)
        return pb.ListGrantsReply(grants=[_grant(g) for g in grants])

    def _group(self, name: str) -> pb.GroupInfo:
        return pb.GroupInfo(name=name, members=self.k.access.groups().get(name, []))

    @syscall
    async def CreateGroup(self, request, context):
        await self._call(self.k.access.create_group, request.name)
        return self._group(request.name)

    @syscall
    async def AddMember(self, request, context):
        await self._call(self.k.access.add_member, request.group, request.agent_id)
        return self._group(request.group)

    @syscall
    async def RemoveMember(self, request, context):
        await self._call(self.k.access.remove_member, request.group, request.agent_id)
        return self._group(request.group)

    @syscall
    async def ListGroups(self, request, context):
        return pb.ListGroupsReply(groups=[pb.GroupInfo(name=n, members=m) for n, m in self.k.access.groups().items()])

    @syscall
    async def SetCapabilities(self, request, context):
        fams = await self._call(self.k.access.set_capabilities, request.agent_id, list(request.families))
        return pb.CapabilitiesReply(agent_id=request.agent_id, families=fams)

    @syscall
    async def GetCapabilities(self, request, context):
        me = current_agent().agent_id
        who = request.agent_id or me
        if who != me and not me.startswith("admin:"):
            raise SyscallError(grpc.StatusCode.PERMISSION_DENIED, "only operators may read another agent's capabilities")
        return pb.CapabilitiesReply(agent_id=who, families=self.k.access.capabilities(who))

    @syscall
    async def CreateToken(self, request, context):
        token, expires = await self._call(self.k.access.create_token, request.name, request.admin, request.ttl_s)
        return pb.CreateTokenReply(token=token, expires=expires)

    @syscall
    async def RevokeToken(self, request, context):
        return pb.RevokeTokenReply(revoked=await self._call(self.k.access.revoke_token, request.name))

    @syscall
    async def Audit(self, request, context):
        recs = await asyncio.to_thread(self.k.audit.query, request.principal or None, None, request.limit or 100)
        return pb.AuditReply(entries=[
            pb.AuditEntry(ts=r.ts, principal=r.agent_id, method=r.kind, decision=r.status.lower(),
                          capability=r.request.get("capability", ""), reason=r.response.get("reason", ""))
            for r in recs if not request.denied_only or r.status == "DENY"])
