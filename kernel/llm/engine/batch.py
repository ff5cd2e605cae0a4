"""The running batch: its sequences (rows), their joint cache and attention mask. Rows join left-padded
to a common length, leave, and columns that are padding in every row are trimmed."""
from __future__ import annotations

import threading

import torch

from . import cache as cache_ops


class RunningBatch:
    def __init__(self, lock: threading.Lock):
        self.lock = lock            # the engine's: guards `rows` for readers on other threads
        self.rows: list = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def join(self, seq, past, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = past, mask
        else:
            cache_ops.concat(self.cache, past)
            length = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([cache_ops.pad_mask(self.mask, length), cache_ops.pad_mask(mask, length)])
        seq.state = "running"
        seq.quantum_steps = 0
        with self.lock:
            self.rows.append(seq)

    def remove(self, indices: list[int]) -> None:
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        with self.lock:
            self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        cache_ops.select(self.cache, idx)
        self.mask = self.mask.index_select(0, idx)
        empty_cols = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if empty_cols:
            cache_ops.trim_left(self.cache, empty_cols)
            self.mask = self.mask[:, empty_cols:]

    def extract(self, seq):
        """A copy of `seq`'s own cache (its real tokens, without the batch's padding)."""
        return cache_ops.extract_row(self.cache, self.rows.index(seq), seq.position)

    def clear(self) -> None:
        with self.lock:
            self.rows = []
        self.cache, self.mask = None, None

    def nbytes(self) -> int:
        return cache_ops.nbytes(self.cache)
