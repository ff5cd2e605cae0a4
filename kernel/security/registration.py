"""Who may register which agent name: the one place that decides, whatever the transport.

- A name that exists is bound to its credential: registering it again (which rotates its token) needs the
  agent's own token or an operator's. Session state does not matter: an idle or exited agent still owns it.
- A new name follows the policy (`[registration]` in the config):
  `open`   anyone may register, at most `per_peer_per_minute` Register calls per client address and
           `max_agents` agents in all;
  `enroll` the call carries an enrollment token (`kernos token create --enroll`), one use per agent;
  `closed` operators create agents (an operator token on Register, or `kernos token create --agent`).
  An operator's token is accepted under every policy and is not counted.
- New agents (not an operator's) join a group: the enrollment token's, else `registration.group` (if set);
  a quota on that
  group (`[quotas.groups.NAME]`) is then one budget that a swarm of new agents shares.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from kernos.abi.errors import StatusError

from .access import AccessControl
from .enrollment import Enrollments
from .principals import AgentRegistry, check_name


class Registration:
    def __init__(self, registry: AgentRegistry, access: AccessControl, enrollments: Enrollments, config,
                 reserved: tuple[str, ...] = ()):
        self.registry = registry
        self.reserved = reserved                 # name prefixes of bridged agents (AIOS's): never registered here
        self.access = access
        self.enrollments = enrollments
        self.config = config                     # RegistrationConfig
        self._lock = threading.Lock()
        self._calls: dict[str, deque] = defaultdict(deque)   # peer -> Register call times (last minute)

    def register(self, name: str, description: str, labels: dict[str, str], credential: str | None, peer: str):
        """(agent, token); the token is shown once."""
        check_name(name, description, labels)
        for prefix in self.reserved:          # a gRPC agent named "aios.NAME" locked that AIOS name out
            if name.startswith(prefix):
                raise StatusError("INVALID_ARGUMENT", f"names starting with '{prefix}' belong to bridged (AIOS) agents")
        operator = self.access.operator(credential) is not None
        with self._lock:
            if not operator:
                self._count_call(peer)
            agent = self.registry.get(name)
            if agent is not None:
                if not (operator or self.registry.owns(agent, credential)):
                    raise StatusError("ALREADY_EXISTS", f"agent '{name}' exists: registering it again needs its "
                                                        "token (or an operator's)")
                return self.registry.rotate(name, description, labels)
            group = None if operator else (self._admit_new(credential) or self.config.group)
            agent, token = self.registry.create(name, description, labels)
        if group:
            self.access.create_group(group)
            self.access.add_member(group, name)
        return agent, token

    def _admit_new(self, credential: str | None) -> str | None:
        """Raise unless the policy lets a non-operator register a new name; the group an enrollment names."""
        policy = self.config.policy
        if policy == "closed":
            raise StatusError("PERMISSION_DENIED", "registration is closed on this kernel: an operator creates agents "
                                                   "(kernos token create --agent NAME)")
        cap = self.config.max_agents
        if cap and self.registry.count() >= cap:
            raise StatusError("RESOURCE_EXHAUSTED", f"this kernel holds its maximum of {cap} agents "
                                                    "(registration.max_agents)")
        enrollment = self.enrollments.redeem(credential)
        if policy == "enroll" and enrollment is None:
            raise StatusError("UNAUTHENTICATED", "registration needs an enrollment token on this kernel (kernos token "
                                                 "create --enroll; sent as 'authorization: Bearer <token>'): missing, "
                                                 "unknown, used up, expired or revoked")
        return enrollment.group if enrollment is not None and enrollment.group else None

    def _count_call(self, peer: str, now: float | None = None) -> None:
        limit = self.config.per_peer_per_minute
        if not limit:
            return
        now = time.monotonic() if now is None else now
        q = self._calls[peer]
        while q and now - q[0] >= 60.0:
            q.popleft()
        if len(q) >= limit:
            raise StatusError("RESOURCE_EXHAUSTED", f"over {limit} registrations per minute from this address",
                              max(0.0, 60.0 - (now - q[0])))
        q.append(now)
        if len(self._calls) > 10_000:            # forget quiet peers
            for p in [p for p, c in self._calls.items() if not c or now - c[-1] >= 60.0]:
                del self._calls[p]


def peer_address(peer: str) -> str:
    """gRPC's peer string without the port: 'ipv4:10.0.0.5:51234' -> 'ipv4:10.0.0.5', 'ipv6:[::1]:5' ->
    'ipv6:[::1]'; Unix-socket peers are one address."""
    if peer.startswith("unix"):
        return "unix"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer
