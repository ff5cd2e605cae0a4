"""An agent's control of its running generations: cancel (operators: any), suspend (the KV swapped out, at most
`limits.max_suspended_per_agent`), resume (access decided again), snapshot to disk, and restore a snapshot as
a generation that continues where it stopped."""
from __future__ import annotations

import asyncio
import logging
import uuid

from kernos.abi.errors import StatusError, exhausted, not_found, unavailable

from ...llm.core import LLMCore, ServedModel
from ...llm.types import Finish
from ..generation import Reply
from ..snapshots import SnapshotStore
from .events import Runner
from .request import Requests

log = logging.getLogger("kernos.kernel")


class Control:
    def __init__(self, llm: LLMCore, runner: Runner, requests: Requests, snapshots: SnapshotStore, limits, access,
                 lifecycle):
        self.llm = llm
        self.runner = runner
        self.requests = requests
        self.snapshots = snapshots
        self.limits = limits
        self.access = access
        self.lifecycle = lifecycle
        self.suspended: dict[str, set[str]] = {}            # agent id -> its suspended request ids (may be stale)
        self.handovers: dict[str, asyncio.Future] = {}       # request id -> its snapshot id, handed to another node

    async def hand_over(self, eligible) -> int:
        """A draining node's running generations that `eligible(request id)` (streams the transport can continue
        elsewhere): each snapshotted and shared, so that it continues on its agent's new home with the same
        tokens. The rest finish here. Returns how many were handed over."""
        loop = asyncio.get_running_loop()
        moved = 0
        for rid, (agent, model, _) in list(self.runner.live.items()):
            if rid in self.handovers or not eligible(rid) or not hasattr(model.engine, "checkpoint"):
                continue
            done = self.handovers[rid] = loop.create_future()
            try:
                folder = await asyncio.wrap_future(model.engine.checkpoint(rid, self.snapshots.folder(rid)))
                await asyncio.to_thread(self.snapshots.share, folder.name, agent)
                done.set_result(folder.name)
                moved += 1
            except Exception as e:       # finished meanwhile, or not resumable: it ends here as it would have
                log.info("generation %s stays on this node: %s", rid, e)
                self.handovers.pop(rid, None)
                done.set_result("")
        return moved

    async def restore(self, principal, snapshot_id: str):
        """Continue a snapshotted generation: the same events as `run`."""
        if self.lifecycle.stopping:
            raise unavailable("the kernel is shutting down")
        folder, state = await asyncio.to_thread(self.snapshots.load, snapshot_id, principal.agent_id)
        model = self.llm.get(state["model"])
        if model is None:
            raise not_found(f"snapshot '{snapshot_id}' is of model '{state['model']}', which is not served now")
        req = await asyncio.to_thread(model.engine.snapshot_request, folder, uuid.uuid4().hex)
        # Access is decided again, as for a new request: a grant revoked since the snapshot ends its use.
        if req.adapter and req.adapter not in model.adapters:
            raise not_found(f"snapshot '{snapshot_id}' runs adapter '{req.adapter}', which model '{model.name}' "
                            "no longer serves")
        self.access.authorize_model(principal, model.name, req.adapter or None)
        await self.requests.compile(model, req)

        async def submit(r, handle):
            await asyncio.to_thread(model.engine.restore, folder, r, handle)

        async for ev in self.runner.events(principal, model, req, submit, refuse=True):
            if isinstance(ev, Reply) and ev.finish in (Finish.STOP, Finish.LENGTH, Finish.TOOL_CALLS):
                await asyncio.to_thread(self.snapshots.consume, snapshot_id)  # the snapshot is consumed
            yield ev

    def _entry(self, principal, request_id: str, operators: bool = False):
        entry = self.runner.live.get(request_id)
        if entry is None:
            raise not_found(f"no running generation '{request_id[:64]}' (finished, or never existed)")
        if entry[0] != principal.agent_id and not (operators and principal.operator):
            raise StatusError("PERMISSION_DENIED", f"generation '{request_id}' belongs to another agent")
        return entry

    def _own(self, principal, request_id: str) -> ServedModel:
        return self._entry(principal, request_id)[1]

    async def cancel(self, principal, request_id: str) -> None:
        """End a live generation (its owner's, or any for operators): it finishes as `cancelled` and its
        caller gets what was generated so far (an idle engine notices within half a second)."""
        self._entry(principal, request_id, operators=True)[2].cancel()

    async def _engine_call(self, principal, request_id: str, action: str, *args):
        model = self._own(principal, request_id)
        return await asyncio.wrap_future(getattr(model.engine, action)(request_id, *args))

    async def suspend(self, principal, request_id: str) -> str:
        """Park a live generation (its KV swapped out) until `resume`: at most limits.max_suspended_per_agent an
        agent (16 of one agent once took 3.7 GiB of swap)."""
        self._own(principal, request_id)
        mine = self.suspended.setdefault(principal.agent_id, set())
        mine.intersection_update(self.runner.live)                      # ended ones no longer count
        cap = self.limits.max_suspended_per_agent
        if cap and request_id not in mine and len(mine) >= cap:
            raise exhausted(f"'{principal.agent_id}' keeps {len(mine)} generations suspended, its limit "
                            "(limits.max_suspended_per_agent): resume or cancel one first", 1.0)
        state = await self._engine_call(principal, request_id, "suspend")
        mine.add(request_id)
        return state

    async def resume(self, principal, request_id: str) -> str:
        _, model, handle = self._entry(principal, request_id)
        self.access.authorize_model(principal, model.name, handle.request.adapter or None)   # decided again
        state = await self._engine_call(principal, request_id, "resume")
        self.suspended.get(principal.agent_id, set()).discard(request_id)
        return state

    async def snapshot(self, principal, request_id: str) -> str:
        self._own(principal, request_id)
        await asyncio.to_thread(self.snapshots.check_room, principal.agent_id)
        folder = await self._engine_call(principal, request_id, "checkpoint", self.snapshots.folder(request_id))
        await asyncio.to_thread(self.snapshots.share, folder.name, principal.agent_id)
        return folder.name
