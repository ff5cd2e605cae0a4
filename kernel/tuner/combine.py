"""Training that continues from an adapter (an agent's current one): the job's model is the base with that adapter
merged in, so that every method (SFT, GRPO, DPO, KTO through TRL) trains a fresh LoRA on top of it as it would on
the base, its reference is the starting adapter, and its held-out "base" numbers are the starting adapter's: an
adapter is published only if it beats the one it started from.

What is served must be one adapter on the base. Two LoRAs on one module add up, W + s1·B1·A1 + s2·B2·A2, which is
exactly one LoRA of rank r1 + r2: A = [A1; A2], B = [s1·B1, s2·B2], scaling 1 (alpha = rank). `combine` writes
that adapter; a module only one of the two adapts gets zeros in the other's rows. So the rank grows by the new
LoRA's rank each round (serve it where `max_lora_rank` allows: the own engine takes any rank)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

WEIGHTS = "adapter_model.safetensors"


class CombineError(ValueError):
    pass


def check_start(folder: Path) -> None:
    """CombineError when training cannot continue from this adapter."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CombineError(f"only LoRA adapters can be continued (this one is {cfg.get('peft_type')})")
    if cfg.get("target_parameters"):
        raise CombineError("continuing from an adapter of fused MoE experts (target_parameters) is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CombineError("continuing from an adapter with per-module ranks (rank_pattern) is not supported")


def _scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _modules(weights: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module prefix -> (A [r, in], B [out, r])."""
    out = {}
    for key, value in weights.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            out[prefix] = (value, weights[f"{prefix}.lora_B.weight"])
        elif not key.endswith(".lora_B.weight"):
            raise CombineError(f"unexpected tensor '{key}' in a LoRA adapter")
    return out


def combine(start: Path, new: Path) -> None:
    """Replace the adapter in `new` (trained on the base merged with `start`) by the one adapter on the base that
    equals both: rank r1 + r2, scaling 1."""
    from safetensors.torch import load_file, save_file

    check_start(start)
    c1 = json.loads((start / "adapter_config.json").read_text())
    c2 = json.loads((new / "adapter_config.json").read_text())
    s1, s2 = _scaling(c1), _scaling(c2)
    m1, m2 = _modules(load_file(start / WEIGHTS)), _modules(load_file(new / WEIGHTS))
    r1, r2 = c1["r"], c2["r"]
    weights = {}
    for prefix in sorted(set(m1) | set(m2)):
        a1, b1 = m1.get(prefix, (None, None))
        a2, b2 = m2.get(prefix, (None, None))
        ref_a, ref_b = (a1, b1) if a1 is not None else (a2, b2)
        in_f, out_f, dtype = ref_a.shape[1], ref_b.shape[0], ref_a.dtype
        a1 = a1 if a1 is not None else torch.zeros(r1, in_f, dtype=dtype)
        b1 = b1 if b1 is not None else torch.zeros(out_f, r1, dtype=dtype)
        a2 = a2 if a2 is not None else torch.zeros(r2, in_f, dtype=dtype)
        b2 = b2 if b2 is not None else torch.zeros(out_f, r2, dtype=dtype)
        weights[f"{prefix}.lora_A.weight"] = torch.cat([a1, a2.to(dtype)]).contiguous()
        weights[f"{prefix}.lora_B.weight"] = torch.cat([b1 * s1, (b2 * s2).to(dtype)], dim=1).contiguous()
    rank = r1 + r2
    modules = sorted({prefix.rsplit(".", 1)[-1] for prefix in set(m1) | set(m2)})    # the modules it adapts
    config = {**c2, "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": modules,
              "rank_pattern": {}, "alpha_pattern": {}}
    tmp = new.with_name(new.name + ".combined")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / WEIGHTS)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for extra in new.iterdir():                # a README or tokenizer files peft wrote: kept as they were
        if extra.name not in (WEIGHTS, "adapter_config.json") and extra.is_file():
            shutil.copy2(extra, tmp / extra.name)
    shutil.rmtree(new)
    tmp.rename(new)

