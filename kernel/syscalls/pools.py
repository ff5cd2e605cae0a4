"""Bounded worker pools that share fairly between agents. Storage and memory calls block (fsync, SQLite, Chroma,
embeddings), so they run on threads; on asyncio's one default pool, six heavy embedding calls of one agent held
every thread and made another agent's 1 KB storage write wait 69.8 s. Here each family has its own pool, and an
agent may hold at most `per_owner` of its threads: its further calls wait on the event loop (holding no thread)
behind its own, never in front of anyone else's. The call runs with `OWNER` set to the agent, so the fair
embedder below it knows whose texts it embeds."""
from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

from kernos.memory.fair import OWNER


class FairPool:
    def __init__(self, name: str, workers: int, per_owner: int):
        self.name = name
        self.workers = workers
        self.per_owner = max(1, min(per_owner, workers))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    async def run(self, owner: str, fn, *args):
        """`fn(*args)` on a thread of this pool, as `owner`."""
        slot = self._slots.get(owner)
        if slot is None:
            slot = self._slots[owner] = asyncio.Semaphore(self.per_owner)
        self._users[owner] = self._users.get(owner, 0) + 1
        try:
            async with slot:
                ctx = contextvars.copy_context()
                ctx.run(OWNER.set, owner)
                return await asyncio.get_running_loop().run_in_executor(self._executor, ctx.run, fn, *args)
        finally:
            self._users[owner] -= 1
            if not self._users[owner]:               # forget idle owners: the table stays as small as the load
                del self._users[owner]
                self._slots.pop(owner, None)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
