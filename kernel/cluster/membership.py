"""This kernel's membership of a cluster: it joins once it listens, renews its lease and reads the other nodes'
every `heartbeat_s`, answers where an agent's home is from that view (no database round trip on a call), and
leaves when it stops. A node that a forwarded call could not reach is passed over until its next heartbeat shows
it alive again, so a dead node's agents move at once for the calls that find it dead, and for all calls once its
lease expires."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

from .nodes import Node, Nodes, rendezvous

log = logging.getLogger("kernos.cluster")


class Membership:
    def __init__(self, nodes: Nodes, heartbeat_s: float = 2.0, forward: bool = True):
        self.nodes, self.heartbeat_s, self.forward = nodes, heartbeat_s, forward
        self.view: list[Node] = []
        self.pins: dict[str, str] = {}               # agent -> node, for agents an operator moved by hand
        self._unreachable: dict[str, float] = {}     # node -> heartbeat it had when a call could not reach it
        self.forwarded = 0                           # calls sent to their home node
        self.served_for_dead = 0                     # calls served here because their home could not be reached
        self.handed_over = 0                         # running streams a drain of this node moved to their homes
        self.on_drain = None                         # called (from a worker thread) when this node turns draining
        self._draining = False
        self.secret = nodes.secret()

    @property
    def node_id(self) -> str:
        return self.nodes.node_id

    def join(self, grpc_address: str, http_address: str, models: list[str]) -> None:
        self.nodes.join(grpc_address, http_address, models)
        self.refresh()
        log.info("joined the cluster as %s (%s); nodes alive: %s", self.node_id, grpc_address,
                 [n.node_id for n in self.view])

    def refresh(self) -> None:
        self.nodes.beat()
        self.view = self.nodes.live()
        self.pins = self.nodes.pins()
        draining = self.nodes.me is not None and self.nodes.me.state == "draining"
        if draining and not self._draining and self.on_drain is not None:
            log.info("node %s is draining: handing its running generations to their agents' new homes",
                     self.node_id)
            self.on_drain()
        self._draining = draining

    async def run(self, *also) -> None:
        """Heartbeats until cancelled; after each, `also` (blocking callables: what other nodes changed that this
        one must pick up, such as adapters they published)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            for step in (self.refresh, *also):
                try:
                    await loop.run_in_executor(None, step)
                except Exception as e:   # the database is away for a moment: keep the last view, try again
                    log.warning("cluster heartbeat (%s) failed: %s", getattr(step, "__name__", step), e)

    def home(self, agent_id: str) -> Node | None:
        """The node this agent's calls belong on, in this node's current view."""
        up = [n for n in self.view if n.state == "up" and self._unreachable.get(n.node_id) != n.heartbeat]
        pinned = self.pins.get(agent_id)
        return next((n for n in up if n.node_id == pinned), None) or rendezvous(up, agent_id)

    def elsewhere(self, agent_id: str | None) -> Node | None:
        """The node to forward this agent's call to: its home when that is another node (None: serve it here)."""
        home = self.home(agent_id) if agent_id else None
        return None if home is None or home.node_id == self.node_id else home

    def is_home(self, agent_id: str) -> bool:
        """Whether this node is the agent's home (or no node is up to be one)."""
        return self.elsewhere(agent_id) is None

    def trusts(self, presented: str | None) -> bool:
        """Whether a forwarded request's secret is the cluster's (it comes from a node)."""
        return bool(presented) and hmac.compare_digest(presented.encode(), self.secret.encode())

    def node_ids(self) -> list[str]:
        """The nodes alive in this node's current view."""
        return [n.node_id for n in self.view]

    def unreachable(self, node: Node) -> None:
        self._unreachable[node.node_id] = node.heartbeat
        self.served_for_dead += 1

    def nodes_now(self) -> list[Node]:
        """Every node the database knows, with this node's view of who is alive."""
        return self.nodes.all()

    def alive(self, node: Node) -> bool:
        return node.alive(time.time(), self.nodes.lease_s)

    def leave(self) -> None:
        try:
            self.nodes.leave()
        finally:
            self.nodes.close()
