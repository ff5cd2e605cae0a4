"""Decode steps and prompt chunks of a Llama-family model (Llama, Mistral without sliding window, Qwen2),
written out.

A decode step of a small model is mostly overhead around small tensors: transformers' forward builds a 4-D
mask, walks its generic layer stack with keyword arguments, hooks and output records, for one token per row.

- On the own bf16 CPU kernels (`cpu_kernels`), decode steps and prompt chunks share one layer loop of seven
  kernel calls; each position is computed the same way however it is reached (prefilled in any chunks, or
  decoded) and whatever rows are beside it.
- Elsewhere the decode step runs transformers' operations in the same order on the model's own modules (its
  logits and cache equal transformers' bit for bit, which a test checks) without that machinery, and prompts
  keep transformers' forward.
- Either way the cache grows in place, in buffers with headroom (`_reserve`). Adapters (peft), MoE and hybrid
  models keep transformers' forward (`supported` says which).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch import new_buffers
from .cache import view_column

_TYPES = {"llama", "mistral", "qwen2"}
HEADROOM = 64          # cache columns allocated ahead, so that a step writes its column in place


def supported(model) -> bool:
    """A bare (no peft) Llama-family causal LM with full attention, RMSNorm, SiLU MLP, and `kernos_cpu`
    (the engine's CPU attention) or SDPA as its attention."""
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.model_type not in _TYPES or type(model).__name__ == "PeftModel":
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("kernos_cpu", "sdpa"):
        return False
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return False
    attn = layers[0].self_attn
    return all(getattr(attn, name, None) is None for name in ("q_norm", "k_norm", "sinks", "sliding_window"))


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:          # LlamaRMSNorm.forward, op for op
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _reserve(layer, extra: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The layer's key and value buffers from where its view starts, with room for `extra` more columns, and
    how many columns it holds. `DynamicLayer.update` concatenates, copying the whole cache on every step; here
    the layer's tensors are views into buffers with spare columns (`HEADROOM`, or the running batch's own:
    `batch.py`), written in place, and reallocated only when full or when they are no such views. Buffers belong
    to one layer object: a copy of the layer (a resident prefix, a swapped row) never writes into them."""
    keys, values, n = layer.keys, layer.values, layer.keys.shape[-2]
    buf = getattr(layer, "_kernos_buffers", None)
    col = view_column(keys, buf, id(layer))
    b = keys.shape[0]
    if col is not None and col + n + extra <= buf[0].shape[-2] and view_column(values, buf, id(layer), True) == col:
        return buf[0][:b, :, col:], buf[1][:b, :, col:], n
    if getattr(layer, "_kernos_batch", False):    # the running batch's: new ones with its room (rows, both sides)
        col, buf = new_buffers(layer, b, 0, extra)
        return buf[0][:b, :, col:], buf[1][:b, :, col:], n
    shape = (*keys.shape[:2], n + extra + HEADROOM, keys.shape[-1])
    buf = (keys.new_empty(shape), values.new_empty(shape), id(layer))
    buf[0][..., :n, :].copy_(keys)
    buf[1][..., :n, :].copy_(values)
    layer._kernos_buffers = buf
    return buf[0], buf[1], n


def _append(layer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`DynamicLayer.update` for one new column, written in place (see `_reserve`)."""
    keys, values, n = _reserve(layer)
    keys[..., n:n + 1, :].copy_(k)
    values[..., n:n + 1, :].copy_(v)
    layer.keys, layer.values = keys[..., :n + 1, :], values[..., :n + 1, :]
    return layer.keys, layer.values


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaStep:
    def __init__(self, model):
        from ..cpu_speed import ATTENTION, cpu_attention

        self.model = model
        self.inner = model.model
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if cfg._attn_implementation == ATTENTION:
            self.attention = cpu_attention
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            self.attention = sdpa_attention_forward
        self.kernels = _KernelWeights.build(model, self.head_dim)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """ids and positions [B, 1]; mask [B, L + 1] (0: padding), the cache's L columns and this step's;
        `cache` (a DynamicCache holding L positions) grows by one. Returns the logits [B, 1, vocab]."""
        if self.kernels is not None:
            start = self.kernels.attention_starts(mask)
            if start is not None:
                return self._kernel_step(ids, positions, start, cache)
        return self._torch_step(ids, positions, mask, cache)

    def _torch_step(self, ids, positions, mask, cache) -> torch.Tensor:
        """transformers' computation, op for op."""
        inner, (b, _) = self.inner, ids.shape
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, position_ids=positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        attn_mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        hd = self.head_dim
        for layer, cache_layer in zip(inner.layers, cache.layers, strict=True):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)
            q = attn.q_proj(x).view(b, 1, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(b, 1, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(b, 1, -1, hd).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            k, v = _append(cache_layer, k, v)
            o, _ = self.attention(attn, q, k, v, attn_mask, dropout=0.0, scaling=attn.scaling)
            h = h + attn.o_proj(o.reshape(b, 1, -1).contiguous())
            x = _rms_norm(layer.post_attention_layernorm, h)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.model.lm_head(_rms_norm(inner.norm, h))

    @property
    def prefills(self) -> bool:
        """Whether prompts run through `prefill` (on the own kernels) rather than transformers' forward."""
        return self.kernels is not None

    def prefill(self, tokens: list[int], cache, total: int, every: bool = False,
                logits: bool = True) -> tuple[torch.Tensor | None, object]:
        """Run a chunk of one sequence's prompt: `tokens` at the positions after the `cache`'s columns (None:
        from position 0), on the own kernels. Each position's computation is the one a decode step gives it
        (rows are computed alone; attention reads exactly the columns before it), so a prompt's cache and logits
        do not depend on how it is chunked, nor on whether its tokens were prefilled or decoded. `total`: the
        prompt's length, room for which is reserved at once. Returns (the last position's logits, or with `every`
        each position's [tokens, vocab], or without `logits` None; cache)."""
        from transformers import DynamicCache

        kw, t = self.kernels, len(tokens)
        if cache is None:
            cache = DynamicCache(config=self.model.config)
            for layer in cache.layers:
                shape = (1, kw.kv_heads, total + HEADROOM, self.head_dim)
                kb, vb = torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)
                layer.dtype, layer.device, layer.is_initialized = kb.dtype, kb.device, True
                layer.keys, layer.values, layer._kernos_buffers = kb[..., :0, :], vb[..., :0, :], (kb, vb, id(layer))
        first = cache.layers[0].keys.shape[-2]
        positions = torch.arange(first, first + t)
        x = self._kernel_layers(torch.tensor(tokens, dtype=torch.long), positions, torch.zeros(t, dtype=torch.int32),
                                (positions + 1).to(torch.int32), cache, max(t, total - first), one_sequence=True)
        if not logits:
            return None, cache
        if every:
            return self.model.lm_head._kernos_packed(x).view(t, -1), cache
        return self.model.lm_head._kernos_packed(x[-1:]).view(-1), cache

    def _kernel_step(self, ids, positions, start, cache) -> torch.Tensor:
        """The decode step on the own bf16 kernels."""
        end = torch.full_like(start, cache.layers[0].keys.shape[-2] + 1)
        x = self._kernel_layers(ids, positions, start, end, cache, 1, one_sequence=False)
        return self.model.lm_head._kernos_packed(x).view(ids.shape[0], 1, -1)

    def _kernel_layers(self, ids, positions, start, end, cache, room: int, one_sequence: bool) -> torch.Tensor:
        """The layers on the own kernels, seven calls each, for rows `ids` at `positions`; row m attends to cache
        columns start[m] .. end[m] - 1. `one_sequence`: the rows are consecutive positions of cache row 0 (a
        prompt chunk); else row m is cache row m (a decode step). `room`: cache columns to reserve. Returns the
        final-normed hidden states [rows, hidden]."""
        from .. import cpu_kernels as ck

        kw, inner, rows = self.kernels, self.inner, ids.numel()
        h = inner.embed_tokens(ids.reshape(-1))            # the residual stream, updated in place
        cos, sin = inner.rotary_emb(h, position_ids=positions.reshape(1, -1))
        cos, sin = cos.reshape(rows, -1).contiguous(), sin.reshape(rows, -1).contiguous()
        new = rows if one_sequence else 1                  # cache columns each layer gains
        layers = inner.layers
        norm = layers[0].input_layernorm
        x = ck.add_rmsnorm(h, None, norm.weight, norm.variance_epsilon)
        for i, (layer, cache_layer) in enumerate(zip(layers, cache.layers, strict=True)):
            attn = layer.self_attn
            keys, values, n = _reserve(cache_layer, room)
            q = ck.rope_append(kw.qkv[i](x), kw.heads, kw.kv_heads, cos, sin, keys, values, n, one_sequence)
            cache_layer.keys, cache_layer.values = keys[..., :n + new, :], values[..., :n + new, :]
            o = ck.attention(q, cache_layer.keys, cache_layer.values, start, end, attn.scaling, one_sequence)
            norm = layer.post_attention_layernorm
            x = ck.add_rmsnorm(h, attn.o_proj._kernos_packed(o.view(rows, -1)), norm.weight, norm.variance_epsilon)
            a = ck.silu_mul(kw.gate_up[i](x))
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
            x = ck.add_rmsnorm(h, layer.mlp.down_proj._kernos_packed(a), norm.weight, norm.variance_epsilon)
        return x


class _KernelWeights:
    """Where every linear of the model runs on the own bf16 kernels (`cpu_kernels`): q/k/v and gate/up fused
    into one weight each (see `PackedWeight.fuse`). The step is then the kernels' computation (each row's
    alone, whatever the batch), not transformers' op for op."""

    def __init__(self, qkv: list, gate_up: list, heads: int, kv_heads: int):
        self.qkv, self.gate_up, self.heads, self.kv_heads = qkv, gate_up, heads, kv_heads

    @classmethod
    def build(cls, model, head_dim: int) -> _KernelWeights | None:
        from .. import cpu_kernels

        def packed(m):
            p = getattr(m, "_kernos_packed", None)
            return p if isinstance(p, cpu_kernels.PackedWeight) else None

        inner = model.model
        if packed(model.lm_head) is None or head_dim % 2 or head_dim > 256:
            return None
        if any(getattr(n, "weight", None) is None or n.weight.dtype != torch.bfloat16
               for n in [inner.norm] + [x for ly in inner.layers for x in (ly.input_layernorm,
                                                                            ly.post_attention_layernorm)]):
            return None
        attn = inner.layers[0].self_attn
        heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        if heads % kv_heads or heads // kv_heads > 64:
            return None
        qkv, gate_up = [], []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = [packed(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                         mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            if any(p is None for p in parts):
                return None
            qkv.append(cpu_kernels.PackedWeight.fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
            gate_up.append(cpu_kernels.PackedWeight.fuse([mlp.gate_proj, mlp.up_proj]))
        return cls(qkv, gate_up, heads, kv_heads)

    @staticmethod
    def attention_starts(mask: torch.Tensor) -> torch.Tensor | None:
        """Each row's first attended column, where every row's padding is a prefix (as the running batch keeps
        it: rows join left-padded); None otherwise (the mask-based step runs)."""
        if mask.shape[1] > 1 and not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            return None
        return (mask.shape[1] - mask.sum(1)).to(torch.int32)
