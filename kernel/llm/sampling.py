"""Per-sequence token choice: greedy, or temperature / top-k / top-p sampling from the sequence's own
generator, so that a seeded request gives the same tokens whatever it is batched with."""
from __future__ import annotations

import torch


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


class SamplingError(ValueError):
    """This row cannot pick a token (its logits hold no finite choice): it ends alone, never its batch."""


def choose(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator) -> int:
    """Pick the next token from a row of logits [vocab]. Scaled as (logits - max) / temperature: every value is
    <= 0 and the best is 0, so no temperature the edge accepts (any > 0) can overflow to inf or NaN (a
    temperature of 1e-37 made `logits / t` inf, and `multinomial` failed the whole batch)."""
    if temperature <= 0:
        return int(torch.argmax(logits.float()))      # argmax over bf16 is ~5x slower than convert + argmax
    logits = logits.float()
    top = logits.max()
    if not torch.isfinite(top):
        raise SamplingError(f"no finite logit to sample from (max {float(top)})")
    logits = (logits - top) / temperature
    logits = torch.nan_to_num(logits, nan=float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError("the sampling distribution is not finite")
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def greedy_tokens(logits: torch.Tensor, rows: list[int]) -> dict[int, int]:
    """Greedy choices for `rows` of a batch's logits [batch, vocab], in one call: row -> token."""
    if not rows:
        return {}
    picked = logits[rows].float().argmax(-1).tolist()
    return dict(zip(rows, picked))
