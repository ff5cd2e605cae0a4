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

Every row keeps its own positions, generator, adapter and stop conditions, so a sequence preempted any
number of times produces the tokens of an uninterrupted run.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from kernos.scheduler import Budget, FifoPolicy, Policy, RequestView

from . import cache as cache_ops
from .base import Engine, EngineStats
from .registry import LoadedModel, peft_name
from .sampling import choose, make_generator
from .types import AdapterInUse, EngineClosed, Failed, Final, Finish, GenRequest, RequestHandle, RequestTooLarge, TextDelta

log = logging.getLogger("kernos.llm")


class _Seq:
    __slots__ = ("req", "handle", "gen", "ids", "pending", "position", "emitted", "text", "admitted_at",
                 "first_token_at", "state", "enqueued", "quantum_steps", "swapped", "swap_path", "preemptions",
                 "parked", "keep_swap_file")

    def __init__(self, req: GenRequest, handle: RequestHandle):
        self.req = req
        self.handle = handle
        self.gen = make_generator(req.seed)
        self.ids: list[int] = []
        self.pending = -1          # last sampled token, fed in the next step
        self.position = 0          # position of `pending` = tokens held in the cache
        self.emitted = 0           # chars of `text` already streamed
        self.text = ""
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.state = "waiting"     # waiting | running | preempted
        self.enqueued = req.arrival
        self.quantum_steps = 0
        self.swapped = None        # the cache of a swapped-out sequence (host memory)
        self.swap_path: Path | None = None  # ... or its file, beyond the host budget
        self.preemptions = 0
        self.parked = False        # suspended by its agent: not scheduled until resumed
        self.keep_swap_file = False  # a snapshot's cache file: restored from, not consumed

    @property
    def started(self) -> bool:
        return self.pending >= 0


def _adapts_parameters(peft_config) -> bool:
    """Does this LoRA adapt parameters (fused MoE experts) rather than only Linear layers? peft cannot route
    such an adapter per row of a batch."""
    return bool(getattr(peft_config, "target_parameters", None))


