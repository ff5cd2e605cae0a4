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
- Through a tool pause (a reply that ends in tool calls) the call's entries are **pinned** for its program
  until a time-to-live predicted from that tool's observed pauses runs out (Continuum): pinned entries go
  last, after every unpinned one, and among them first those of the program holding the most pinned bytes
  (memory shared fairly between programs). Running rows still take any bytes they need. A pinned entry that
  must go is **swapped** to a file where re-prefilling its tokens would cost more than writing and reading
  it back (the engine's cost model, priced from its own measurements; InferCept's choice per pause), and
  loaded again by the lookup that needs it; otherwise it is dropped, to recompute. The follow-up call of
  the program (the tool's result appended) finds it like any other entry and ends the pin.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cache as cache_ops


@dataclass(eq=False)          # identity: entries hold arrays and caches
class Entry:
    tokens: np.ndarray               # int64 token ids the cache holds, in order
    adapter: str | None
    cache: object                    # a one-row transformers Cache
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)
    owner: str = ""                  # the last request that computed or used it
    program: str = ""                # pinned for this program ...
    pinned_until: float = 0.0        # ... until then (monotonic seconds; 0: not pinned)
    path: Path | None = None         # swapped out to this file (cache None): loaded again when used

    def pinned(self, now: float) -> bool:
        return self.pinned_until > now


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class ResidentCache:
    """`swap`: an object with `should_swap(tokens, nbytes)`, `save(cache, name) -> path` and `load(path)`
    (the engine's cost model and swap directory); None: pinned entries are dropped like the others."""

    def __init__(self, max_bytes: int, ttl_s: float, hybrid: bool, chunking, swap=None):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.hybrid = hybrid
        self.chunking = chunking                     # where prompts' chunks end (runner.Chunking)
        self.min_tokens = chunking.size
        self.swap = swap
        self.entries: list[Entry] = []
        self.nbytes = 0
        self.lookups = self.hits = self.tokens_saved = self.evictions = 0
        self.pins = self.pin_hits = self.pins_expired = self.pins_swapped = self.pins_dropped = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, prompt: list[int], adapter: str | None, exact: bool = False, program: str = "",
               owner: str = ""):
        """(cache holding the prompt's first n tokens, n) for the best entry, or (None, 0). At least the
        prompt's last token is left to prefill: its logits choose the first new token. `exact`: the engine is
        position-exact, so any shared prefix serves, not only up to a chunk boundary. A call of `program`
        ends that program's pin on the entry it uses (another program's call shares it, pinned still); the
        entry is then its `owner`'s (request id), which a tool pause of that call pins."""
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
                n = self.chunking.floor_boundary(n)     # the rest runs as it would without reuse
            if self.hybrid and n != len(e.tokens):
                continue
            if n > best_n:
                best, best_n = e, n
        if best is None or best_n < self.min_tokens:
            return None, 0
        now = time.monotonic()
        if best.pinned(now) and program and best.program == program:   # back from its pause: the pin ends
            self.pin_hits += 1
            best.pinned_until, best.program = 0.0, ""
        if best.path is not None:         # swapped out while pinned: back in
            best.cache, best.path = self.swap.load(best.path), None
            self.nbytes += best.nbytes
        best.last_used = now
        if owner and best.program in ("", program):     # not while another program holds its pin
            best.owner = owner
        self.hits += 1
        self.tokens_saved += best_n
        return cache_ops.view_prefix(best.cache, best_n), best_n

    def add(self, tokens: list[int], adapter: str | None, cache, owner: str = "") -> None:
        """Keep `cache` (one row, not used further by the engine) for `tokens`, computed by request `owner`. An
        entry this one extends (its tokens a prefix of these) is dropped: the new one serves every prompt it
        served."""
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
                e.owner = owner or e.owner
                return
            if common == len(e.tokens) and not self.hybrid:
                self._drop(e)
        self.entries.append(Entry(t, adapter, cache, nbytes, owner=owner))
        self.nbytes += nbytes
        self.shrink(self.max_bytes)

    def pin(self, owner: str, program: str, ttl_s: float) -> int:
        """Keep what request `owner` computed for `program` through a tool pause: `ttl_s` from now. Returns the
        bytes pinned."""
        until, pinned = time.monotonic() + ttl_s, 0
        for e in self.entries:
            if e.owner == owner and e.path is None:
                e.program, e.pinned_until = program, until
                pinned += e.nbytes
                self.pins += 1
        return pinned

    def hold(self, program: str) -> None:
        """A call of `program` arrived: what was pinned for it (even if its time-to-live ran out meanwhile) stays
        pinned while the call waits for admission (at most the cache's own TTL); its lookup ends the pin."""
        now = time.monotonic()
        for e in self.entries:
            if e.program == program and now - e.last_used <= self.ttl_s:
                e.pinned_until = max(e.pinned_until, now + self.ttl_s)
        now = time.monotonic()
        return sum(e.nbytes for e in self.entries if e.pinned(now) and e.path is None)

    def shrink(self, limit: int) -> int:
        """Evict entries until at most `limit` bytes are held, and those idle past the TTL (unless pinned):
        unpinned ones least recently used first, then pinned ones of the program holding the most pinned
        bytes first (swapped out where that is cheaper than recomputing them). Returns the bytes freed."""
        freed = 0
        now = time.monotonic()
        for e in self.entries:
            if e.pinned_until and not e.pinned(now):     # its program did not come back in time
                e.pinned_until = 0.0                     # (a call of it arriving later pins it again: hold)
                self.pins_expired += 1
        for e in [e for e in self.entries if now - e.last_used > self.ttl_s and not e.pinned(now)]:
            freed += self._drop(e)
        if self.nbytes > limit:
            per_program: dict[str, int] = {}
            for e in self.entries:
                if e.pinned(now) and e.path is None:
                    per_program[e.program] = per_program.get(e.program, 0) + e.nbytes
            order = sorted((e for e in self.entries if e.path is None),
                           key=lambda e: (e.pinned(now), -per_program.get(e.program, 0), e.last_used))
            for e in order:
                if self.nbytes <= limit:
                    break
                if e.pinned(now) and self.swap is not None and self.swap.should_swap(len(e.tokens), e.nbytes):
                    freed += self._swap_out(e)
                    continue
                self.pins_dropped += e.pinned(now)
                freed += self._drop(e)
                self.evictions += 1
        return freed

    def _swap_out(self, e: Entry) -> int:
        e.path = self.swap.save(e.cache, f"resident-{uuid.uuid4().hex}")
        e.cache = None
        self.nbytes -= e.nbytes
        self.pins_swapped += 1
        return e.nbytes

    def clear(self) -> None:
        for e in list(self.entries):
            self._drop(e)

    def report(self, stats) -> None:
        """Into an engine's stats: bytes and entries held, lookups and hits, pins through tool pauses."""
        stats.resident_bytes, stats.resident_entries = self.nbytes, len(self.entries)
        stats.prefix_lookups, stats.prefix_hits = self.lookups, self.hits
        stats.pauses = {"pinned": self.pins, "reused": self.pin_hits, "expired": self.pins_expired,
                        "swapped": self.pins_swapped, "dropped": self.pins_dropped}

    def drop_adapter(self, adapter: str) -> None:
        """An adapter was replaced: what it computed is stale."""
        for e in [e for e in self.entries if e.adapter == adapter]:
            self._drop(e)

    def _drop(self, e: Entry) -> int:
        self.entries.remove(e)
        if e.path is not None:            # swapped out: its file goes, it held no memory
            e.path.unlink(missing_ok=True)
            return 0
        self.nbytes -= e.nbytes
        return e.nbytes
