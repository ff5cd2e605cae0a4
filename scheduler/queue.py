"""The run queue: requests waiting for a place in the running batch, beside the policy that orders them.

New requests arrive from any thread (`put`); the engine's thread moves them in between two steps
(`take_arrivals`), asks the policy which to admit, takes the admitted out, and puts preempted ones back. A
request its agent parked (suspended while it waits on a tool) stays queued but is no candidate. The items are
the engine's own (anything with `.parked` and `.handle.cancelled`); pure Python, no torch."""
from __future__ import annotations

import queue
import threading


class RunQueue:
    def __init__(self, lock: threading.Lock | None = None):
        self._lock = lock or threading.Lock()   # readers on other threads (stats) take it too
        self.items: list = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item) -> None:
        """A new request, from any thread."""
        self._inbox.put(item)

    def take_arrivals(self) -> list:
        """Move what arrived since the last step into the queue (the engine's thread); returns it."""
        moved = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return moved
            self.append(item)
            moved.append(item)

    def arriving(self) -> bool:
        return not self._inbox.empty()

    def append(self, item) -> None:
        with self._lock:
            self.items.append(item)

    def remove(self, item) -> None:
        with self._lock:
            self.items.remove(item)

    def clear(self) -> None:
        with self._lock:
            self.items = []

    def candidates(self) -> list:
        """What the policy may admit: everything queued but what its agent parked."""
        return [x for x in self.items if not x.parked]

    def take_cancelled(self) -> list:
        """Take out and return the queued requests whose callers cancelled them."""
        gone = [x for x in self.items if x.handle.cancelled]
        for x in gone:
            self.remove(x)
        return gone

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)
