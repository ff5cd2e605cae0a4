"""Continuous batching at the iteration level.

One engine owns one model and one thread. Between two decode steps, finished sequences leave the
running batch and waiting ones join it: a joining request is prefilled on its own (exact for every
architecture, Mamba layers included) and its cache is appended to the batch's, left-padded to a common
length; leaving rows are dropped and all-padding columns trimmed. Every row keeps its own positions,
sampling generator, adapter and stop conditions, and streams its text as it is produced.
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
import time

import torch

from kernos.scheduler import FifoPolicy, Policy, RequestView

from . import cache as cache_ops
from .base import Engine, EngineStats
from .registry import LoadedModel
from .sampling import choose, make_generator
from .types import EngineClosed, Failed, Final, Finish, GenRequest, RequestHandle, TextDelta

log = logging.getLogger("kernos.llm")


class _Seq:
    __slots__ = ("req", "handle", "gen", "ids", "pending", "position", "emitted", "text", "admitted_at",
                 "first_token_at")

    def __init__(self, req: GenRequest, handle: RequestHandle):
        self.req = req
        self.handle = handle
        self.gen = make_generator(req.seed)
        self.ids: list[int] = []
        self.pending = -1          # last sampled token, fed in the next step
        self.position = 0          # position of `pending`
        self.emitted = 0           # chars of `text` already streamed
        self.text = ""
        self.admitted_at = 0.0
        self.first_token_at = 0.0

    def view(self) -> RequestView:
        r = self.req
        return RequestView(r.request_id, r.agent_id, r.priority, r.arrival, len(r.prompt_ids), r.max_tokens,
                           len(self.ids))


class TransformersEngine(Engine):
    def __init__(self, lm: LoadedModel, max_batch_size: int = 16, policy: Policy | None = None):
        self.lm = lm
        self.name = lm.name
        self.max_batch_size = max_batch_size
        self.policy = policy or FifoPolicy()
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards waiting/rows for snapshot()
        self.waiting: list[_Seq] = []
        self.rows: list[_Seq] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        fwd = inspect.signature(type(lm.model.get_base_model() if lm.has_adapters else lm.model).forward)
        self._logits_to_keep = "logits_to_keep" in fwd.parameters

    # -- public ------------------------------------------------------------------------------------------
    def submit(self, request: GenRequest, handle: RequestHandle) -> None:
        if not self._accepting:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        self._inbox.put(_Seq(request, handle))
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        self._accepting = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.rows or self.waiting or not self._inbox.empty()):
            time.sleep(0.02)
        clean = not (self.rows or self.waiting or not self._inbox.empty())
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return clean

    def snapshot(self):
        with self._lock:
            live = [(s.view(), "running") for s in self.rows] + [(s.view(), "waiting") for s in self.waiting]
            self.stats.running, self.stats.waiting = len(self.rows), len(self.waiting)
        return self.stats, live

    # -- the loop ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                self._pull_inbox()
                if self._stop:
                    self._cancel_all()
                    return
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        self._decode_step()
                except Exception as e:  # a broken batch must not take the kernel down
                    log.exception("engine %s: step failed", self.name)
                    self._fail_all(f"internal error in model '{self.name}': {type(e).__name__}: {e}")
                if not self.rows and not self.waiting:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()

    def _pull_inbox(self) -> None:
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self.waiting.append(seq)

    def _drop_cancelled(self) -> None:
        gone = [s for s in self.waiting if s.handle.cancelled]
        for s in gone:
            with self._lock:
                self.waiting.remove(s)
            self._finish(s, Finish.CANCELLED)
        rows = [i for i, s in enumerate(self.rows) if s.handle.cancelled]
        if rows:
            for i in rows:
                self._finish(self.rows[i], Finish.CANCELLED)
            self._remove_rows(rows)

    def _admit(self) -> None:
        free = self.max_batch_size - len(self.rows)
        if free <= 0 or not self.waiting:
            return
        chosen = set(self.policy.admit([s.view() for s in self.waiting], [s.view() for s in self.rows], free))
        for seq in [s for s in self.waiting if s.req.request_id in chosen]:
            with self._lock:
                self.waiting.remove(seq)
            self._prefill(seq)

    def _forward(self, input_ids, mask, positions, past, adapters: list[str | None], last_only: bool):
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                      use_cache=True)
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.lm.has_adapters:
            kwargs["adapter_names"] = [a or "__base__" for a in adapters]
        return self.lm.model(**kwargs)

    def _prefill(self, seq: _Seq) -> None:
        seq.admitted_at = time.monotonic()
        prompt = seq.req.prompt_ids
        dev = self.lm.device
        ids = torch.tensor([prompt], dtype=torch.long, device=dev)
        mask = torch.ones_like(ids)
        pos = torch.arange(len(prompt), device=dev).unsqueeze(0)
        out = self._forward(ids, mask, pos, None, [seq.req.adapter], last_only=True)
        self.stats.prompt_tokens += len(prompt)
        seq.position = len(prompt)
        tok = choose(out.logits[0, -1], seq.req.temperature, seq.req.top_p, seq.req.top_k, seq.gen)
        seq.first_token_at = time.monotonic()
        self.stats.generated_tokens += 1
        self.stats.recent.append((seq.first_token_at, 1))
        if self._advance(seq, tok):
            return
        # Join the running batch.
        if self._cache is None:
            self._cache, self._mask = out.past_key_values, mask
        else:
            cache_ops.concat(self._cache, out.past_key_values)
            length = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([cache_ops.pad_mask(self._mask, length), cache_ops.pad_mask(mask, length)])
        with self._lock:
            self.rows.append(seq)
        self.stats.cache_bytes = cache_ops.nbytes(self._cache)

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
            tok = choose(logits[i], s.req.temperature, s.req.top_p, s.req.top_k, s.gen)
            if self._advance(s, tok):
                done.append(i)
        now = time.monotonic()
        self.stats.decode_steps += 1
        self.stats.batch_rows += len(rows)
        self.stats.generated_tokens += len(rows)
        self.stats.recent.append((now, len(rows)))
        if done:
            self._remove_rows(done)
        self.stats.cache_bytes = cache_ops.nbytes(self._cache)

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

    def _finish(self, seq: _Seq, finish: Finish) -> None:
        now = time.monotonic()
        if len(seq.text) > seq.emitted:
            seq.handle.put(TextDelta(seq.text[seq.emitted:], len(seq.ids)))
            seq.emitted = len(seq.text)
        admitted = seq.admitted_at or now
        seq.handle.put(Final(
            text=seq.text, finish=finish, prompt_tokens=len(seq.req.prompt_ids), completion_tokens=len(seq.ids),
            queue_wait_ms=(admitted - seq.req.arrival) * 1e3,
            ttft_ms=((seq.first_token_at or now) - seq.req.arrival) * 1e3,
            total_ms=(now - seq.req.arrival) * 1e3,
        ))
        self.stats.completed += 1
        if finish == Finish.CANCELLED:
            self.stats.cancelled += 1

    def _cancel_all(self) -> None:
        for s in self.rows + self.waiting:
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
