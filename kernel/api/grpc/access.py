"""The Access service: converts to and from the access use case."""

from __future__ import annotations

from kernos.proto.v1 import access_pb2 as pb
from kernos.proto.v1 import access_pb2_grpc as rpc

from ...security.access import Grant
from ...syscalls.access import Access
from .interceptor import current_principal


def _grant(g: Grant) -> pb.GrantInfo:
    return pb.GrantInfo(
        grant_id=g.grant_id,
        grantee=g.grantee,
        kind=g.kind,
        owner=g.owner,
        resource=g.resource,
        permission=g.permission,
        created=g.created,
        expires=g.expires,
        revoked=g.revoked,
        granted_by=g.granted_by,
    )


class AccessServicer(rpc.AccessServicer):
    def __init__(self, access: Access):
        self.access = access

    async def Grant(self, r, context):
        return _grant(
            await self.access.grant(current_principal(), r.grantee, r.kind, r.owner, r.resource, r.permission, r.ttl_s)
        )

    async def Revoke(self, r, context):
        return _grant(await self.access.revoke(current_principal(), r.grant_id))

    async def ListGrants(self, r, context):
        return pb.ListGrantsReply(
            grants=[_grant(g) for g in await self.access.grants(current_principal(), r.include_revoked)]
        )

    async def CreateGroup(self, r, context):
        return pb.GroupInfo(name=r.name, members=await self.access.create_group(r.name))

    async def AddMember(self, r, context):
        return pb.GroupInfo(name=r.group, members=await self.access.add_member(r.group, r.agent_id))

    async def RemoveMember(self, r, context):
        return pb.GroupInfo(name=r.group, members=await self.access.remove_member(r.group, r.agent_id))

    async def ListGroups(self, r, context):
        return pb.ListGroupsReply(
            groups=[pb.GroupInfo(name=n, members=m) for n, m in (await self.access.groups()).items()]
        )

    async def SetCapabilities(self, r, context):
        return pb.CapabilitiesReply(
            agent_id=r.agent_id, families=await self.access.set_capabilities(r.agent_id, list(r.families))
        )

    async def GetCapabilities(self, r, context):
        who, families = await self.access.capabilities(current_principal(), r.agent_id)
        return pb.CapabilitiesReply(agent_id=who, families=families)

    async def CreateToken(self, r, context):
        token, expires = await self.access.create_token(r.name, r.admin, r.ttl_s)
        return pb.CreateTokenReply(token=token, expires=expires)

    async def RevokeToken(self, r, context):
        return pb.RevokeTokenReply(revoked=await self.access.revoke_token(r.name))

    async def Audit(self, r, context):
        return pb.AuditReply(
            entries=[
                pb.AuditEntry(
                    ts=x.ts,
                    principal=x.agent_id,
                    method=x.kind,
                    decision=x.status.lower(),
                    capability=x.request.get("capability", ""),
                    reason=x.response.get("reason", ""),
                )
                for x in await self.access.audit(r.principal, r.limit, r.denied_only)
            ]
        )
