"""Embeddings shared fairly between agents. One model, one forward at a time (it takes both cores anyway), so
the order of work is what decides a bystander's latency: six concurrent /v1/embeddings calls of one agent (384
texts x 1,900 characters each) made another agent's memory search wait 63 s at p50 and 357 s at worst, all of
them queued on one lock in arrival order.

Here every call is cut into chunks of a few texts, queued under its owner, and one worker thread takes the
owners in turn, a chunk each: an agent's heavy calls queue behind its own, and anyone else's next chunk runs
after at most one chunk of each busy owner. The owner is a context variable that the kernel's syscalls set
(`OWNER`), so the memory code below them needs no new parameters."""
from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future

from kernos.abi.errors import StatusError

OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("kernos_owner", default="kernel")


def as_owner(owner: str, fn):
    """`fn` wrapped to run with OWNER set to `owner` (for work handed to a thread)."""
    def run():
        token = OWNER.set(owner)
        try:
            return fn()
        finally:
            OWNER.reset(token)
    return run


class EmbedderBusy(StatusError):
    """An owner has too many texts waiting (RESOURCE_EXHAUSTED, with a guess of when there is room)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__("RESOURCE_EXHAUSTED", message, retry_after_s)


class FairEmbedder:
    def __init__(self, embedder, chunk: int = 4, max_pending_per_owner: int = 4096):
        self.embedder = embedder
        self.dim = getattr(embedder, "dim", 0)
        self.chunk = chunk
        self.max_pending = max_pending_per_owner
        self._queues: OrderedDict[str, deque] = OrderedDict()   # owner -> [(texts, future)], in turn order
        self._pending: dict[str, int] = {}                      # owner -> texts waiting or running
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self.seconds_per_text = 0.01                            # measured as it runs: the retry hint

    def __call__(self, texts: list[str]) -> list[list[float]]:
        owner = OWNER.get()
        chunks = [texts[i:i + self.chunk] for i in range(0, len(texts), self.chunk)]
        futures = []
        with self._cv:
            waiting = self._pending.get(owner, 0)
            if waiting + len(texts) > self.max_pending:
                raise EmbedderBusy(f"'{owner}' has {waiting} texts waiting to be embedded; the limit is "
                                   f"{self.max_pending}", max(1.0, waiting * self.seconds_per_text))
            self._pending[owner] = waiting + len(texts)
            queue = self._queues.setdefault(owner, deque())
            for c in chunks:
                f: Future = Future()
                queue.append((owner, c, f))
                futures.append(f)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="embedder", daemon=True)
                self._worker.start()
            self._cv.notify()
        out: list[list[float]] = []
        for f in futures:
            out.extend(f.result())
        return out

    def _next(self):
        """The first owner's next chunk; that owner goes to the back of the turn order."""
        with self._cv:
            while not self._queues:
                self._cv.wait()
            owner, queue = next(iter(self._queues.items()))
            item = queue.popleft()
            del self._queues[owner]
            if queue:
                self._queues[owner] = queue
            return item

    def _run(self) -> None:
        import time

        while True:
            owner, texts, future = self._next()
            t0 = time.perf_counter()
            try:
                future.set_result(self.embedder(texts))
            except BaseException as e:   # noqa: BLE001 - the caller gets it, the worker goes on
                future.set_exception(e)
            self.seconds_per_text = 0.9 * self.seconds_per_text + 0.1 * (time.perf_counter() - t0) / len(texts)
            with self._cv:
                left = self._pending.get(owner, 0) - len(texts)
                if left > 0:
                    self._pending[owner] = left
                else:
                    self._pending.pop(owner, None)
