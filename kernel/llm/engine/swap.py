"""Where a preempted sequence's cache waits (host memory up to a budget, then a file), and the cost model
that decides between swapping it out and dropping it to recompute on resume: bytes to copy against
tokens to prefill, each priced from what the engine has measured."""
from __future__ import annotations

import time
from pathlib import Path

from . import cache as cache_ops


class CostModel:
    """`exact_recompute`: whether a prefill rebuilds the cache that decoding built, bit for bit closely enough
    that greedy tokens do not change (float32). In bf16 the two paths round differently, so `auto` keeps
    resumes exact by always swapping; `recompute` can still be asked for."""

    def __init__(self, preemption: str = "auto", exact_recompute: bool = True):
        if preemption not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption must be auto, swap or recompute, got {preemption!r}")
        self.preemption = preemption
        self.exact_recompute = exact_recompute
        self.prefill_s_per_token = 1e-3
        self.decode_s_per_row = 2e-2
        self.swap_bytes_per_s = 2e9

    def choose(self, position: int, cache_bytes: int) -> str:
        """'swap' or 'recompute' for a sequence holding `position` tokens in `cache_bytes` of cache."""
        if self.preemption != "auto":
            return self.preemption
        if not self.exact_recompute:
            return "swap"
        swap_s = 2 * cache_bytes / self.swap_bytes_per_s      # out now, in later
        recompute_s = position * self.prefill_s_per_token
        return "recompute" if recompute_s < swap_s else "swap"

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 8:  # short prefills are dominated by fixed costs; they would skew the price
            self.prefill_s_per_token = 0.8 * self.prefill_s_per_token + 0.2 * (seconds / tokens)

    def observe_decode(self, rows: int, seconds: float) -> None:
        if rows:
            self.decode_s_per_row = 0.9 * self.decode_s_per_row + 0.1 * (seconds / rows)

    def prefill_weight(self) -> float:
        """A prompt token's cost in decoded tokens, as measured here (a prompt token of a long prefill costs the
        machine about this share of a row's decode step): what fair share charges an agent for its prompts."""
        return min(1.0, max(0.01, self.prefill_s_per_token / self.decode_s_per_row))

    def observe_swap(self, nbytes: int, seconds: float) -> None:
        if nbytes and seconds > 0:
            self.swap_bytes_per_s = 0.8 * self.swap_bytes_per_s + 0.2 * (nbytes / seconds)


class SwapSpace:
    def __init__(self, host_bytes: int, directory: Path | None):
        self.host_bytes = host_bytes
        self.directory = directory
        self.host_used = 0

    def put(self, seq, saved) -> None:
        """Keep a sequence's cache (on the CPU): in memory, or in a file beyond the host budget."""
        moved = cache_ops.nbytes(saved)
        if self.directory is not None and self.host_used + moved > self.host_bytes:
            self.directory.mkdir(parents=True, exist_ok=True)
            seq.swap_path = self.directory / f"{seq.req.request_id}.safetensors"
            cache_ops.save(saved, seq.swap_path)
        else:
            seq.swapped = saved
            self.host_used += moved

    def holds(self, seq) -> bool:
        return seq.swapped is not None or seq.swap_path is not None

    def take(self, seq, template):
        """The sequence's cache, out of the swap space (`template()`: any cache of the model, for a file's shape)."""
        if seq.swapped is not None:
            past, seq.swapped = seq.swapped, None
            self.host_used -= cache_ops.nbytes(past)
            return past
        past = cache_ops.load(template(), seq.swap_path)
        if not seq.keep_swap_file:
            seq.swap_path.unlink(missing_ok=True)
        seq.swap_path, seq.keep_swap_file = None, False
        return past

    def release(self, seq) -> None:
        if seq.swapped is not None:
            self.host_used -= cache_ops.nbytes(seq.swapped)
            seq.swapped = None
        if seq.swap_path is not None:
            if not seq.keep_swap_file:
                seq.swap_path.unlink(missing_ok=True)
            seq.swap_path = None


class ResidentSwap:
    """Where a resident entry pinned through a tool pause goes when its memory is needed: a file in the engine's
    swap directory, when writing and reading it back costs less than re-prefilling its tokens (the engine's cost
    model: its measured prefill time per token and swap bandwidth)."""

    def __init__(self, engine):
        self.engine = engine

    def should_swap(self, tokens: int, nbytes: int) -> bool:
        costs = self.engine.costs
        return tokens * costs.prefill_s_per_token > 2 * nbytes / costs.swap_bytes_per_s

    def save(self, cache, name: str) -> Path:
        directory = self.engine.swap.directory
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.safetensors"
        t0 = time.perf_counter()
        cache_ops.save(cache, path)
        self.engine.costs.observe_swap(cache_ops.nbytes(cache), time.perf_counter() - t0)
        return path

    def load(self, path: Path):
        cache = cache_ops.load(self.engine.runner.template(), path)
        path.unlink(missing_ok=True)
        return cache
