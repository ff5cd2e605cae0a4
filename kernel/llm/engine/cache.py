"""Operations on a running batch's cache: rows join (left-padded to a common length), leave, and are
trimmed, so that sequences of different lengths and ages decode together.

A transformers `DynamicCache` holds per layer either attention keys/values [batch, heads, seq, dim]
(`DynamicLayer`) or Mamba conv/recurrent states [batch, ...] with no sequence axis
(`LinearAttentionLayer`, Jamba). `batch_select_indices` does not handle the latter, so every operation
here walks the layers itself.
"""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionCacheLayerMixin

_SUPPORTED = (DynamicLayer, LinearAttentionCacheLayerMixin)


def _check(layer) -> None:
    # Sliding-window and quantized layers keep extra per-layer bookkeeping that left-padding would corrupt.
    if type(layer).__name__ not in ("DynamicLayer", "LinearAttentionLayer", "LinearAttentionAndFullAttentionLayer"):
        raise NotImplementedError(f"continuous batching does not support cache layers of type {type(layer).__name__}")


def _has_kv(layer) -> bool:
    return isinstance(layer, DynamicLayer) and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0


def _state_dicts(layer):
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return (layer.conv_states, layer.recurrent_states)
    return ()


def seq_length(cache: Cache) -> int:
    for layer in cache.layers:
        if _has_kv(layer):
            return layer.keys.shape[-2]
    return 0


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[-2] = n
    return torch.cat([t.new_zeros(shape), t], dim=-2)


def concat(a: Cache, b: Cache) -> None:
    """Append the rows of `b` to `a` in place, left-padding the shorter one's attention layers.
    The caller pads the attention mask the same way (see `pad_mask`)."""
    la, lb = seq_length(a), seq_length(b)
    length = max(la, lb)
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        _check(layer_a)
        if _has_kv(layer_a):
            layer_a.keys = torch.cat([_pad_left(layer_a.keys, length - la), _pad_left(layer_b.keys, length - lb)])
            layer_a.values = torch.cat([_pad_left(layer_a.values, length - la), _pad_left(layer_b.values, length - lb)])
        for sa, sb in zip(_state_dicts(layer_a), _state_dicts(layer_b)):
            for k in sa:
                sa[k] = torch.cat([sa[k], sb[k]])


def select(cache: Cache, rows: torch.Tensor) -> None:
    """Keep only `rows` (a 1-D index tensor), in that order, in place."""
    for layer in cache.layers:
        if _has_kv(layer):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        for states in _state_dicts(layer):
            for k in states:
                states[k] = states[k].index_select(0, rows)


def trim_left(cache: Cache, n: int) -> None:
    """Drop the first `n` sequence positions of every attention layer (columns that are padding in all rows)."""
    if n <= 0:
        return
    for layer in cache.layers:
        if _has_kv(layer):
            layer.keys = layer.keys[..., n:, :].contiguous()
            layer.values = layer.values[..., n:, :].contiguous()


def nbytes(cache: Cache | None) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if _has_kv(layer):
            total += layer.keys.nbytes + layer.values.nbytes
        for states in _state_dicts(layer):
            total += sum(t.nbytes for t in states.values())
    return total


def pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a [rows, cols] 0/1 mask with zeros to `length` columns."""
    if mask.shape[1] == length:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], length - mask.shape[1]), mask], dim=1)


def extract_row(cache: Cache, row: int, length: int) -> Cache:
    """A new one-row cache holding a copy of `row`'s last `length` positions (its real tokens, without the
    batch's left padding) and its Mamba states: what a preempted sequence keeps."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        _check(layer)
        new = copy.copy(layer)
        if _has_kv(layer):
            new.keys = layer.keys[row:row + 1, :, layer.keys.shape[-2] - length:, :].clone()
            new.values = layer.values[row:row + 1, :, layer.values.shape[-2] - length:, :].clone()
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            new.conv_states = {k: v[row:row + 1].clone() for k, v in layer.conv_states.items()}
            new.recurrent_states = {k: v[row:row + 1].clone() for k, v in layer.recurrent_states.items()}
        out.layers.append(new)
    return out


def view_prefix(cache, n: int):
    """A cache holding the first `n` positions of a one-row `cache`. Attention tensors are sliced views (a
    forward pass appends by concatenation, so the entry stays as it is); Mamba states are copied."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        new.__dict__.update({k: dict(v) for k, v in layer.__dict__.items() if isinstance(v, dict)})  # own flags
        if _has_kv(layer):
            new.keys, new.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            new.conv_states = {k: v.clone() for k, v in layer.conv_states.items()}
            new.recurrent_states = {k: v.clone() for k, v in layer.recurrent_states.items()}
        out.layers.append(new)
    return out


def tensors(cache: Cache) -> dict[str, torch.Tensor]:
    """Flat name -> tensor view of a cache, for saving to disk (see `load_tensors`)."""
    out = {}
    for i, layer in enumerate(cache.layers):
        if _has_kv(layer):
            out[f"{i}.keys"], out[f"{i}.values"] = layer.keys, layer.values
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for k, v in layer.conv_states.items():
                out[f"{i}.conv.{k}"] = v
            for k, v in layer.recurrent_states.items():
                out[f"{i}.recurrent.{k}"] = v
    return out


def load_tensors(template: Cache, flat: dict[str, torch.Tensor], device) -> Cache:
    """Rebuild a cache shaped like `template` (any cache of the same model) from `tensors()` output."""
    out = copy.copy(template)
    out.layers = []
    for i, layer in enumerate(template.layers):
        new = copy.copy(layer)
        if f"{i}.keys" in flat:
            new.keys, new.values = flat[f"{i}.keys"].to(device), flat[f"{i}.values"].to(device)
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            new.conv_states = {k: flat[f"{i}.conv.{k}"].to(device) for k in layer.conv_states}
            new.recurrent_states = {k: flat[f"{i}.recurrent.{k}"].to(device) for k in layer.recurrent_states}
        out.layers.append(new)
    return out


def to_device(cache: Cache, device) -> Cache:
    return load_tensors(cache, tensors(cache), device)


def save(cache: Cache, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors(cache).items()}, str(path))


def load(template: Cache, path) -> Cache:
    from safetensors.torch import load_file

    return load_tensors(template, load_file(str(path)), "cpu")
