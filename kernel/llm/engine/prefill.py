"""Prefill on the own engine: a new request's prompt run alone (in chunks, from the longest resident prefix that
matches), scored first when it asks for its prompt's log-probabilities, its first token picked, and the row joined
to the running batch; the samples of one prompt (n > 1) prefilled once; finished calls' keys and values kept
resident for the next turn. Mixed into `TransformersEngine` (`loop.py`), whose thread runs all of it."""
from __future__ import annotations

import time

from ..types import Finish
from . import cache as cache_ops
from .sequence import Sequence


class Prefill:
    def _fit_resident(self, candidates: list[Sequence]) -> None:
        """Resident caches use only what running rows and waiting requests leave of the cache budget."""
        if not self.budget.cache_bytes:
            self.resident.shrink(self.resident.max_bytes)
            return
        needed = sum(self.cache_bytes_for(s.position + 1) for s in self.rows)
        needed += sum(self.cache_bytes_for(len(s.req.prompt_ids) + 1) for s in candidates)
        self.resident.shrink(max(0, min(self.resident.max_bytes, self.budget.cache_bytes - needed)))
        self.resident.report(self.stats)

    def _prefill(self, seq: Sequence) -> None:
        seq.admitted_at = time.monotonic()
        self.stats.queue_waits.append((seq.admitted_at - seq.req.arrival) * 1e3)
        r = seq.req
        if r.prompt_logprobs:          # scored by the model's forward over the prompt; max_tokens 0: nothing more
            seq.prompt_logprobs = self.runner.score(r.prompt_ids, r.adapter, r.top_logprobs)
            if not r.max_tokens:
                return self._finish(seq, Finish.LENGTH)
        logits, past, mask = self._prefill_once(seq)
        seq.position = len(seq.req.prompt_ids)
        tok = seq.pick(logits)
        seq.first_token_at = time.monotonic()
        self._count_tokens([seq], seq.first_token_at)
        finish = seq.add_token(tok)
        if finish is not None:
            self._finish(seq, finish)
        else:
            self._join(seq, past, mask)

    def _prefill_once(self, seq: Sequence):
        """The prompt's logits, cache and mask. Samples of one prompt (a group, n > 1) prefill it once: the
        first keeps a copy for its siblings, each sibling takes its own copy of that."""
        group = seq.req.group
        shared = self._shared.get(group) if group else None
        if shared is not None:
            logits, past, mask, left = shared
            if left <= 1:
                del self._shared[group]
            else:
                shared[3] = left - 1
            return logits.clone(), cache_ops.extract_row(past, 0, cache_ops.seq_length(past)), mask.clone()
        logits, past, mask = self._run_prefill(seq.req.prompt_ids, seq.req.adapter, keep=True, req=seq.req)
        if group and seq.req.group_size > 1:
            self._shared[group] = [logits.clone(), cache_ops.extract_row(past, 0, cache_ops.seq_length(past)),
                                   mask.clone(), seq.req.group_size - 1]
        return logits, past, mask

    def _run_prefill(self, tokens: list[int], adapter: str | None, keep: bool = False, req=None):
        """Prefill `tokens` in chunks, from the longest resident prefix when one matches; `keep`: make the
        result resident too (a new prompt: the next turn, a tool follow-up or another agent may share it), as
        computed by request `req` (whose program the tokens computed are accounted to)."""
        past, start = self.resident.lookup(tokens, adapter, self.runner.position_exact,
                                           *((req.program_id, req.request_id) if req is not None else ()))
        keep = keep and self.resident.enabled
        hybrid, boundary = self.resident.hybrid, []

        def at_boundary(cache, n):      # a Mamba state serves only whole: keep the last boundary's
            boundary[:] = [cache_ops.view_prefix(cache, n), n]

        logits, past, mask, seconds = self.runner.prefill(tokens, adapter, past, start, self.prefill_chunk,
                                                          at_boundary if keep and hybrid else None)
        if not start:
            self.costs.observe_prefill(len(tokens), seconds)
        self.stats.prompt_tokens += len(tokens)
        self.stats.prefix_tokens_reused += start
        owner = req.request_id if req is not None else ""
        if req is not None and req.program is not None:
            req.program.computed(len(tokens) - start)
        if keep and not hybrid:
            self.resident.add(tokens, adapter, cache_ops.view_prefix(past, len(tokens)), owner)
        elif keep and boundary:
            self.resident.add(tokens[:boundary[1]], adapter, boundary[0], owner)
        self.resident.report(self.stats)
        return logits, past, mask

    def _keep_resident(self, seq: Sequence) -> None:
        """A finished call's keys and values (its prompt and reply, as far as they were fed) stay resident where
        the engine is position-exact: they are what a prefill of the same tokens would compute, so the next
        turn of the conversation reuses them and prefills only what is new."""
        if not (self.resident.enabled and self.runner.position_exact) or seq.req.group_size > 1:
            return
        tokens = (seq.req.prompt_ids + seq.ids)[:seq.position]
        if len(tokens) != seq.position or seq.position <= len(seq.req.prompt_ids):
            return
        self.resident.add(tokens, seq.req.adapter, self.batch.extract(seq), seq.req.request_id)
        self.resident.report(self.stats)

