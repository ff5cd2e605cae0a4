"""The gate every syscall passes before its use case runs, whatever the transport: who is calling (a token becomes
a principal), whether it is within its request rate, and whether its capability families and grants allow the
syscall (`kernos.abi.syscalls.Syscall`) on the owner and path its request names. Every decision goes to the
audit log."""
from __future__ import annotations

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import Syscall
from kernos.abi.trace import TraceRecord

from .access import AccessControl
from .principals import AgentRegistry
from .quotas import QuotaExceeded, Quotas


class Gate:
    def __init__(self, agents: AgentRegistry, access: AccessControl, quotas: Quotas):
        self.agents = agents
        self.access = access
        self.quotas = quotas

    def authenticate(self, token: str | None):
        """The principal behind a token: an operator (admin token) or a registered agent; None if neither."""
        # Agents first: their tokens are found in memory; an operator token costs a database read.
        return self.agents.authenticate(token) or self.access.operator(token)

    def admit(self, principal, call: Syscall) -> None:
        """Raise RESOURCE_EXHAUSTED (over the request rate, with a retry hint) or PERMISSION_DENIED."""
        if not principal.operator:
            try:
                self.quotas.request(principal.agent_id)
            except QuotaExceeded as e:
                if self.access.audit is not None:
                    self.access.audit.record(TraceRecord(principal.agent_id, call.name, "DENY", {"capability": "rate"},
                                                         {"reason": e.message}, {}))
                raise
        allowed, capability, reason = self.access.decide(principal, call)
        if not allowed:
            raise StatusError("PERMISSION_DENIED", f"missing capability {capability}: {reason}")
