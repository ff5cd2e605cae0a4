"""The model runner: forward passes of the served model, knowing nothing of scheduling. A prefill runs one
sequence's tokens alone (exact for every architecture, Mamba layers included); a decode step feeds each
row of the running batch its pending token at its own position."""
from __future__ import annotations

import inspect
import time

import torch

from ..registry import LoadedModel
from . import cache as cache_ops
from .adapters import Adapters
from .llama_step import LlamaStep, supported


def cache_of(out):
    """A forward pass's cache: `cache` in transformers versions that renamed it, else `past_key_values`."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values


class ModelRunner:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.adapters = Adapters(lm)
        base = lm.model.get_base_model() if lm.has_adapters else lm.model
        params = inspect.signature(type(base).forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        # transformers 5.x renamed `past_key_values` to `cache` (in and out; the old name goes in 5.40): use the
        # name this version takes, so that no deprecation warning is printed and the engine outlives the rename.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._template = None      # any cache of this model: the shape to rebuild saved caches from
        self._step = LlamaStep(lm.model) if supported(lm.model) else None   # decode steps without adapters

    @property
    def position_exact(self) -> bool:
        """Is every position's cache and logits computed the same way however it is reached: prefilled whole, in
        any chunks, or decoded? True on the own CPU kernels (`LlamaStep.prefill`); transformers' forward rounds
        a prompt chunk and a decode step differently."""
        return self._step is not None and self._step.prefills and not self.lm.has_adapters

    @property
    def exact_recompute(self) -> bool:
        """Does a prefill of tokens that decoding produced give the tokens decoding would have? In fp32 (close
        enough), and bit for bit where `position_exact`; not in transformers' bf16 forward."""
        return self.lm.dtype == torch.float32 or self.position_exact

    def forward(self, input_ids, mask, positions, past, adapters: list[str | None], last_only: bool):
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: past,
                  "use_cache": True}
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.adapters.call(kwargs, adapters)

    def prefill(self, tokens: list[int], adapter: str | None, past=None, start: int = 0, chunk: int = 0,
                at_boundary=None):
        """(logits of the last position, cache, mask, seconds) for `tokens` run alone; with `past` (a cache
        holding `tokens[:start]`, e.g. a resident prefix) only the rest is run. With `chunk`, the prompt runs
        in chunks that start at multiples of `chunk` (absolute positions), so that a prefix cached at a
        boundary continues with exactly the computation a whole prefill does; `at_boundary(cache, n)` is
        called after each chunk that ends at a boundary n (before the last position)."""
        run = PromptRun(self, tokens, adapter, past, start, chunk, at_boundary)
        run.advance(len(tokens))
        return run.logits, run.past, run.mask, run.seconds

    def run_chunk(self, tokens: list[int], pos: int, end: int, past, adapter: str | None):
        """Positions pos..end-1 of a prompt after `past` (a cache of its first pos tokens, or None): (the last
        position's logits, the cache). On the own kernels a chunk before the prompt's last has no logits (None):
        nothing reads them, and the output layer is the largest weight of a small model."""
        if self.position_exact:
            logits, past = self._step.prefill(tokens[pos:end], past, len(tokens), logits=end == len(tokens))
        else:
            dev = self.lm.device
            ids = torch.tensor([tokens[pos:end]], dtype=torch.long, device=dev)
            mask = torch.ones((1, end), dtype=torch.long, device=dev)
            out = self.forward(ids, mask, torch.arange(pos, end, device=dev).unsqueeze(0), past, [adapter],
                               last_only=True)
            logits, past = out.logits[0, -1], cache_of(out)
        if self._template is None:
            self._template = past
        return logits, past

    def score(self, tokens: list[int], adapter: str | None, top: int, chunk: int = 0) -> list:
        """Each token's log-probability given the tokens before it ([(id, logprob, [(id, logprob)] * top)]; the
        first has none: None), from the model's forward over the prompt, every position's logits kept a chunk at
        a time (chunks of `chunk` tokens, else 256: memory stays a chunk by the vocabulary)."""
        dev, step = self.lm.device, chunk or 256
        mask = torch.ones((1, len(tokens)), dtype=torch.long, device=dev)
        out, past = [(tokens[0], None, [])], None
        for pos in range(0, len(tokens) - 1, step):
            end = min(len(tokens) - 1, pos + step)           # positions pos..end-1 predict tokens pos+1..end
            ids = torch.tensor([tokens[pos:end]], dtype=torch.long, device=dev)
            o = self.forward(ids, mask[:, :end], torch.arange(pos, end, device=dev).unsqueeze(0), past, [adapter],
                             last_only=False)
            past = cache_of(o)
            lps = torch.log_softmax(o.logits[0].float(), dim=-1)
            nxt = torch.tensor(tokens[pos + 1:end + 1], dtype=torch.long, device=dev)
            chosen = lps.gather(1, nxt.unsqueeze(1)).squeeze(1).tolist()
            values, alts = lps.topk(top, dim=-1) if top else (None, None)
            for i, (t, lp) in enumerate(zip(nxt.tolist(), chosen)):
                out.append((t, lp, list(zip(alts[i].tolist(), values[i].tolist())) if top else []))
        return out

    def decode(self, batch) -> torch.Tensor:
        """One step of the running batch: its cache and mask grow by a column; the next-token logits per row."""
        rows, dev = batch.rows, self.lm.device
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[s.position] for s in rows], dtype=torch.long, device=dev)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        if self._step is not None and not self.lm.has_adapters:
            logits = self._step(ids, pos, mask, batch.cache)
            batch.mask = mask
            return logits[:, -1, :]
        out = self.forward(ids, mask, pos, batch.cache, [s.req.adapter for s in rows], last_only=True)
        batch.cache, batch.mask = cache_of(out), mask
        return out.logits[:, -1, :]

    def verify(self, batch, tokens: list[int]) -> torch.Tensor:
        """A one-row batch's next `tokens` (its pending token and a draft) at the positions after its cache, in
        one forward on the own kernels (`position_exact`: each position's logits and cache are those decode steps
        would give it). The cache and mask grow by len(tokens) columns; the logits of each position."""
        held = batch.mask.shape[1]
        logits, batch.cache = self._step.prefill(tokens, batch.cache, held + len(tokens), every=True)
        batch.mask = batch.mask.new_ones(1, held + len(tokens))
        return logits

    @staticmethod
    def keep_columns(batch, n: int) -> None:
        """A one-row batch keeps its first `n` cache columns (a draft's rejected tail goes)."""
        for layer in batch.cache.layers:
            if cache_ops._has_kv(layer):
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        batch.mask = batch.mask[:, :n]

    def _probe_inputs(self, n: int):
        ids = torch.zeros((1, n), dtype=torch.long, device=self.lm.device)
        return ids, torch.ones_like(ids), torch.arange(n, device=self.lm.device).unsqueeze(0)

    def template(self):
        """Any cache of this model (one is made if nothing ran yet, e.g. before a restored snapshot)."""
        if self._template is None:
            self._template = cache_of(self.forward(*self._probe_inputs(1), None, [None], last_only=True))
        return self._template

    def measure_cache_size(self) -> tuple[int, int]:
        """Cache bytes per token and per sequence (Mamba state), measured with two tiny prefills."""
        with torch.inference_mode():
            sizes = [cache_ops.nbytes(cache_of(self.forward(*self._probe_inputs(n), None, [None], last_only=True)))
                     for n in (1, 2)]
        per_token = sizes[1] - sizes[0]
        return per_token, sizes[0] - per_token


