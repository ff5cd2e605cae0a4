"""What makes a model fast on a CPU: the dtype the CPU computes fastest, and linear layers whose weights
are laid out once for oneDNN instead of on every call.

- `fast_cpu_dtype()`: bfloat16 where the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16),
  float32 elsewhere (emulated bf16 is slower than fp32 there).
- `use_cpu_attention(model)`: torch's scaled_dot_product_attention in bf16 on a CPU takes ~0.9 ms for one
  decode step of 8 rows x 160 positions, where two grouped matmuls and a float softmax take 0.08 ms. The
  model's attention is registered as `kernos_cpu`, which computes it that way for decode steps and prompt
  chunks alike. In float32 it is transformers' SDPA, but grouped-query with a padding mask too: transformers
  copies every key/value head per query head first when a mask is given (a running batch's rows of different
  lengths), 58 ms a layer for 12 rows x 1,500 positions against 4.4 ms, with the same result bit for bit.
- `pack_linears(model)`: a bf16 `nn.Linear` on the CPU calls oneDNN, which reorders the weight into its
  blocked layout on every call; for the small batches of decoding that reorder costs as much as the
  multiplication. Packing each weight once (the op torch's own compiler uses when it freezes a model)
  halves a linear's time, with bit-identical results. The packed copy is kept beside the weight (peft
  wraps these layers and reads `weight`), which adds the linear weights' size to the model's memory.
"""
from __future__ import annotations

import logging
import types

import torch

from . import cpu_kernels
from .cpu_kernels import cpu_flags

log = logging.getLogger("kernos.llm")


def fast_cpu_dtype() -> torch.dtype:
    native_bf16 = {"avx512_bf16", "amx_bf16"} & cpu_flags()
    return torch.bfloat16 if native_bf16 and _mkldnn_bf16() else torch.float32


def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self._kernos_packed, self.bias, "none", [], "")


def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return self._kernos_packed(x)


def pack_linears(model: torch.nn.Module, own_kernels: bool = True, amx: bool = True) -> int:
    """Pack every bf16 CPU `nn.Linear` of `model` once, for the own kernel (`cpu_kernels`: with `own_kernels`,
    one compute thread and AVX512-BF16; on AMX where the CPU has it, unless `amx` is false) or else for oneDNN
    (see the module's doc); returns how many. Outside inference (grad enabled) or for other input dtypes a layer
    runs its ordinary forward."""

    if not _mkldnn_bf16():
        return 0
    if own_kernels and cpu_kernels.library() is not None:
        cpu_kernels.use_amx(amx)
    packed, kernel = 0, 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, "_kernos_packed"):
            continue
        w = module.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            continue
        with torch.no_grad():
            if own_kernels and cpu_kernels.available(module.in_features):
                module._kernos_packed = cpu_kernels.PackedWeight(w, module.bias)
                module.forward = types.MethodType(_kernel_forward, module)
                kernel += 1
            else:
                module._kernos_packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
                module.forward = types.MethodType(_packed_forward, module)
        packed += 1
    if packed:
        log.info("packed %d bf16 linear layers (%d for the own kernel, the rest for oneDNN)", packed, kernel)
    return packed


ATTENTION = "kernos_cpu"


def cpu_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention interface, on the CPU: query [B, H, T, D]; key and value [B, KV, L, D] with H a
    multiple of KV (grouped-query) and the queries the last T of the L positions; attention_mask None
    (causal), bool [B, 1, T, L] (True: attend) or additive float. In bf16 grouped matmuls and a float softmax;
    in other dtypes transformers' SDPA, grouped-query whatever the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (query.device.type != "cpu" or dropout or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("sinks") is not None
            or (attention_mask is None and not causal and query.shape[2] > 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.dtype != torch.bfloat16:
        # transformers' SDPA, grouped-query with a mask too: transformers first copies each key/value head per
        # query head when a mask is given (`repeat_kv`: the whole cache, per layer and step); the same bits
        t, length = query.shape[2], key.shape[2]
        mask, whole_causal = attention_mask, False
        if mask is None and causal and t > 1:
            if t == length:
                whole_causal = True
            else:                                                  # the queries are the last t positions
                mask = torch.ones(t, length, dtype=torch.bool, device=query.device).tril(length - t)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=whole_causal,
            enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    b, h, t, d = query.shape
    kv, length = key.shape[1], key.shape[2]
    g = h // kv
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(b, kv, g * t, d)                            # the heads that share each key/value head
    scores = (torch.matmul(q, key.transpose(-1, -2)).float() * scale).view(b, kv, g, t, length)
    if attention_mask is not None:
        mask = attention_mask[:, :, -t:, -length:].reshape(b, 1, 1, t, length)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    elif t > 1:                                                   # causal: the queries are the last t positions
        future = torch.ones(t, length, dtype=torch.bool, device=query.device).triu(length - t + 1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv, g * t, length)
    out = torch.matmul(probs, value)                              # [B, KV, G*T, D]
    return out.view(b, kv, g, t, d).reshape(b, h, t, d).transpose(1, 2).contiguous(), None


def use_cpu_attention(model) -> bool:
    """Route `model`'s attention through `cpu_attention` (transformers' SDPA masks are kept)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, cpu_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, AttributeError) as e:
        log.info("kept sdpa attention: %s", e)
        return False
    return True
