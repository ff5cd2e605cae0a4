"""Continuous batching at the iteration level, with preemption and exact resume.

One engine owns one model and one thread. Between two decode steps the engine asks its scheduling
policy which waiting requests to start or resume and which running ones to preempt, then:

- a new request is prefilled on its own (exact for every architecture, Mamba layers included) and its
  cache is appended to the running batch's, left-padded to a common length;
- a finished or preempted row leaves the batch, and columns that are padding in every row are trimmed;
- a preempted sequence keeps its tokens, its position and its sampling generator, and either **swaps**
  its cache out (a copy in host memory, or on disk beyond a host budget) or drops it to **recompute** it
  by re-prefilling its tokens on resume. A cost model picks per sequence: bytes to copy against tokens to
  prefill, each priced from what this engine has measured. Jamba's Mamba state is constant-size, so
  hybrid models swap cheaply where long attention contexts recompute.

Every row keeps its own positions, generator, adapter, sampling fields and stop conditions: a sequence preempted
any number of times produces the tokens of an uninterrupted run.

The loop and the public interface live here; prefill (with the resident cache) is `prefill.py`, context switching
`switching.py`, the run queue `kernos.scheduler`'s; collaborators: `sequence.py`, `batch.py`, `runner.py` (with
`adapters.py`), `swap.py` (swap space, cost model), `snapshot.py`, `detokenizer.py`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from kernos.abi.errors import StatusError
from kernos.scheduler import Budget, FifoPolicy, Policy, RequestView, RunQueue

from ..base import ALL_SHAPING, Engine, EngineStats
from ..registry import LoadedModel
from ..sampling import greedy_tokens
from ..types import EngineClosed, Failed, Finish, GenRequest, RequestHandle, RequestTooLarge
from .batch import RunningBatch
from .drafting import Drafting
from .prefill import Prefill
from .resident import ResidentCache
from .runner import Chunking, ModelRunner
from .sequence import Sequence
from .swap import CostModel, ResidentSwap, SwapSpace
from .switching import ContextSwitching

log = logging.getLogger("kernos.llm")


class TransformersEngine(Prefill, ContextSwitching, Drafting, Engine):
    shaping = ALL_SHAPING      # every sampling field (kernos.kernel.llm.types.Shaping)
    scores = True

    def __init__(self, lm: LoadedModel, max_batch_size: int = 16, policy: Policy | None = None,
                 max_tokens_in_flight: int = 0, cache_budget_bytes: int = 0, preemption: str = "auto",
                 swap_host_bytes: int = 4 << 30, swap_dir: Path | None = None, resident_bytes: int = 0,
                 resident_ttl_s: float = 600.0, prefill_chunk: int = 0, pause_max_s: float = 120.0,
                 prefill_per_step: int = 256, prefill_step_s: float = 0.0, prefill_shrink_from: int = 0,
                 prompt_lookup: int = 0):
        self.runner = ModelRunner(lm)
        self.costs = CostModel(preemption, exact_recompute=self.runner.exact_recompute)
        self.lm = lm
        self.name = lm.name
        self.max_batch_size = max_batch_size
        self.policy = policy or FifoPolicy()
        self.budget = Budget(max_batch_size, max_tokens_in_flight, cache_budget_bytes)
        self.stats = EngineStats()
        self.swap = SwapSpace(swap_host_bytes, swap_dir)
        # 0: 128. A forward pays per chunk: transformers' (a 768-token prompt of the embedded model in float32: 135
        # tokens/s in chunks of 32, 202 of 128, 220 of 256) and the own kernels' (its 46-token chat prompt in bf16:
        # 84 ms in chunks of 32, 68 ms in one; with AMX 44 and 31 ms; the tool workload of benchmarks/agentic.py
        # with AMX: jobs done in 53 s with chunks of 32, 44 s with 128)
        self.prefill_chunk = prefill_chunk or 128
        self.chunking = Chunking(self.prefill_chunk, prefill_shrink_from)
        self.pause_max_s = pause_max_s
        self.lookup_tokens = prompt_lookup         # most tokens a lone row drafts a step (drafting.py); 0: none
        self.prefill_per_step = prefill_per_step    # prompt tokens between two decode steps (0: admitted ones whole)
        self.prefill_step_s = prefill_step_s        # ... and the time they may take (0: no limit; one chunk at least)
        self.prefilling: list[Sequence] = []        # admitted, their prompts a few chunks a step (prefill.py)
        self.resident = ResidentCache(resident_bytes, resident_ttl_s, lm.architecture == "hybrid", self.chunking,
                                      ResidentSwap(self) if swap_dir is not None else None)
        self._lock = threading.Lock()  # guards waiting and the batch's rows for snapshot()
        self.batch = RunningBatch(self._lock)
        self.waiting = RunQueue(self._lock)   # new, preempted and parked sequences, in kernos.scheduler
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._shared: dict[str, list] = {}   # group -> [logits, cache, mask, siblings still to prefill]
        self._thread: threading.Thread | None = None
        # Measured on the engine's own thread: a forward pass on another thread first (this constructor runs
        # on the main one) leaves two OpenMP pools competing and made every decode step 3x slower on CPU.
        self._measured = threading.Event()
        self.bytes_per_token = self.fixed_bytes = 0

    @property
    def rows(self) -> list[Sequence]:
        return self.batch.rows

    @property
    def active(self) -> list[Sequence]:
        """Admitted sequences: the batch's rows and the prompts being prefilled."""
        return self.batch.rows + self.prefilling

    # -- public ------------------------------------------------------------------------------------------
    def submit(self, request: GenRequest, handle: RequestHandle) -> None:
        if not self._accepting:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        self._ensure_measured()
        need = self.cache_bytes_for(len(request.prompt_ids) + request.max_tokens)
        if self.budget.cache_bytes and need > self.budget.cache_bytes:
            raise RequestTooLarge(
                f"this request needs up to {need} bytes of cache ({len(request.prompt_ids)} prompt + "
                f"{request.max_tokens} new tokens); the model's cache budget is {self.budget.cache_bytes} bytes")
        self.waiting.put(Sequence(request, handle, self.lm.tokenizer, self.lm.eos_ids))
        self._wake.set()

    def call(self, fn) -> Future:
        """Run `fn()` on the engine thread between two steps; the future carries its result."""
        fut: Future = Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def pause(self, request_id: str, program_id: str, ttl_s: float) -> None:
        """Pin what the call computed (its prompt's KV; on the own kernels its reply's too) for its program's
        follow-up, `ttl_s` seconds at most (the resident cache's own TTL bounds it); between two steps."""
        ttl = min(ttl_s, self.pause_max_s, self.resident.ttl_s)

        def pin():
            self.resident.pin(request_id, program_id, ttl)
            if any(s.req.program_id == program_id for s in self.waiting):     # its follow-up came first
                self.resident.hold(program_id)
        if self.resident.enabled and ttl > 0:
            self.call(pin)

    def load_adapter(self, name: str, folder: Path) -> Future:
        """Load (or replace) a peft adapter into the served model, on the engine thread between two steps,
        so running requests never see a half-loaded model."""
        def do():
            in_use = {"running": {s.req.adapter for s in self.active},
                      "all": {s.req.adapter for s in self.active + list(self.waiting)}}
            exact = self.runner.position_exact
            loaded = self.runner.adapters.load(name, folder, in_use)
            self.resident.drop_adapter(name)        # computed by the adapter's previous weights
            if exact and not self.runner.position_exact:
                self.resident.clear()   # the base model now runs transformers' forward, which rounds differently
            return loaded
        return self.call(do)

    @property
    def policy_name(self) -> str:
        return self.policy.name

    @property
    def cache_budget_bytes(self) -> int:
        return self.budget.cache_bytes

    def cache_bytes_for(self, tokens: int) -> int:
        return self.fixed_bytes + self.bytes_per_token * tokens

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        self._accepting = False
        for s in list(self.waiting):  # a suspended request would wait forever
            s.parked = False
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.rows or self.prefilling or self.waiting or self.waiting.arriving()):
            time.sleep(0.02)
        clean = not (self.rows or self.prefilling or self.waiting or self.waiting.arriving())
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._cancel_all()
        return clean

    def snapshot(self):
        with self._lock:
            live = [(self._view(s), "running") for s in self.active]
            live += [(self._view(s), "suspended" if s.parked else s.state) for s in self.waiting]
            self.stats.running, self.stats.waiting = len(self.rows), len(self.waiting)
            self.resident.report(self.stats)
        return self.stats, live

    # -- the loop: take work, schedule, run the batch one token, update ------------------------------------
    def _ensure_measured(self) -> None:
        if self._measured.is_set():
            return
        if self._thread is not None and self._thread is not threading.current_thread():
            self._measured.wait(60)
            return
        self.bytes_per_token, self.fixed_bytes = self.runner.measure_cache_size()
        self._measured.set()

    def _run(self) -> None:
        with torch.inference_mode():
            self._ensure_measured()
            while not self._stop:
                if not self.step():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            self._cancel_all()

    def step(self) -> bool:
        """One iteration: take new requests and commands, schedule, decode one token for the batch.
        Returns whether there is work left (the thread sleeps otherwise)."""
        with torch.inference_mode():
            self._ensure_measured()
            self._take_new_work()
            try:
                self._drop_cancelled()
                self._schedule()
                if self.prefilling:
                    self._advance_prefills()
                if self.rows:
                    self._decode_step()
            except Exception as e:  # a broken batch must not take the kernel down
                log.exception("engine %s: step failed", self.name)
                self._fail_all(f"internal error in model '{self.name}': {type(e).__name__}: {e}")
        return bool(self.rows or self.prefilling) or any(not s.parked for s in self.waiting)

    def _take_new_work(self) -> None:
        for s in self.waiting.take_arrivals():
            if s.req.program_id and self.resident.entries:   # back from a tool pause: held until it is admitted
                self.resident.hold(s.req.program_id)
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _find(self, request_id: str) -> Sequence:
        for s in self.active + list(self.waiting):
            if s.req.request_id == request_id:
                return s
        raise StatusError("NOT_FOUND", f"generation '{request_id}' has already finished")

    def _drop_cancelled(self) -> None:
        for s in self.waiting.take_cancelled():
            self.swap.release(s)
            self._finish(s, Finish.CANCELLED)
        for s in [s for s in self.prefilling if s.handle.cancelled]:
            self._abort_prefill(s, requeue=False)
            self._finish(s, Finish.CANCELLED)
        rows = [i for i, s in enumerate(self.rows) if s.handle.cancelled]
        if rows:
            for i in rows:
                self._finish(self.rows[i], Finish.CANCELLED)
            self.batch.remove(rows)

    def _view(self, s: Sequence) -> RequestView:
        r = s.req
        held = s.position if s.started else len(r.prompt_ids)
        return RequestView(r.request_id, r.agent_id, r.priority, r.arrival, len(r.prompt_ids), r.max_tokens,
                           len(s.ids), s.enqueued, s.quantum_steps, self.cache_bytes_for(held + 1), s.preemptions,
                           s.first_token_at, *r.program_fields())

    def _over_budget(self) -> bool:
        if not self.budget.cache_bytes:
            return False
        held = self.fixed_bytes * len(self.rows) + self.bytes_per_token * sum(s.position + 1 for s in self.rows)
        return held > self.budget.cache_bytes

    def _schedule(self) -> None:
        candidates = self.waiting.candidates()
        if self.resident.entries:
            self._fit_resident(candidates)
        if not candidates and not self._over_budget():
            return  # the common decode step: nothing to admit, nothing to evict
        active = self.active
        views = {s.req.request_id: s for s in candidates + active}
        decision = self.policy.schedule([self._view(s) for s in candidates], [self._view(s) for s in active],
                                        self.budget)
        for rid, reason in decision.preempt:
            if views[rid].state == "running":
                self.preempt(views[rid], reason)
            elif views[rid].state == "prefilling":
                self._abort_prefill(views[rid])
        for rid in decision.admit:
            seq = views[rid]
            if not self.runner.adapters.batchable(self.active, seq):   # the rows as admitted so far
                continue                      # waits until the batch holds only its adapter (or drains)
            self.waiting.remove(seq)
            try:
                self._resume(seq) if seq.started else self._prefill(seq)
            except Exception as e:  # this request's failure: answer it, keep the batch going
                log.exception("engine %s: admitting %s failed", self.name, seq.req.request_id)
                seq.handle.put(Failed(f"internal error in model '{self.name}': {type(e).__name__}: {e}"))

    def _join(self, seq: Sequence, past, mask) -> None:
        self.batch.join(seq, past, mask)
        self.stats.cache_bytes = self.batch.nbytes()

    def _decode_step(self) -> None:
        rows = self.rows
        draft = self._draft(rows[0]) if self.lookup_tokens else None
        if draft:
            return self._verify_step(rows[0], draft)
        t0 = time.perf_counter()
        logits = self.runner.decode(self.batch)
        self.costs.observe_decode(len(rows), time.perf_counter() - t0)
        greedy = greedy_tokens(logits, [i for i, s in enumerate(rows) if s.plain_greedy])
        done = []
        for i, s in enumerate(rows):
            _, end = self._take(s, logits[i], greedy.get(i))
            if end is not None:
                self._end(s, end)
                done.append(i)
        self.stats.decode_steps += 1
        self.stats.batch_rows += len(rows)
        self._count_tokens(rows, time.monotonic())
        if done:
            self.batch.remove(done)
        self.stats.cache_bytes = self.batch.nbytes()

    def _take(self, s: Sequence, logits, tok: int | None = None):
        """Row `s`'s next token (`tok` when already chosen, else picked from its `logits`), added to it:
        (token, end), where end is None while the row goes on, its Finish, or the exception its sampling or
        grammar raised (the row ends alone; the batch goes on)."""
        s.position += 1
        s.quantum_steps += 1
        try:
            tok = s.pick(logits) if tok is None else tok
            return tok, s.add_token(tok)
        except Exception as e:
            return None, e

    def _end(self, s: Sequence, end) -> None:
        """A row that `_take` ended leaves the batch's work: failed, or kept resident and finished (the caller
        removes its row once its cache is as it should stay)."""
        if isinstance(end, Exception):
            log.warning("engine %s: request %s failed: %s: %s", self.name, s.req.request_id, type(end).__name__, end)
            self._fail(s, f"generation failed in model '{self.name}': {type(end).__name__}: {end}")
        else:
            self._keep_resident(s)
            self._finish(s, end)

    def _count_tokens(self, seqs: list[Sequence], now: float, each: int = 1) -> None:
        for s in seqs:
            if s.req.program is not None:
                s.req.program.computed(each)
        self.stats.generated_tokens += len(seqs) * each
        self.stats.recent.append((now, len(seqs) * each))
        self.policy.decoded((s.req.agent_id for s in seqs for _ in range(each)), now)   # the policy's accounting

    # -- endings -----------------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, finish: Finish, snapshot_id: str = "") -> None:
        if not seq.started and seq.req.group in self._shared:    # a sibling that will never take its copy
            shared = self._shared[seq.req.group]
            shared[3] -= 1
            if shared[3] <= 0:
                del self._shared[seq.req.group]
        seq.finish(finish, snapshot_id)
        self.stats.completed += 1
        if finish == Finish.CANCELLED:
            self.stats.cancelled += 1

    def _cancel_all(self) -> None:
        for s in self.active + list(self.waiting):
            self.swap.release(s)
            self._finish(s, Finish.CANCELLED)
        self.waiting.clear()
        self.prefilling.clear()
        self.batch.clear()

    def _fail(self, seq: Sequence, message: str) -> None:
        """End one sequence with an error (its handle gets Failed); the caller takes it out of the batch."""
        seq.handle.put(Failed(message))
        self.stats.completed += 1

    def _fail_all(self, message: str) -> None:
        for s in self.active:
            s.handle.put(Failed(message))
        self.prefilling.clear()
        self.batch.clear()
