"""Prefill on the own engine: a new request's prompt run alone (in chunks, from the longest resident prefix that
matches; a few chunks a step, between the running batch's decode steps, so that a long prompt does not stall
the rows that are decoding), scored first when it asks for its prompt's log-probabilities, its first token
picked, and the row joined to the running batch; the samples of one prompt (n > 1) prefilled once; finished
calls' keys and values kept resident for the next turn. Mixed into `TransformersEngine` (`loop.py`), whose thread
runs all of it."""
from __future__ import annotations

import logging
import time

from ..types import Finish
from . import cache as cache_ops
from .runner import PromptRun
from .sequence import Sequence

log = logging.getLogger("kernos.llm")


class Prefill:
    def _fit_resident(self, candidates: list[Sequence]) -> None:
        """Resident caches use only what running rows and waiting requests leave of the cache budget."""
        if not self.budget.cache_bytes:
            self.resident.shrink(self.resident.max_bytes)
            return
        needed = sum(self.cache_bytes_for(s.position + 1) for s in self.rows)
        needed += sum(self.cache_bytes_for(len(s.req.prompt_ids) + 1) for s in candidates + self.prefilling)
        self.resident.shrink(max(0, min(self.resident.max_bytes, self.budget.cache_bytes - needed)))
        self.resident.report(self.stats)

    def _prefill(self, seq: Sequence) -> None:
        """An admitted request: its prompt prefilled a few chunks a step between decode steps (`_advance_prefills`),
        or at once (a prompt to score, samples of one prompt, or `prefill_tokens_per_step` 0)."""
        seq.admitted_at = time.monotonic()
        self.stats.queue_waits.append((seq.admitted_at - seq.req.arrival) * 1e3)
        r = seq.req
        if r.prompt_logprobs:          # scored by the model's forward over the prompt; max_tokens 0: nothing more
            seq.prompt_logprobs = self.runner.score(r.prompt_ids, r.adapter, r.top_logprobs)
            if not r.max_tokens:
                return self._finish(seq, Finish.LENGTH)
        if self.prefill_per_step and not r.prompt_logprobs and not (r.group and r.group_size > 1):
            seq.prompt = self._begin_prefill(r.prompt_ids, r.adapter, keep=True, req=r)
            seq.state = "prefilling"
            with self._lock:
                self.prefilling.append(seq)
            return
        self._prefilled(seq, *self._prefill_once(seq))

    def _prefilled(self, seq: Sequence, logits, past, mask) -> None:
        """The prompt is in the cache: its first token picked, the row joined to the batch (or done already)."""
        seq.position = len(seq.req.prompt_ids)
        tok = seq.pick(logits)
        seq.first_token_at = time.monotonic()
        self._count_tokens([seq], seq.first_token_at)
        finish = seq.add_token(tok)
        if finish is not None:
            self._finish(seq, finish)
        else:
            self._join(seq, past, mask)

    def _advance_prefills(self) -> None:
        """Prompt chunks of the prefilling requests, about `prefill_per_step` tokens in all and (past the position
        where chunks shrink: a long prompt) `prefill_step_s` of time (at least one chunk), so that the running
        rows get their next token between a long prompt's chunks; the request the policy ranks first goes first
        (the program policy: the program with the least service)."""
        budget = self.prefill_per_step
        deadline = time.perf_counter() + self.prefill_step_s if self.prefill_step_s else 0.0
        if len(self.prefilling) > 1:
            now = time.monotonic()
            with self._lock:
                self.prefilling.sort(key=lambda s: self.policy.rank(self._view(s), now))
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            left = deadline - time.perf_counter() if deadline else 0.0
            if deadline and left <= 0 and budget < self.prefill_per_step and seq.prompt.long:
                return                             # the step's time is spent (and one chunk ran)
            try:
                if not seq.prompt.looked_up:
                    self._look_up(seq.prompt)
                ran = seq.prompt.advance(budget, max(left, 1e-9) if deadline else 0.0)
                budget -= ran
                self._count_prefill(seq.req, ran)
                if not seq.prompt.done:
                    return
                self._drop_prefilling(seq)
                run, seq.prompt = seq.prompt, None
                self._prefilled(seq, *self._end_prefill(run))
            except Exception as e:  # this request's failure: answer it, keep the batch going
                log.exception("engine %s: prefilling %s failed", self.name, seq.req.request_id)
                if seq in self.prefilling:
                    self._drop_prefilling(seq)
                self._fail(seq, f"internal error in model '{self.name}': {type(e).__name__}: {e}")

    def _drop_prefilling(self, seq: Sequence) -> None:
        with self._lock:
            self.prefilling.remove(seq)

    def _abort_prefill(self, seq: Sequence, requeue: bool = True) -> None:
        """Stop a prefill between chunks (preempted, suspended, snapshotted, cancelled): what its chunks computed
        stays resident (it ends at a chunk boundary: exact to continue from), the request waits again."""
        run, seq.prompt = seq.prompt, None
        self._drop_prefilling(seq)
        seq.state = "waiting"
        seq.enqueued = time.monotonic()
        if run.pos > run.start:
            self._keep_computed(run, run.pos)
        if requeue:
            self.waiting.append(seq)

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
        """Prefill `tokens` at once (see `_begin_prefill`): (logits, cache, mask)."""
        run = self._begin_prefill(tokens, adapter, keep, req)
        self._look_up(run)
        self._count_prefill(req, run.advance(len(tokens)))
        return self._end_prefill(run)

    def _count_prefill(self, req, tokens: int) -> None:
        """Prompt tokens computed for `req` (as they run, chunk by chunk): its program's service, and its agent's
        fair share at what a prompt token costs against a decoded one (measured: `CostModel.prefill_weight`).
        A preempted sequence's recompute (no `req`) is the kernel's doing, not charged."""
        if req is None or not tokens:
            return
        if req.program is not None:
            req.program.computed(tokens)
        self.policy.prefilled(req.agent_id, tokens * self.costs.prefill_weight(), time.monotonic())

    def _begin_prefill(self, tokens: list[int], adapter: str | None, keep: bool = False, req=None) -> PromptRun:
        """A prefill of `tokens` in chunks, to start from the longest resident prefix that matches when its first
        chunk runs (`_look_up`: a prompt admitted beside another that shares its beginning then finds it
        resident); `keep`: make the result resident too (a new prompt: the next turn, a tool follow-up or another
        agent may share it), as computed by request `req` (whose program the tokens computed are accounted to)."""
        run = PromptRun(self.runner, tokens, adapter, None, 0, self.chunking)
        run.keep, run.req = keep and self.resident.enabled, req
        if run.keep and self.resident.hybrid:
            def at_boundary(cache, n):      # a Mamba state serves only whole: keep the last boundary's
                run.boundary[:] = [cache_ops.view_prefix(cache, n), n]
            run.at_boundary = at_boundary
        return run

    def _look_up(self, run: PromptRun) -> None:
        req = run.req
        run.past, run.start = self.resident.lookup(run.tokens, run.adapter, self.runner.position_exact,
                                                   *((req.program_id, req.request_id) if req is not None else ()))
        run.pos, run.looked_up = run.start, True

    def _keep_computed(self, run: PromptRun, n: int) -> None:
        """Make the first `n` tokens a prefill computed resident (`run.keep`): on hybrid models the Mamba state of
        the last chunk boundary before them (a state serves only whole)."""
        owner = run.req.request_id if run.req is not None else ""
        if run.keep and not self.resident.hybrid:
            self.resident.add(run.tokens[:n], run.adapter, cache_ops.view_prefix(run.past, n), owner)
        elif run.keep and run.boundary:
            self.resident.add(run.tokens[:run.boundary[1]], run.adapter, run.boundary[0], owner)

    def _end_prefill(self, run: PromptRun):
        """A finished prefill's accounting and resident entry: (logits, cache, mask)."""
        tokens, start = run.tokens, run.start
        if not start:
            self.costs.observe_prefill(len(tokens), run.seconds)
        self.stats.prompt_tokens += len(tokens)
        self.stats.prefix_tokens_reused += start
        if log.isEnabledFor(logging.DEBUG):
            req = run.req
            log.debug("engine %s: prefilled %s (program %s): %d prompt tokens, %d of them resident",
                      self.name, req.request_id if req else "-", req.program_id if req else "-", len(tokens), start)
        self._keep_computed(run, len(tokens))
        self.resident.report(self.stats)
        return run.logits, run.past, run.mask

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

