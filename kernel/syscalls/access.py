"""The access syscalls: grants on the caller's resources, groups, capabilities, operator tokens and the audit
log. Who may call each method was decided at the gate; ownership of a grant is checked by the access
control itself."""
from __future__ import annotations

import asyncio

from kernos.abi.errors import StatusError

from ..security.access import AccessControl


class Access:
    def __init__(self, access: AccessControl):
        self.access = access

    async def grant(self, principal, grantee: str, kind: str, owner: str, resource: str, permission: str,
                    ttl_s: float):
        return await asyncio.to_thread(self.access.grant, principal, grantee, kind, owner, resource, permission, ttl_s)

    async def revoke(self, principal, grant_id: str):
        return await asyncio.to_thread(self.access.revoke, principal, grant_id)

    async def grants(self, principal, include_revoked: bool):
        return await asyncio.to_thread(self.access.grants, principal, include_revoked)

    async def create_group(self, name: str) -> list[str]:
        await asyncio.to_thread(self.access.create_group, name)
        return await self.members(name)

    async def add_member(self, group: str, agent_id: str) -> list[str]:
        await asyncio.to_thread(self.access.add_member, group, agent_id)
        return await self.members(group)

    async def remove_member(self, group: str, agent_id: str) -> list[str]:
        await asyncio.to_thread(self.access.remove_member, group, agent_id)
        return await self.members(group)

    async def members(self, group: str) -> list[str]:
        return (await self.groups()).get(group, [])

    async def groups(self) -> dict[str, list[str]]:
        return await asyncio.to_thread(self.access.groups)

    async def set_capabilities(self, agent_id: str, families: list[str]) -> tuple[str, ...]:
        return await asyncio.to_thread(self.access.set_capabilities, agent_id, families)

    async def capabilities(self, principal, agent_id: str) -> tuple[str, tuple[str, ...]]:
        who = agent_id or principal.agent_id
        if who != principal.agent_id and not principal.operator:
            raise StatusError("PERMISSION_DENIED", "only operators may read another agent's capabilities")
        operator = principal.operator and who == principal.agent_id
        return who, await asyncio.to_thread(self.access.capabilities, who, operator)

    async def create_token(self, name: str, admin: bool, ttl_s: float) -> tuple[str, float]:
        return await asyncio.to_thread(self.access.create_token, name, admin, ttl_s)

    async def revoke_token(self, name: str) -> bool:
        return await asyncio.to_thread(self.access.revoke_token, name)

    async def audit(self, principal_filter: str, limit: int, denied_only: bool) -> list:
        recs = await asyncio.to_thread(self.access.audit.query, principal_filter or None, None, limit or 100)
        return [r for r in recs if not denied_only or r.status == "DENY"]
