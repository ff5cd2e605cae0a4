"""Per-sequence token choice: greedy, or temperature / min-p / top-k / top-p sampling from the sequence's own
generator, so that a seeded request gives the same tokens whatever it is batched with; before it, `shape`
applies the request's own penalties and biases to its row alone (rows of one batch differ side by side)."""
from __future__ import annotations

import math

import torch

from .types import Shaping


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


class SamplingError(ValueError):
    """This row cannot pick a token (its logits hold no finite choice): it ends alone, never its batch."""


def shape(row: torch.Tensor, x: Shaping, prompt_ids: list[int], output_ids: list[int],
          ends: set[int] | frozenset[int]) -> torch.Tensor:
    """A float copy of one row of logits [vocab] with the request's shaping applied, in vLLM's order: the
    end tokens (`ends`: EOS unless ignored, and the stop token ids) forbidden while the reply is shorter than
    min_tokens; the logit bias added; the repetition penalty on every token of the prompt and output (a
    positive logit divided by it, a negative one multiplied); the frequency penalty times each token's count
    in the output and the presence penalty once per token in it, subtracted."""
    row = row.float().clone()
    n = row.shape[-1]
    if len(output_ids) < x.min_tokens and ends:
        row[[t for t in ends if t < n]] = float("-inf")
    if x.logit_bias:
        ids = torch.tensor([t for t in x.logit_bias if t < n], dtype=torch.long)
        row[ids] += torch.tensor([x.logit_bias[t] for t in ids.tolist()], dtype=row.dtype)
    if x.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.unique(torch.tensor(prompt_ids + output_ids, dtype=torch.long))
        seen = seen[seen < n]
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / x.repetition_penalty, vals * x.repetition_penalty)
    if (x.frequency_penalty or x.presence_penalty) and output_ids:
        ids, counts = torch.unique(torch.tensor(output_ids, dtype=torch.long), return_counts=True)
        keep = ids < n
        ids, counts = ids[keep], counts[keep].to(row.dtype)
        row[ids] -= x.frequency_penalty * counts + x.presence_penalty
    return row


def choose(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator,
           min_p: float = 0.0) -> int:
    """Pick the next token from a row of logits [vocab]. Scaled as (logits - max) / temperature: every value is
    <= 0 and the best is 0, so no temperature the edge accepts (any > 0) can overflow to inf or NaN (a
    temperature of 1e-37 made `logits / t` inf, and `multinomial` failed the whole batch). Min-p then drops
    every token less likely than min_p times the most likely one (on the scaled logits: exp(l) < min_p),
    before top-k and top-p."""
    if temperature <= 0:
        return int(torch.argmax(logits.float()))      # argmax over bf16 is ~5x slower than convert + argmax
    logits = logits.float()
    top = logits.max()
    if not torch.isfinite(top):
        raise SamplingError(f"no finite logit to sample from (max {float(top)})")
    logits = (logits - top) / temperature
    logits = torch.nan_to_num(logits, nan=float("-inf"))
    if min_p > 0:
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
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
