"""Resident contexts: the KV cache of prompts, kept after their call as an OS keeps a process's pages, so
that the next call whose prompt starts with the same tokens prefills only what is new.

- An entry is a one-row cache with the token ids it holds, under the adapter that computed it (a prefix
  is never shared across adapters; each model has its own engine, so never across models either).
- Lookup finds the entry sharing the longest prefix of token ids with a new prompt: the next turn of a
  conversation (a kernel context or a client resending its messages), a follow-up carrying tool results,
  or another agent's prompt that starts with the same system prompt. Attention keys and values of the
  first n tokens depend only on those tokens, so any prefix of an entry serves. A Mamba state is the
  state after *all* its tokens: on hybrid models only an entry whose every token starts the prompt serves.
- Exactness by construction: prompts are prefilled in chunks that start at multiples of `chunk` (absolute
  positions), entries come from prefills only, and a prefix is reused only up to a chunk boundary. The
  rest of the prompt then runs exactly the forward passes a prefill without reuse runs, on bit-identical
  keys and values, so a reply with reuse is the reply without, in any dtype. (In transformers' forward a
  decode step and a prefill round differently, so decoded keys and values are not reused there.)
- Where the engine is position-exact (the own CPU kernels compute each position alike, prefilled in any
  chunks or decoded: `ModelRunner.position_exact`), a prefix serves up to its last shared token, and a
  finished call's keys and values (its prompt and its reply) stay resident too: the next turn of a
  conversation prefills only its new message.
- Entries are evicted least recently used when the engine needs their bytes for running rows or when
  they exceed their own budget, and dropped after `ttl_s` idle. An edited context block changes the
  prompt's tokens from that point on, so nothing past the edit can match: stale entries are never used
  and age out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import cache as cache_ops


@dataclass(eq=False)          # identity: entries hold arrays and caches
class Entry:
    tokens: np.ndarray               # int64 token ids the cache holds, in order
    adapter: str | None
    cache: object                    # a one-row transformers Cache
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class ResidentCache:
    def __init__(self, max_bytes: int, ttl_s: float, hybrid: bool, chunk: int):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.hybrid = hybrid
        self.chunk = chunk
        self.min_tokens = chunk
        self.entries: list[Entry] = []
        self.nbytes = 0
        self.lookups = self.hits = self.tokens_saved = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, prompt: list[int], adapter: str | None, exact: bool = False):
        """(cache holding the prompt's first n tokens, n) for the best entry, or (None, 0). At least the
        prompt's last token is left to prefill: its logits choose the first new token. `exact`: the engine is
        position-exact, so any shared prefix serves, not only up to a chunk boundary."""
        if not self.enabled:
            return None, 0
        self.lookups += 1
        p = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, 0
        for e in self.entries:
            if e.adapter != adapter:
                continue
            n = min(_common_prefix(e.tokens, p), len(p) - 1)
            if not exact:
                n -= n % self.chunk              # a chunk boundary: the rest runs as it would without reuse
            if self.hybrid and n != len(e.tokens):
                continue
            if n > best_n:
                best, best_n = e, n
        if best is None or best_n < self.min_tokens:
            return None, 0
        best.last_used = time.monotonic()
        self.hits += 1
        self.tokens_saved += best_n
        return cache_ops.view_prefix(best.cache, best_n), best_n

    def add(self, tokens: list[int], adapter: str | None, cache) -> None:
        """Keep `cache` (one row, not used further by the engine) for `tokens`. An entry this one extends
        (its tokens a prefix of these) is dropped: the new one serves every prompt it served."""
        if not self.enabled or len(tokens) < self.min_tokens:
            return
        t = np.asarray(tokens, dtype=np.int64)
        nbytes = cache_ops.nbytes(cache)
        if nbytes > self.max_bytes:
            return
        for e in list(self.entries):
            if e.adapter != adapter:
                continue
            common = _common_prefix(e.tokens, t)
            if common == len(t) and (not self.hybrid or len(e.tokens) == len(t)):
                e.last_used = time.monotonic()      # already held (by this entry or one extending it)
                return
            if common == len(e.tokens) and not self.hybrid:
                self._drop(e)
        self.entries.append(Entry(t, adapter, cache, nbytes))
        self.nbytes += nbytes
        self.shrink(self.max_bytes)

    def shrink(self, limit: int) -> int:
        """Evict least recently used entries (and those idle past the TTL) until at most `limit` bytes are
        held; returns the bytes freed."""
        freed = 0
        now = time.monotonic()
        for e in [e for e in self.entries if now - e.last_used > self.ttl_s]:
            freed += self._drop(e)
        if self.nbytes > limit:
            for e in sorted(self.entries, key=lambda e: e.last_used):
                if self.nbytes <= limit:
                    break
                freed += self._drop(e)
                self.evictions += 1
        return freed

    def clear(self) -> None:
        self.entries, self.nbytes = [], 0

    def report(self, stats) -> None:
        """Into an engine's stats: bytes and entries held, lookups and hits."""
        stats.resident_bytes, stats.resident_entries = self.nbytes, len(self.entries)
        stats.prefix_lookups, stats.prefix_hits = self.lookups, self.hits

    def drop_adapter(self, adapter: str) -> None:
        """An adapter was replaced: what it computed is stale."""
        for e in [e for e in self.entries if e.adapter == adapter]:
            self._drop(e)

    def _drop(self, e: Entry) -> int:
        self.entries.remove(e)
        self.nbytes -= e.nbytes
        return e.nbytes
