"""The engine's prompt-lookup step (a part of `TransformersEngine`, as prefill and context switching are).

When the running batch holds one row, on the own CPU kernels, the row drafts from its own tokens
(`lookup.PromptLookup`) and one forward runs its pending token and the draft, at their positions, on its cache.
The own kernels compute a position the same way whether it is prefilled or decoded (each row alone, attention
over exactly the columns before it), so the logits at each drafted position are bit for bit those a decode step
would have computed there. The row then picks its tokens from them one by one, exactly as it would from decode
steps (its grammar, penalties, log-probabilities and seeded generator see the same logits in the same order),
and the draft is accepted up to the first token the row did not pick: greedy output is identical to decoding
without drafts, seeded sampling too (one draw a token, as in plain decoding), and a grammar checks every drafted
token as it checks any. The cache then keeps only the accepted columns.

Why one row only: a batch's rows share one cache, right-aligned (left padding), and a step adds one column to
every row. Rows that accepted different numbers of tokens would need per-row ends. On a CPU a batch already
spreads the weights' reads, which is what a draft saves at batch 1: a verify forward costs little more than a
decode step there, while at batch 8 the rows' own work dominates. So rows draft only when alone in the batch
(a tool loop's lone agent, a long extraction); a second row arriving simply ends drafting for that step.
"""
from __future__ import annotations

import time

from .lookup import PromptLookup


class Drafting:
    lookup_tokens = 0          # most tokens drafted a step (0: no prompt lookup)

    def _draft(self, s) -> list[int]:
        """The row's draft for this step ([]: a plain decode step)."""
        if not self.runner.position_exact or len(self.rows) != 1:
            return []
        mask = self.batch.mask
        if mask is None or mask.shape[1] != s.position or not bool(mask.all()):
            return []                 # (padding left in the row's cache: decode as usual)
        if s.lookup is None:
            s.lookup = PromptLookup(self.lookup_tokens)
        s.lookup.sync(s.req.prompt_ids, s.ids)
        return s.lookup.draft(s.req.max_tokens - len(s.ids) - 1)

    def _verify_step(self, s, draft: list[int]) -> None:
        """One forward over [pending] + draft; the row takes tokens from its logits while they agree."""
        logits = self.runner.verify(self.batch, [s.pending] + draft)
        kept = matched = 0
        end = None
        for j in range(len(draft) + 1):
            kept += 1
            tok, end = self._take(s, logits[j])
            if not isinstance(end, Exception) and j < len(draft) and tok == draft[j]:
                matched += 1
                if end is None:
                    continue
            break
        self.runner.keep_columns(self.batch, s.position)
        s.lookup.observe(len(draft), matched)
        self.stats.draft_tokens += len(draft)
        self.stats.draft_accepted += matched
        self.stats.decode_steps += 1
        self.stats.batch_rows += 1
        self._count_tokens([s], time.monotonic(), kept)
        if end is not None:
            self._end(s, end)
            self.batch.remove([0])
        self.stats.cache_bytes = self.batch.nbytes()
