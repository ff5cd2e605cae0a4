"""GRPO (DeepSeekMath's group relative policy optimisation) as an objective of the tuner's training loop
(`train.train(..., objective=GRPO(beta))`), on groups the kernel sampled from the served base model and
scored with a verifiable reward (`grpo_data.py`).

Per reply token t of a sample with advantage A: ratio = pi(t) / pi_old(t), objective
min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) - beta KL_t, KL_t = exp(ref - logp) - (ref - logp) - 1 (the
k3 estimate, to the base model); averaged over the reply's tokens, then over the batch, and maximised. The
samples come from the base model and the adapter starts at zero, so pi_old = pi_ref = the base (the adapter
disabled); each epoch over the groups is one more GRPO iteration, which the clip keeps near the samples.

Held-out numbers (the publish rule's): for each held-out group, its best-rewarded reply against its worst,
scored as DPO scores a pair (loss ln 2 for the base; accuracy: the best reply more likely per token)."""
from __future__ import annotations

import torch

from .config import TrainConfig
from .preference import logps, score, tokenize
from .preference_data import check_rows
from .train import DataError


def _token_logps(model, batch: list[dict], pad: int):
    """(log-probabilities of each next token, mask of the reply's tokens), both [batch, width - 1]."""
    seqs = [ex["prompt_ids"] + ex["completion_ids"] for ex in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    reply = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (ex, s) in enumerate(zip(batch, seqs)):
        ids[r, : len(s)] = torch.tensor(s)
        attn[r, : len(s)] = 1
        reply[r, len(ex["prompt_ids"]) : len(s)] = True
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1), reply[:, 1:]


class GRPO:
    name = "grpo"

    def __init__(self, beta: float = 0.1, clip: float = 0.2):
        self.beta, self.clip = beta, clip

    def prepare(self, tok, rows: list[dict], cfg: TrainConfig) -> list[dict]:
        if why := check_rows(rows, "grpo"):
            raise DataError(f"training data: {why}")
        data = [tokenize(tok, r, "grpo", cfg.max_length) for r in rows]
        data = [d for d in data if d["completion_ids"] and d["advantage"] != 0]
        if not data:
            raise DataError("no training example has a reply with a non-zero advantage")
        return data

    def loss(self, model, batch: list[dict], pad: int):
        logp, mask = _token_logps(model, batch, pad)
        with torch.no_grad(), model.disable_adapter():
            ref, _ = _token_logps(model, batch, pad)
        adv = torch.tensor([ex["advantage"] for ex in batch])[:, None]
        ratio = torch.exp(logp - ref)
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = (surrogate - self.beta * kl) * mask
        return -(per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()

    def evaluate(self, model, tok, rows: list[dict], cfg: TrainConfig) -> dict:
        groups: dict[str, list[dict]] = {}
        for r in rows[: cfg.eval_limit]:
            groups.setdefault(r["episode"], []).append(r)
        pairs = []
        for g in groups.values():
            best, worst = max(g, key=lambda r: r["reward"]), min(g, key=lambda r: r["reward"])
            if best["reward"] > worst["reward"]:
                pairs.append(tokenize(tok, dict(best, rejected=worst["messages"][-1]), "dpo", cfg.max_length))
        policy = logps(model, pairs, "dpo")
        with model.disable_adapter():
            ref = logps(model, pairs, "dpo")
        return score(pairs, policy, ref, "dpo", self.beta)
