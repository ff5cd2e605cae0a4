"""Context switching on the own engine: preempt a running sequence (its cache swapped out, or dropped to be
recomputed, as the cost model picks) and resume it exactly; an agent's suspend and resume (a sequence parked
while its agent waits on a tool); a snapshot of a request's whole state to disk and its restore, in this
kernel or after a restart. Mixed into `TransformersEngine` (`loop.py`), whose thread runs all of it."""
from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import torch

from ..types import EngineClosed, Finish, GenRequest, RequestHandle
from . import cache as cache_ops
from . import snapshot as snapshot_format
from .sequence import Sequence


class ContextSwitching:
    def suspend(self, request_id: str) -> Future:
        """Preempt a request and keep it out of scheduling until `resume` (an agent waiting on a tool)."""
        def do():
            seq = self._find(request_id)
            if seq.state == "running":
                self.preempt(seq, "suspended")
            elif seq.state == "prefilling":
                self._abort_prefill(seq)
            seq.parked = True
            return seq.state
        return self.call(do)

    def resume(self, request_id: str) -> Future:
        def do():
            seq = self._find(request_id)
            seq.parked = False
            seq.enqueued = time.monotonic()
            return seq.state
        return self.call(do)

    def checkpoint(self, request_id: str, directory: Path) -> Future:
        """Write a request's whole state (tokens, position, sampling generator, cache) to `directory` and
        release it: its handle gets a Final with finish SNAPSHOT. `restore` continues it, in this kernel
        or after a restart, with exactly the tokens an uninterrupted run would have produced."""
        def do():
            seq = self._find(request_id)
            if seq.state == "running":
                self.preempt(seq, "snapshot", "swap")
            elif seq.state == "prefilling":
                self._abort_prefill(seq)
            self.waiting.remove(seq)
            past = self.swap.take(seq, self.runner.template) if self.swap.holds(seq) else None
            snapshot_format.write(directory, seq, self.name, past)
            self._finish(seq, Finish.SNAPSHOT, snapshot_id=directory.name)
            return directory
        return self.call(do)

    def restore(self, directory: Path, request: GenRequest, handle: RequestHandle) -> None:
        """Continue a checkpointed request (see `checkpoint`) as `request`, whose id and arrival are new;
        the rest of its fields must come from the snapshot (`snapshot_request`)."""
        seq = Sequence(request, handle, self.lm.tokenizer, self.lm.eos_ids)
        snapshot_format.resume_into(seq, directory)
        if not self._accepting:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        self.waiting.put(seq)
        self._wake.set()

    @staticmethod
    def snapshot_request(directory: Path, request_id: str) -> GenRequest:
        return snapshot_format.request(directory, request_id)

    def choose_strategy(self, seq: Sequence) -> str:
        return self.costs.choose(seq.position, self.cache_bytes_for(seq.position))

    def preempt(self, seq: Sequence, reason: str, strategy: str | None = None) -> None:
        """Take a running sequence out of the batch: its cache swapped out, or dropped to recompute."""
        t0 = time.perf_counter()
        strategy = strategy or self.choose_strategy(seq)
        moved = 0
        if strategy == "swap":
            saved = self.batch.extract(seq)
            moved = cache_ops.nbytes(saved)
            if self.lm.device.type != "cpu":
                saved = cache_ops.to_device(saved, "cpu")
            self.swap.put(seq, saved)
        self.batch.remove([self.rows.index(seq)])
        seq.state = "preempted"
        seq.enqueued = time.monotonic()
        seq.quantum_steps = 0
        seq.preemptions += 1
        self.waiting.append(seq)
        dt = time.perf_counter() - t0
        self.costs.observe_swap(moved, dt)
        self.stats.context_switches += 1
        self.stats.switch_seconds += dt
        self.stats.preempted_by_reason[reason] = self.stats.preempted_by_reason.get(reason, 0) + 1
        self.stats.strategy_counts[strategy] = self.stats.strategy_counts.get(strategy, 0) + 1

    def _resume(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        seq.admitted_at = seq.admitted_at or time.monotonic()  # a restored snapshot's first admission
        if self.swap.holds(seq):
            past = self.swap.take(seq, self.runner.template)
            past = cache_ops.to_device(past, self.lm.device) if self.lm.device.type != "cpu" else past
        else:  # recompute: the cache held every token before the pending one
            past = self._run_prefill(seq.req.prompt_ids + seq.ids[:-1], seq.req.adapter)[1]
        mask = torch.ones((1, seq.position), dtype=torch.long, device=self.lm.device)
        self._join(seq, past, mask)
        self.stats.switch_seconds += time.perf_counter() - t0
