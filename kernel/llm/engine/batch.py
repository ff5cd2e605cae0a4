"""The running batch: its sequences (rows), their joint cache and attention mask. Rows join left-padded
to a common length, leave, and columns that are padding in every row are trimmed.

The attention keys and values live in buffers the batch owns, with room for more rows below and more
columns on both sides; the cache's layers hold views into them. A row joins by being written into the next free
row (and, when it is longer than the batch, by the view growing to the left); a row leaves by the last row
moving into its place; padding columns are trimmed by moving the view's start. Each costs the rows it touches,
not the whole batch: before, every join and every leave copied the whole cache, which on a batch of tool-using
agents (long prompts, short replies: rows come and go every few steps) took a quarter of the engine's time. A
decode step appends its column in place (`llama_step._reserve` writes into these buffers); where a step
replaces the tensors (transformers' forward: MoE, hybrid and adapter models) the next join or leave copies them
into new buffers, as every join did before. Mamba states (one per row, no sequence axis) are concatenated and
selected as they were."""
from __future__ import annotations

import threading

import torch

from . import cache as cache_ops

LEFT_ROOM = 64       # spare columns kept left of the view (at least; a quarter of its length for long batches)
RIGHT_ROOM = 64      # ... and right of it, for decode steps to append into (at least; a quarter of its length)


def new_buffers(layer, rows: int, left: int, right: int = 0) -> tuple[int, tuple]:
    """Copy a batch layer's keys and values into new buffers with room for `rows` rows (and a quarter more), `left`
    more columns on the left and `right` on the right (and a quarter of the length more on each side, so that
    rows joining and decode steps rarely need this again); (the view's column, the buffers)."""
    keys, values = layer.keys, layer.values
    b, h, length, d = keys.shape
    col = left + max(LEFT_ROOM, length // 4)
    shape = (rows + max(2, rows // 4), h, col + length + right + max(RIGHT_ROOM, length // 4), d)
    # not zeroed: every column a view exposes is written first (a joining row's padding is zeroed by `join`,
    # a decode step writes its column in every row); zeroing rows and columns of room a long row brings
    # (a 7K-token row joining: ~1 GB) cost more than the copy itself, and untouched pages take no memory
    kb, vb = keys.new_empty(shape), values.new_empty(shape)
    kb[:b, :, col:col + length].copy_(keys)
    vb[:b, :, col:col + length].copy_(values)
    layer.keys, layer.values = kb[:b, :, col:col + length], vb[:b, :, col:col + length]
    layer._kernos_buffers, layer._kernos_batch = (kb, vb, id(layer)), True
    return col, layer._kernos_buffers


class RunningBatch:
    def __init__(self, lock: threading.Lock):
        self.lock = lock            # the engine's: guards `rows` for readers on other threads
        self.rows: list = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.copies = 0             # whole-cache copies into new buffers (join/leave cost the rows they move)

    @torch.inference_mode()      # (in place into inference tensors, also when a caller preempts between steps)
    def join(self, seq, past, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = past, mask
        else:
            la, lb = self.mask.shape[1], mask.shape[1]
            length = max(la, lb)
            views = self._own(len(self.rows) + 1, length - la)
            row = len(self.rows)
            for (kb, vb, col), layer_a, layer_b in zip(views, self.cache.layers, past.layers, strict=True):
                if kb is not None:
                    start = col - (length - la)                # the view grows left by what the new row adds
                    kb[:row, :, start:col].zero_()             # (stale columns of a longer row: masked, but finite)
                    vb[:row, :, start:col].zero_()
                    kb[row, :, start:start + length - lb].zero_()
                    vb[row, :, start:start + length - lb].zero_()
                    kb[row, :, start + length - lb:start + length].copy_(layer_b.keys[0])
                    vb[row, :, start + length - lb:start + length].copy_(layer_b.values[0])
                    layer_a.keys, layer_a.values = kb[:row + 1, :, start:start + length], vb[:row + 1, :,
                                                                                            start:start + length]
                for sa, sb in zip(cache_ops._state_dicts(layer_a), cache_ops._state_dicts(layer_b)):
                    for k in sa:
                        sa[k] = torch.cat([sa[k], sb[k]])
            self.mask = torch.cat([cache_ops.pad_mask(self.mask, length), cache_ops.pad_mask(mask, length)])
        seq.state = "running"
        seq.quantum_steps = 0
        with self.lock:
            self.rows.append(seq)

    @torch.inference_mode()
    def remove(self, indices: list[int]) -> None:
        drop = set(indices)
        n = len(self.rows)
        keep = n - len(drop)
        if not keep:
            with self.lock:
                self.rows = []
            self.cache, self.mask = None, None
            return
        # the rows past `keep` that stay move into the places of the rows below `keep` that leave
        holes = [i for i in range(keep) if i in drop]
        movers = [i for i in range(keep, n) if i not in drop]
        order = list(range(n))
        for hole, src in zip(holes, movers, strict=True):
            order[hole] = src
        order = order[:keep]
        views = self._own(n, 0) if movers else None
        idx = torch.tensor(order, dtype=torch.long)
        for li, layer in enumerate(self.cache.layers):
            if views is not None and views[li][0] is not None:
                kb, vb, col = views[li]
                length = layer.keys.shape[-2]
                for hole, src in zip(holes, movers, strict=True):
                    kb[hole, :, col:col + length].copy_(kb[src, :, col:col + length])
                    vb[hole, :, col:col + length].copy_(vb[src, :, col:col + length])
            if cache_ops._has_kv(layer):
                layer.keys, layer.values = layer.keys[:keep], layer.values[:keep]
            for states in cache_ops._state_dicts(layer):
                for k in states:
                    states[k] = states[k].index_select(0, idx.to(states[k].device))
        with self.lock:
            self.rows = [self.rows[i] for i in order]
        self.mask = self.mask.index_select(0, idx.to(self.mask.device))
        empty_cols = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if empty_cols:            # the view starts later: no copy
            for layer in self.cache.layers:
                if cache_ops._has_kv(layer):
                    layer.keys, layer.values = layer.keys[..., empty_cols:, :], layer.values[..., empty_cols:, :]
            self.mask = self.mask[:, empty_cols:]

    def _own(self, rows: int, left: int) -> list[tuple]:
        """Per layer (key buffer, value buffer, column where the view starts) of buffers this batch owns with
        room for `rows` rows and `left` more columns on the left of the view; (None, None, 0) for layers without
        attention. Where a layer's tensors are not such views, or the room is short, they are copied into new
        buffers (with spare rows and columns, so that this happens rarely)."""
        out = []
        for layer in self.cache.layers:
            cache_ops._check(layer)
            if not cache_ops._has_kv(layer):
                out.append((None, None, 0))
                continue
            buf = getattr(layer, "_kernos_buffers", None)
            col = cache_ops.view_column(layer.keys, buf, id(layer))
            if (col is None or cache_ops.view_column(layer.values, buf, id(layer), second=True) != col
                    or not getattr(layer, "_kernos_batch", False) or buf[0].shape[0] < rows or col < left):
                col, buf = new_buffers(layer, rows, left)
                self.copies += 1
            out.append((buf[0], buf[1], col))
        return out

    def extract(self, seq):
        """A copy of `seq`'s own cache (its real tokens, without the batch's padding)."""
        return cache_ops.extract_row(self.cache, self.rows.index(seq), seq.position)

    def clear(self) -> None:
        with self.lock:
            self.rows = []
        self.cache, self.mask = None, None

    def nbytes(self) -> int:
        return cache_ops.nbytes(self.cache)