class TransformersEngine(Engine):
    def __init__(self, lm: LoadedModel, max_batch_size: int = 16, policy: Policy | None = None,
                 max_tokens_in_flight: int = 0, cache_budget_bytes: int = 0, preemption: str = "auto",
                 swap_host_bytes: int = 4 << 30, swap_dir: Path | None = None):
        if preemption not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption must be auto, swap or recompute, got {preemption!r}")
        self.lm = lm
        self.name = lm.name
        self.max_batch_size = max_batch_size
        self.policy = policy or FifoPolicy()
        self.budget = Budget(max_batch_size, max_tokens_in_flight, cache_budget_bytes)
        self.preemption = preemption
        self.swap_host_bytes = swap_host_bytes
        self.swap_dir = swap_dir
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards waiting/rows for snapshot()
        self.waiting: list[_Seq] = []
        self.rows: list[_Seq] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._host_swap_bytes = 0
        base = lm.model.get_base_model() if lm.has_adapters else lm.model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(type(base).forward).parameters
        self._active = lm.adapters[0] if lm.adapters else None   # peft's active adapter
        self._unbatchable = {a for a in lm.adapters if _adapts_parameters(lm.model.peft_config[peft_name(a)])}
        self._template = None      # any cache of this model: the shape to rebuild swapped-in caches from
        # Measured on the engine's own thread: a forward pass on another thread first (this constructor runs
        # on the main one) leaves two OpenMP pools competing and made every decode step 3x slower on CPU.
        self._measured = threading.Event()
        self.bytes_per_token = self.fixed_bytes = 0
        # Cost model prices, refined from measurements: seconds per prefilled token, bytes per second copied.
        self.prefill_s_per_token = 1e-3
        self.swap_bytes_per_s = 2e9

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
        self._inbox.put(_Seq(request, handle))
        self._wake.set()

    def call(self, fn) -> Future:
        """Run `fn()` on the engine thread between two steps; the future carries its result."""
        fut: Future = Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def load_adapter(self, name: str, folder: Path) -> Future:
        """Load (or replace) a peft adapter into the served model, on the engine thread between two steps,
        so running requests never see a half-loaded model. The first adapter wraps the model in peft."""
        def do():
            from peft import PeftConfig, PeftModel

            internal = peft_name(name)
            expert = _adapts_parameters(PeftConfig.from_pretrained(folder))
            if expert and len({s.req.adapter for s in self.rows}) > 1:
                raise AdapterInUse(f"adapter '{name}' cannot join the running mixed-adapter batch; try again")
            if not self.lm.has_adapters:
                self.lm.model = PeftModel.from_pretrained(self.lm.model, folder, adapter_name=internal,
                                                          is_trainable=False)
                self._active = name
            else:
                if name in self.lm.adapters:
                    if any(s.req.adapter == name for s in self.rows + self.waiting):
                        raise AdapterInUse(f"adapter '{name}' is in use by running requests; try again")
                    self.lm.model.delete_adapter(internal)
                    if self._active == name:
                        self._active = None
                self.lm.model.load_adapter(folder, adapter_name=internal, is_trainable=False)
            self.lm.model.eval()
            if name not in self.lm.adapters:
                self.lm.adapters.append(name)
            if expert:
                self._unbatchable.add(name)
            else:
                self._unbatchable.discard(name)
            return list(self.lm.adapters)
        return self.call(do)

    def suspend(self, request_id: str) -> Future:
        """Preempt a request and keep it out of scheduling until `resume` (an agent waiting on a tool)."""
        def do():
            seq = self._find(request_id)
            if seq.state == "running":
                self._preempt(seq, "suspended")
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
                self._preempt(seq, "snapshot", "swap")
            with self._lock:
                self.waiting.remove(seq)
            tmp = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            past = self._read_swap(seq) if (seq.swapped is not None or seq.swap_path is not None) else None
            if past is not None:
                self._save_cache(past, tmp / "cache.safetensors")
            r = seq.req
            state = {"request_id": r.request_id, "agent_id": r.agent_id, "model": self.name,
                     "prompt_ids": r.prompt_ids, "max_tokens": r.max_tokens, "temperature": r.temperature,
                     "top_p": r.top_p, "top_k": r.top_k, "stop": r.stop, "seed": r.seed, "adapter": r.adapter,
                     "priority": r.priority, "ids": seq.ids, "pending": seq.pending, "position": seq.position,
                     "emitted": len(seq.text), "preemptions": seq.preemptions, "has_cache": past is not None,
                     "generator": seq.gen.get_state().tolist()}
            (tmp / "state.json").write_text(json.dumps(state))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
            self._finish(seq, Finish.SNAPSHOT, snapshot_id=directory.name)
            return directory
        return self.call(do)

    def restore(self, directory: Path, request: GenRequest, handle: RequestHandle) -> None:
        """Continue a checkpointed request (see `checkpoint`) as `request`, whose id and arrival are new;
        the rest of its fields must come from the snapshot (`snapshot_request`)."""
        state = json.loads((directory / "state.json").read_text())
        seq = _Seq(request, handle)
        seq.gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        seq.ids, seq.pending, seq.position = list(state["ids"]), state["pending"], state["position"]
        seq.text = self.lm.tokenizer.decode(seq.ids, skip_special_tokens=True)
        seq.emitted, seq.preemptions, seq.state = state["emitted"], state["preemptions"], "preempted"
        if state["has_cache"]:
            seq.swap_path, seq.keep_swap_file = directory / "cache.safetensors", True
        if not self._accepting:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        self._inbox.put(seq)
        self._wake.set()

    @staticmethod
    def snapshot_request(directory: Path, request_id: str) -> GenRequest:
        st = json.loads((directory / "state.json").read_text())
        return GenRequest(request_id=request_id, agent_id=st["agent_id"], prompt_ids=st["prompt_ids"],
                          max_tokens=st["max_tokens"], temperature=st["temperature"], top_p=st["top_p"],
                          top_k=st["top_k"], stop=st["stop"], seed=st["seed"], adapter=st["adapter"],
                          priority=st["priority"])

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
        while time.monotonic() < deadline and (self.rows or self.waiting or not self._inbox.empty()):
            time.sleep(0.02)
        clean = not (self.rows or self.waiting or not self._inbox.empty())
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._cancel_all()
        return clean

    def snapshot(self):
        with self._lock:
            live = [(self._view(s), "running") for s in self.rows]
            live += [(self._view(s), "suspended" if s.parked else s.state) for s in self.waiting]
            self.stats.running, self.stats.waiting = len(self.rows), len(self.waiting)
        return self.stats, live

    # -- the loop ----------------------------------------------------------------------------------------
    def _ensure_measured(self) -> None:
        if self._measured.is_set():
            return
        if self._thread is not None and self._thread is not threading.current_thread():
            self._measured.wait(60)
            return
        self.bytes_per_token, self.fixed_bytes = self._measure_cache_size()
        self._measured.set()

    def _run(self) -> None:
        with torch.inference_mode():
            self._ensure_measured()
            while not self._stop:
                busy = self.step()
                if not busy:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            self._cancel_all()

    def step(self) -> bool:
        """One iteration: take new requests and commands, schedule, decode one token for the batch.
        Returns whether there is work left (the thread sleeps otherwise)."""
        with torch.inference_mode():
            self._ensure_measured()
            self._pull_inbox()
            self._run_commands()
            try:
                self._drop_cancelled()
                self._schedule()
                if self.rows:
                    self._decode_step()
            except Exception as e:  # a broken batch must not take the kernel down
                log.exception("engine %s: step failed", self.name)
                self._fail_all(f"internal error in model '{self.name}': {type(e).__name__}: {e}")
        return bool(self.rows) or any(not s.parked for s in self.waiting)

    def _pull_inbox(self) -> None:
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self.waiting.append(seq)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)

    def _find(self, request_id: str) -> _Seq:
        for s in self.rows + self.waiting:
            if s.req.request_id == request_id:
                return s
        raise KeyError(request_id)

    def _drop_cancelled(self) -> None:
        for s in [s for s in self.waiting if s.handle.cancelled]:
            with self._lock:
                self.waiting.remove(s)
            self._release_swap(s)
            self._finish(s, Finish.CANCELLED)
        rows = [i for i, s in enumerate(self.rows) if s.handle.cancelled]
        if rows:
            for i in rows:
                self._finish(self.rows[i], Finish.CANCELLED)
            self._remove_rows(rows)

    def _view(self, s: _Seq) -> RequestView:
        r = s.req
        held = s.position if s.started else len(r.prompt_ids)
        return RequestView(r.request_id, r.agent_id, r.priority, r.arrival, len(r.prompt_ids), r.max_tokens,
                           len(s.ids), s.enqueued, s.quantum_steps, self.cache_bytes_for(held + 1), s.preemptions)

    def _schedule(self) -> None:
        candidates = [s for s in self.waiting if not s.parked]
        if not candidates and not self._over_budget():
            return  # the common decode step: nothing to admit, nothing to evict
        views = {s.req.request_id: s for s in candidates + self.rows}
        decision = self.policy.schedule([self._view(s) for s in candidates], [self._view(s) for s in self.rows],
                                        self.budget)
        for rid, reason in decision.preempt:
            if views[rid].state == "running":
                self._preempt(views[rid], reason)
        for rid in decision.admit:
            seq = views[rid]
            if not self._batchable_with(seq):
                continue                      # waits until the batch holds only its adapter (or drains)
            with self._lock:
                self.waiting.remove(seq)
            try:
                if seq.started:
                    self._resume(seq)
                else:
                    self._prefill(seq)
            except Exception as e:  # this request's failure: answer it, keep the batch going
                log.exception("engine %s: admitting %s failed", self.name, seq.req.request_id)
                seq.handle.put(Failed(f"internal error in model '{self.name}': {type(e).__name__}: {e}"))

    def _batchable_with(self, seq: _Seq) -> bool:
        """peft cannot mix adapters in one batch when one of them adapts fused MoE expert weights
        (`target_parameters`); such an adapter runs only with rows of the same adapter."""
        if not self._unbatchable or not self.rows:
            return True
        adapters = {s.req.adapter for s in self.rows} | {seq.req.adapter}
        return len(adapters) == 1 or not (adapters & self._unbatchable)

    # -- model calls -------------------------------------------------------------------------------------
    def _forward(self, input_ids, mask, positions, past, adapters: list[str | None], last_only: bool):
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                      use_cache=True)
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if not self.lm.has_adapters:
            return self.lm.model(**kwargs)
        if not self._unbatchable:
            kwargs["adapter_names"] = [peft_name(a) if a else "__base__" for a in adapters]
            return self.lm.model(**kwargs)
        # An expert adapter is loaded: peft refuses per-row routing, and _batchable_with keeps each batch
        # to one adapter, so switch the model's active adapter (or disable adapters) instead.
        (adapter,) = set(adapters)
        if adapter is None:
            with self.lm.model.disable_adapter():
                return self.lm.model(**kwargs)
        if self._active != adapter:
            self.lm.model.set_adapter(peft_name(adapter))   # walks every module: only on a change
            self._active = adapter
        return self.lm.model(**kwargs)

    def _prefill_tokens(self, tokens: list[int], adapter: str | None):
        dev = self.lm.device
        ids = torch.tensor([tokens], dtype=torch.long, device=dev)
        mask = torch.ones_like(ids)
        pos = torch.arange(len(tokens), device=dev).unsqueeze(0)
        t0 = time.perf_counter()
        out = self._forward(ids, mask, pos, None, [adapter], last_only=True)
        if len(tokens) >= 8:  # short prefills are dominated by fixed costs; they would skew the price
            spt = (time.perf_counter() - t0) / len(tokens)
            self.prefill_s_per_token = 0.8 * self.prefill_s_per_token + 0.2 * spt
        self.stats.prompt_tokens += len(tokens)
        if self._template is None:
            self._template = out.past_key_values
        return out, mask

    def _join(self, seq: _Seq, past, mask) -> None:
        if self._cache is None:
            self._cache, self._mask = past, mask
        else:
            cache_ops.concat(self._cache, past)
            length = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([cache_ops.pad_mask(self._mask, length), cache_ops.pad_mask(mask, length)])
        seq.state = "running"
        seq.quantum_steps = 0
        with self._lock:
            self.rows.append(seq)
        self.stats.cache_bytes = cache_ops.nbytes(self._cache)

    def _prefill(self, seq: _Seq) -> None:
        seq.admitted_at = time.monotonic()
        self.stats.queue_waits.append((seq.admitted_at - seq.req.arrival) * 1e3)
        out, mask = self._prefill_tokens(seq.req.prompt_ids, seq.req.adapter)
        seq.position = len(seq.req.prompt_ids)
        tok = choose(out.logits[0, -1], seq.req.temperature, seq.req.top_p, seq.req.top_k, seq.gen)
        seq.first_token_at = time.monotonic()
        self._count_tokens([seq], seq.first_token_at)
        if not self._advance(seq, tok):
            self._join(seq, out.past_key_values, mask)

    def _decode_step(self) -> None:
        rows = self.rows
        dev = self.lm.device
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[s.position] for s in rows], dtype=torch.long, device=dev)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        out = self._forward(ids, mask, pos, self._cache, [s.req.adapter for s in rows], last_only=True)
        self._cache, self._mask = out.past_key_values, mask
        logits = out.logits[:, -1, :]
        done = []
        for i, s in enumerate(rows):
            s.position += 1
            s.quantum_steps += 1
            tok = choose(logits[i], s.req.temperature, s.req.top_p, s.req.top_k, s.gen)
            if self._advance(s, tok):
                done.append(i)
        self.stats.decode_steps += 1
        self.stats.batch_rows += len(rows)
        self._count_tokens(rows, time.monotonic())
        if done:
            self._remove_rows(done)
        self.stats.cache_bytes = cache_ops.nbytes(self._cache)

    def _over_budget(self) -> bool:
        if not self.budget.cache_bytes:
            return False
        held = self.fixed_bytes * len(self.rows) + self.bytes_per_token * sum(s.position + 1 for s in self.rows)
        return held > self.budget.cache_bytes

    def _count_tokens(self, seqs: list[_Seq], now: float) -> None:
        self.stats.generated_tokens += len(seqs)
        self.stats.recent.append((now, len(seqs)))
        per_agent: dict[str, int] = {}
        for s in seqs:
            per_agent[s.req.agent_id] = per_agent.get(s.req.agent_id, 0) + 1
        for agent, n in per_agent.items():
            self.policy.record(agent, n, now)

    def _remove_rows(self, indices: list[int]) -> None:
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        with self._lock:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        cache_ops.select(self._cache, idx)
        self._mask = self._mask.index_select(0, idx)
        empty_cols = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        if empty_cols:
            cache_ops.trim_left(self._cache, empty_cols)
            self._mask = self._mask[:, empty_cols:]

    # -- context switching -------------------------------------------------------------------------------
    def _measure_cache_size(self) -> tuple[int, int]:
        """Cache bytes per token and per sequence (Mamba state), measured with two tiny prefills."""
        with torch.inference_mode():
            sizes = []
            for n in (1, 2):
                out = self._forward(*self._probe_inputs(n), None, [None], last_only=True)
                sizes.append(cache_ops.nbytes(out.past_key_values))
        per_token = sizes[1] - sizes[0]
        return per_token, sizes[0] - per_token

    def _probe_inputs(self, n: int):
        ids = torch.zeros((1, n), dtype=torch.long, device=self.lm.device)
        return ids, torch.ones_like(ids), torch.arange(n, device=self.lm.device).unsqueeze(0)

    def choose_strategy(self, seq: _Seq) -> str:
        if self.preemption != "auto":
            return self.preemption
        swap_s = 2 * self.cache_bytes_for(seq.position) / self.swap_bytes_per_s   # out now, in later
        recompute_s = seq.position * self.prefill_s_per_token
        return "recompute" if recompute_s < swap_s else "swap"

    def _preempt(self, seq: _Seq, reason: str, strategy: str | None = None) -> None:
        t0 = time.perf_counter()
        row = self.rows.index(seq)
        strategy = strategy or self.choose_strategy(seq)
        moved = 0
        if strategy == "swap":
            saved = cache_ops.extract_row(self._cache, row, seq.position)
            moved = cache_ops.nbytes(saved)
            if self.lm.device.type != "cpu":
                saved = cache_ops.to_device(saved, "cpu")
            if self.swap_dir is not None and self._host_swap_bytes + moved > self.swap_host_bytes:
                seq.swap_path = self._write_swap(seq, saved)
            else:
                seq.swapped = saved
                self._host_swap_bytes += moved
        self._remove_rows([row])
        seq.state = "preempted"
        seq.enqueued = time.monotonic()
        seq.quantum_steps = 0
        seq.preemptions += 1
        with self._lock:
            self.waiting.append(seq)
        dt = time.perf_counter() - t0
        if moved and dt > 0:
            self.swap_bytes_per_s = 0.8 * self.swap_bytes_per_s + 0.2 * (moved / dt)
        self.stats.context_switches += 1
        self.stats.switch_seconds += dt
        self.stats.preempted_by_reason[reason] = self.stats.preempted_by_reason.get(reason, 0) + 1
        self.stats.strategy_counts[strategy] = self.stats.strategy_counts.get(strategy, 0) + 1

    def _resume(self, seq: _Seq) -> None:
        t0 = time.perf_counter()
        seq.admitted_at = seq.admitted_at or time.monotonic()  # a restored snapshot's first admission
        if seq.swapped is not None or seq.swap_path is not None:
            past = self._read_swap(seq)
            past = cache_ops.to_device(past, self.lm.device) if self.lm.device.type != "cpu" else past
        else:  # recompute: the cache held every token before the pending one
            tokens = seq.req.prompt_ids + seq.ids[:-1]
            past = self._prefill_tokens(tokens, seq.req.adapter)[0].past_key_values
        mask = torch.ones((1, seq.position), dtype=torch.long, device=self.lm.device)
        self._join(seq, past, mask)
        self.stats.switch_seconds += time.perf_counter() - t0

    def _write_swap(self, seq: _Seq, saved) -> Path:
        self.swap_dir.mkdir(parents=True, exist_ok=True)
        path = self.swap_dir / f"{seq.req.request_id}.safetensors"
        self._save_cache(saved, path)
        return path

    @staticmethod
    def _save_cache(past, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in cache_ops.tensors(past).items()}, str(path))

    def _read_swap(self, seq: _Seq):
        if seq.swapped is not None:
            past, seq.swapped = seq.swapped, None
            self._host_swap_bytes -= cache_ops.nbytes(past)
            return past
        from safetensors.torch import load_file

        if self._template is None:  # restored before this engine ran anything: make a cache to copy the shape of
            self._template = self._forward(*self._probe_inputs(1), None, [None], last_only=True).past_key_values
        past = cache_ops.load_tensors(self._template, load_file(str(seq.swap_path)), "cpu")
        if not seq.keep_swap_file:
            seq.swap_path.unlink(missing_ok=True)
        seq.swap_path, seq.keep_swap_file = None, False
        return past

    def _release_swap(self, seq: _Seq) -> None:
        if seq.swapped is not None:
            self._host_swap_bytes -= cache_ops.nbytes(seq.swapped)
            seq.swapped = None
        if seq.swap_path is not None:
            if not seq.keep_swap_file:
                seq.swap_path.unlink(missing_ok=True)
            seq.swap_path = None

    # -- per-sequence bookkeeping ------------------------------------------------------------------------
    def _advance(self, seq: _Seq, tok: int) -> bool:
        """Record a sampled token; stream new text; return True if the sequence is finished."""
        req = seq.req
        finish = None
        if tok in self.lm.eos_ids:
            finish = Finish.STOP
        else:
            seq.ids.append(tok)
            seq.pending = tok
            seq.text = self.lm.tokenizer.decode(seq.ids, skip_special_tokens=True)
            cut = min((i for i in (seq.text.find(s) for s in req.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = seq.text[:cut]
                finish = Finish.STOP
            elif len(seq.ids) >= req.max_tokens:
                finish = Finish.LENGTH
        if finish is not None:
            self._finish(seq, finish)
            return True
        # Hold back an incomplete UTF-8 character and anything that could begin a stop string.
        safe = len(seq.text)
        if seq.text.endswith("\ufffd"):
            safe -= 1
        if req.stop:
            safe = min(safe, len(seq.text) - (max(len(s) for s in req.stop) - 1))
        if safe > seq.emitted:
            seq.handle.put(TextDelta(seq.text[seq.emitted:safe], len(seq.ids)))
            seq.emitted = safe
        return False

    def _finish(self, seq: _Seq, finish: Finish, snapshot_id: str = "") -> None:
        now = time.monotonic()
        if len(seq.text) > seq.emitted:
            seq.handle.put(TextDelta(seq.text[seq.emitted:], len(seq.ids)))
            seq.emitted = len(seq.text)
        admitted = seq.admitted_at or now
        seq.handle.put(Final(
            text=seq.text, finish=finish, prompt_tokens=len(seq.req.prompt_ids), completion_tokens=len(seq.ids),
            queue_wait_ms=(admitted - seq.req.arrival) * 1e3,
            ttft_ms=((seq.first_token_at or now) - seq.req.arrival) * 1e3,
            total_ms=(now - seq.req.arrival) * 1e3, token_ids=list(seq.ids), preemptions=seq.preemptions,
            snapshot_id=snapshot_id,
        ))
        self.stats.completed += 1
        if finish == Finish.CANCELLED:
            self.stats.cancelled += 1

    def _cancel_all(self) -> None:
        for s in self.rows + self.waiting:
            self._release_swap(s)
            self._finish(s, Finish.CANCELLED)
        with self._lock:
            self.rows, self.waiting = [], []
        self._cache, self._mask = None, None

    def _fail_all(self, message: str) -> None:
        for s in self.rows:
            s.handle.put(Failed(message))
        with self._lock:
            self.rows = []
        self._cache, self._mask = None, None
