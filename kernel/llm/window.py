"""A model's window: how many positions (prompt + reply) it serves, from its config and the model entry's
`max_model_len` and `rope_scaling` (context extension at serve time).

The convention is vLLM's, so that both engines agree on one entry: a config's `max_position_embeddings` is the
window, times the factor of a linear or dynamic scaling; YaRN and llama3 configs carry the extended window there
already (with the trained one as `original_max_position_embeddings`). An entry's `rope_scaling` is turned into
the config fields it changes (`overrides`): the own engine sets them on the transformers config before the model
is built, vLLM gets them as its `hf_overrides`.

Dynamic NTK in transformers recomputes the frequencies from the longest position of each forward call: a row's
rotary angles would then depend on the other rows of its batch and on how its prompt was chunked. The own engine
fixes them once at the extended window instead (`fix_dynamic_rope`), which is what vLLM computes: batched ==
alone and prefill == decode hold as for every other scaling.
"""
from __future__ import annotations

from .settings import ModelConfig


class WindowError(ValueError):
    pass


def _positions(hf_config) -> int:
    n = getattr(hf_config, "max_position_embeddings", 0) or getattr(hf_config, "n_positions", 0) or 2048
    return int(n)


def _rope(hf_config) -> dict | None:
    """The config's own (flat) rope parameters; None when the model has no rotary positions (e.g. Jamba)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return None
    if "rope_type" not in params and "type" not in params and "rope_theta" not in params:
        return None     # nested per layer type: not a form an entry's scaling applies to
    return params


def has_rotary(hf_config) -> bool:
    return _rope(hf_config) is not None and getattr(hf_config, "model_type", "") not in {"jamba"}


def window(hf_config) -> int:
    """The positions a model config allows (vLLM's rule: times the factor of a linear or dynamic scaling)."""
    n = _positions(hf_config)
    rope = _rope(hf_config) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("linear", "dynamic") and rope.get("factor"):
        n = int(n * float(rope["factor"]))
    return n


def overrides(cfg: ModelConfig, hf_config) -> dict:
    """The config fields the entry's `rope_scaling` changes ({} without one)."""
    s = cfg.rope_scaling
    if s is None:
        return {}
    if not has_rotary(hf_config):
        raise WindowError(f"model '{cfg.name}': rope_scaling is set, but {hf_config.model_type} has no rotary "
                          f"positions to scale")
    rope = _rope(hf_config)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise WindowError(f"model '{cfg.name}': its config already scales its positions "
                          f"({rope.get('rope_type', rope.get('type'))}); rope_scaling would scale them twice")
    trained = s.original_max_position_embeddings or _positions(hf_config)
    params = {k: v for k, v in s.model_dump().items() if v is not None}
    params["rope_theta"] = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if "partial_rotary_factor" in rope:
        params["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if s.rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = trained
        if s.rope_type == "llama3" and not (s.low_freq_factor and s.high_freq_factor):
            raise WindowError(f"model '{cfg.name}': rope_scaling 'llama3' needs low_freq_factor and high_freq_factor")
        return {"rope_parameters": params, "max_position_embeddings": int(trained * s.factor)}
    params.pop("original_max_position_embeddings", None)
    return {"rope_parameters": params, "max_position_embeddings": trained}


def apply(cfg: ModelConfig, hf_config) -> int:
    """Set the entry's rope scaling on `hf_config` (a transformers config, before the model is built) and
    return the context length served: `max_model_len`, checked against the window, or the whole window."""
    for key, value in overrides(cfg, hf_config).items():
        setattr(hf_config, key, value)
    if cfg.rope_scaling is not None:
        validate = getattr(hf_config, "validate_rope", None)
        try:
            if validate is not None:
                validate()
        except (KeyError, ValueError) as e:
            raise WindowError(f"model '{cfg.name}': rope_scaling: {e}") from None
    return context_length(cfg, window(hf_config))


def context_length(cfg: ModelConfig, positions: int) -> int:
    if cfg.max_model_len is None:
        return positions
    if cfg.max_model_len > positions:
        hint = "" if cfg.rope_scaling else " (rope_scaling can extend it)"
        raise WindowError(f"model '{cfg.name}': max_model_len {cfg.max_model_len} is over the {positions} positions "
                          f"the model allows{hint}")
    return cfg.max_model_len


def fix_dynamic_rope(model, hf_config, positions: int) -> int:
    """Dynamic NTK at a fixed window (see the module's doc): each rotary embedding's frequencies computed once
    for `positions`. Returns how many embeddings it fixed."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fixed = 0
    for m in model.modules():
        if getattr(m, "rope_type", None) == "dynamic" and hasattr(m, "inv_freq"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS["dynamic"](m.config, m.inv_freq.device, seq_len=positions)
            m.inv_freq = inv_freq.to(m.inv_freq.dtype)
            m.original_inv_freq = m.inv_freq.clone()
            m.attention_scaling = scaling
            m.rope_type = "ntk_at_window"     # transformers updates per call where rope_type contains "dynamic"
            fixed += 1
    return fixed