class Chunking:
    """Where a prompt's chunks end: a function of absolute positions only, so that a prefill split anywhere (a
    few chunks a step, or continued from a resident prefix at a boundary) computes exactly what a prefill in one
    go does. Chunks are `size` tokens; from `shrink_from` on they halve each time the position grows fourfold,
    down to `floor` (a chunk's attention grows with its position: this keeps a chunk's time about level, so
    the rows decoding between a long prompt's chunks are not held up by its late chunks). 0: no shrinking."""

    def __init__(self, size: int, shrink_from: int = 0, floor: int = 32):
        self.size, self.shrink_from, self.floor = size, shrink_from, min(floor, size)

    def size_at(self, pos: int) -> int:
        size, edge = self.size, self.shrink_from
        while edge and pos >= edge and size > self.floor:
            size, edge = max(self.floor, size // 2), edge * 4
        return size

    def end(self, pos: int, length: int) -> int:
        """The end of the chunk that starts at (or contains) `pos`, within a prompt of `length` tokens."""
        size = self.size_at(pos)
        return min(length, (pos // size + 1) * size)

    def floor_boundary(self, n: int) -> int:
        """The last chunk boundary at or before `n`."""
        return n - n % self.size_at(n)


class PromptRun:
    """One prompt's prefill, run a few chunks at a time (`advance`), so that an engine can run decode steps of
    its batch between them. Chunks end where `Chunking` says (by absolute positions) however the prefill is
    split, so its cache and logits are those of a prefill run in one go."""

    def __init__(self, runner: ModelRunner, tokens: list[int], adapter: str | None, past=None, start: int = 0,
                 chunk: int = 0, at_boundary=None):
        self.runner, self.tokens, self.adapter = runner, tokens, adapter
        self.past, self.pos, self.start = past, start, start
        if not isinstance(chunk, Chunking):
            chunk = Chunking(chunk or len(tokens))
        self.chunking, self.at_boundary = chunk, at_boundary
        self.logits = None
        self.seconds = 0.0
        self.keep, self.req, self.boundary = False, None, []     # the engine's: keep it resident, for whom, ...
        self.looked_up = past is not None                          # ... and whether it looked for a resident prefix
        self.mask = torch.ones((1, len(tokens)), dtype=torch.long, device=runner.lm.device)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.tokens)

    @property
    def long(self) -> bool:
        """A prompt longer than where chunks start to shrink: its chunks between two decode steps are bounded by
        time as well as by tokens (short prompts, such as an agent's tool follow-up, by tokens only)."""
        return len(self.tokens) > self.chunking.shrink_from

    def advance(self, budget: int, seconds: float = 0.0) -> int:
        """Run chunks until about `budget` tokens ran, or (a `long` prompt) the next chunk would take them past
        `seconds` (0: no time limit; judged by the last chunk's time), at least one chunk, or the prompt is done;
        returns the tokens run."""
        ran, t0, last = 0, time.perf_counter(), 0.0
        while not self.done:
            end = self.chunking.end(self.pos, len(self.tokens))
            now = time.perf_counter()
            if ran and (ran + end - self.pos > budget or (seconds and self.long and now - t0 + last > seconds)):
                break
            self.logits, self.past = self.runner.run_chunk(self.tokens, self.pos, end, self.past, self.adapter)
            last = time.perf_counter() - now
            ran += end - self.pos
            self.pos = end
            if self.at_boundary is not None and end < len(self.tokens):     # every chunk but the last ends at one
                self.at_boundary(self.past, end)
        self.seconds += time.perf_counter() - t0
        return ran
