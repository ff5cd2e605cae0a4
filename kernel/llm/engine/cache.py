"""Operations on caches: sizes, one row's copy, a prefix's view, where a view starts in its layer's buffers
(`view_column`), saving and loading; the running batch's joins and leaves are `batch.py`'s.

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


def view_column(t: torch.Tensor, buf, layer_id: int, second: bool = False) -> int | None:
    """The column at which `t` [B, H, L, D] starts as a view `buffer[:B, :, col:col + L]` of a layer's buffers
    `buf` = (keys, values, id of the layer they belong to) (`second`: of the values buffer); None when it is not
    one (another layer's buffers, a copy, a tensor a forward pass made)."""
    if buf is None or buf[2] != layer_id:
        return None
    b = buf[1 if second else 0]
    if (t.dtype != b.dtype or t.stride() != b.stride() or t.shape[1:2] != b.shape[1:2] or t.shape[-1] != b.shape[-1]
            or t.shape[0] > b.shape[0] or t.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
        return None
    col, rest = divmod(t.data_ptr() - b.data_ptr(), b.stride(-2) * b.element_size())
    if rest or col < 0 or col + t.shape[-2] > b.shape[-2]:
        return None
    return col


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
