"""The retention gate: does a trained adapter keep what the base model did outside its task?

An adapter is compared with the base model (the adapter disabled) on two prompt sets: (b) a replay of the
agent's other traced prompts (not in the job's data set) and (c) the generic prompts shipped with the
kernel (`retention_prompts.jsonl`). For each prompt the base model writes its greedy reply; then, teacher-
forced on that reply, both models' next-token distributions are compared:
- agreement: the share of reply tokens the adapter would also pick first (top-1 agreement with the base);
- kl: the mean KL(base || adapter) per reply token, in nats.
The worker measures this after training; the publisher publishes only when each measured set stays within
the configured bounds (`[tuner.retention]`), and the adapter's card records the numbers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .train import chat_ids

GENERIC = Path(__file__).with_name("retention_prompts.jsonl")


def generic_prompts() -> list[dict]:
    return [json.loads(line) for line in GENERIC.read_text().splitlines() if line.strip()]


@torch.no_grad()
def compare(model, tok, prompts: list[dict], reply_tokens: int, max_length: int = 1024) -> dict | None:
    """{"agreement", "kl", "prompts", "tokens"} of the adapter (`model`, a PeftModel) against its base, or
    None for no prompts."""
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    agree = kl = tokens = used = 0
    for p in prompts:
        ids = chat_ids(tok, p["messages"], True, p.get("tools"))[-max_length:]
        if not ids:
            continue
        x = torch.tensor([ids])
        with model.disable_adapter():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=reply_tokens,
                                 do_sample=False, pad_token_id=pad)
            reply = out[0, len(ids):]
            if not len(reply):
                continue
            full = out[:, : len(ids) + len(reply)]
            base = model(input_ids=full).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
        tuned = model(input_ids=full).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
        agree += int((tuned.argmax(-1) == reply).sum())
        kl += float((base.exp() * (base - tuned)).sum())
        tokens += len(reply)
        used += 1
    if not tokens:
        return None
    return {"agreement": agree / tokens, "kl": kl / tokens, "prompts": used, "tokens": tokens}


def measure(model, tok, replay: list[dict], reply_tokens: int, generic: int) -> dict:
    """{"replay": ..., "generic": ...} (each `compare`'s numbers, or None when that set is empty)."""
    return {"replay": compare(model, tok, replay, reply_tokens),
            "generic": compare(model, tok, generic_prompts()[:generic], reply_tokens)}


def within(numbers: dict | None, min_agreement: float, max_kl: float) -> tuple[bool, str]:
    """Whether every measured set stays within the bounds; the reason, with the numbers."""
    if not numbers:
        return True, "retention not measured"
    parts, ok = [], True
    for name in ("replay", "generic"):
        n = numbers.get(name)
        if not n:
            continue
        bad = n["agreement"] < min_agreement or n["kl"] > max_kl
        ok &= not bad
        parts.append(f"{name} agreement {n['agreement']:.2f} (min {min_agreement}), KL {n['kl']:.3f} (max {max_kl})"
                     f"{' OUT OF BOUNDS' if bad else ''}")
    return ok, "; ".join(parts) or "retention: no prompts to measure"
