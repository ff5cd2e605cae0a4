"""One generation's state inside the engine: its tokens, position, sampling generator, text and where it is
(waiting, running, preempted; parked by its agent), and what a preempted one keeps of its cache."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..closing import ending
from ..sampling import SamplingError, choose, make_generator, shape
from ..tool_calls import repeat_watch
from ..types import Final, Finish, GenRequest, RequestHandle, TextDelta
from .detokenizer import Detokenizer

CLOSE_WINDOW = 64     # a constrained reply's ending is looked for in its last this many tokens of budget ...
CLOSE_MARGIN = 3      # ... and taken while its tokens fit what is left with at most this many to spare


class Sequence:
    __slots__ = ("req", "handle", "gen", "ids", "pending", "position", "detok", "admitted_at", "first_token_at",
                 "state", "enqueued", "quantum_steps", "swapped", "swap_path", "preemptions", "parked",
                 "keep_swap_file", "matcher", "logprobs", "_step_logprobs", "ends", "_lp_sent",
                 "prompt_logprobs", "repeats", "forced", "closed", "_far_until", "prompt", "lookup")

    def __init__(self, req: GenRequest, handle: RequestHandle, tokenizer, eos_ids: set[int]):
        self.req = req
        self.handle = handle
        self.gen = make_generator(req.seed)
        self.ids: list[int] = []
        self.pending = -1          # last sampled token, fed in the next step
        self.position = 0          # position of `pending` = tokens held in the cache
        self.detok = Detokenizer(tokenizer, req.stop)
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.state = "waiting"     # waiting | prefilling | running | preempted
        self.prompt = None         # while prefilling: its PromptRun (runner.py), a few chunks a step
        self.enqueued = req.arrival
        self.quantum_steps = 0
        self.swapped = None        # the cache of a swapped-out sequence (host memory)
        self.swap_path: Path | None = None  # ... or its file, beyond the host budget
        self.preemptions = 0
        self.parked = False        # suspended by its agent: not scheduled until resumed
        self.keep_swap_file = False  # a snapshot's cache file: restored from, not consumed
        self.matcher = req.matcher   # the grammar its output must follow (structured output), or None
        self.logprobs: list = []     # with req.logprobs: (token, logprob, top alternatives) per token
        self._step_logprobs = None
        self._lp_sent = 0            # log-probabilities already sent with a text delta
        self.prompt_logprobs: list = []    # with req.prompt_logprobs: the prompt's, scored at its prefill
        self.repeats = repeat_watch(req)   # a reply that may make several tool calls ends at a repeated one
        self.forced: list[int] = []        # the tokens of its grammar's shortest ending, still to write ...
        self.closed = False                # ... once its budget ran low (then it ends with them)
        self._far_until = 0                # its ending needs more than the budget left: not looked at till here
        self.lookup = None                 # its n-gram index for prompt-lookup drafts (lookup.py), once it drafts
        # the tokens that end the reply: EOS (unless the request ignores it) and its stop token ids
        self.ends = req.shaping.ends(eos_ids)

    @property
    def started(self) -> bool:
        return self.pending >= 0

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing per row to apply first (grammar, log-probabilities, penalties, biases, a length
        floor): batchable with others."""
        return (self.req.temperature <= 0 and self.matcher is None and not self.req.logprobs
                and not self.shaped)

    @property
    def shaped(self) -> bool:
        x = self.req.shaping
        return x.penalizes or len(self.ids) < x.min_tokens

    def pick(self, row) -> int:
        """This sequence's next token from its row of logits: log-probabilities taken from the model's own
        distribution (before the grammar and temperature), its penalties and biases, the grammar's mask, then its
        sampling."""
        if self.req.logprobs:
            self._step_logprobs = torch.log_softmax(row.float(), dim=-1)
        if self.forced or self._close_now():
            return self.forced.pop(0)
        if self.shaped:
            row = shape(row, self.req.shaping, self.req.prompt_ids, self.ids, self.ends)
        self.constrain(row)
        return choose(row, self.req.temperature, self.req.top_p, self.req.top_k, self.gen, self.req.shaping.min_p)

    def _close_now(self) -> bool:
        """As its budget runs out, a reply under a grammar is steered onto the shortest valid ending of what it
        wrote (`closing.ending`), once that ending, checked by the grammar, just fits what is left: its tokens go
        to `forced`, and the reply ends with them (`closed`), parsing and validating."""
        left = self.req.max_tokens - len(self.ids)
        if self.matcher is None or self.closed or left > CLOSE_WINDOW or len(self.ids) < self._far_until:
            return False
        text = ending(self.req.output, self.detok.text)
        if text is None:
            return False
        toks = self._encode(text)     # (every step in the window: ~0.1 ms; a call closing can grow it by a call)
        if len(toks) > left:          # past fitting: a token shortens an ending by a few at most, so wait
            self._far_until = len(self.ids) + (len(toks) - left) // 4
            return False
        if not text:      # whole: it ends here unless another call (written after a "\n") would still fit
            more = ending(self.req.output, self.detok.text + "\n")
            need = len(self._encode(more)) + 1 if more is not None else 0
            if more is not None and need < left - CLOSE_MARGIN:
                return False
        elif not left - CLOSE_MARGIN <= len(toks) <= left:
            return False
        if toks:
            m = self.matcher.deep_copy()
            if m.try_consume_tokens(toks) != len(toks) or not m.is_accepting():
                return False
        elif self.matcher.is_accepting() and self.ends:
            toks = [min(self.ends)]          # whole already: it ends here
        else:
            return False
        self.forced, self.closed = toks, True
        return True

    def _encode(self, text: str) -> list[int]:
        return list(self.detok.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def constrain(self, row) -> None:
        """Forbid, in this sequence's row of logits, every token its grammar does not allow next. Its own
        state only: rows of one batch follow different grammars (or none) side by side."""
        if self.matcher is None:
            return
        mask = self.matcher.compute_bitmask()
        if self.matcher.is_error():     # a grammar past its limits (lexer fuel, parser items): this row ends
            raise SamplingError(f"the output grammar failed: {self.matcher.get_error()[:300]}")
        allowed = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
        n = row.shape[-1]
        allowed = torch.from_numpy(allowed[:n])
        row[: allowed.shape[0]].masked_fill_(allowed == 0, float("-inf"))
        if allowed.shape[0] < n:
            row[allowed.shape[0]:] = float("-inf")

    def add_token(self, tok: int) -> Finish | None:
        """Record a sampled token and stream the text it completes (with the log-probabilities of the tokens
        it took); the finish reason if it ends the sequence."""
        if tok in self.ends:
            return Finish.STOP
        self.ids.append(tok)
        self.pending = tok
        if self._step_logprobs is not None:
            lps, self._step_logprobs = self._step_logprobs, None
            top = []
            if self.req.top_logprobs:
                values, ids = lps.topk(self.req.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            self.logprobs.append((tok, float(lps[tok]), top))
        grammar_done = False
        if self.matcher is not None:
            self.matcher.consume_token(tok)
            grammar_done = self.matcher.is_stopped()      # nothing but the end can follow
        if self.detok.add(self.ids) or grammar_done or (self.closed and not self.forced):
            return Finish.STOP
        if self.repeats is not None and self.repeats.repeated(self.detok.text):
            return Finish.STOP
        if len(self.ids) >= self.req.max_tokens:
            return Finish.LENGTH
        new = self.detok.ready()
        if new:
            self.handle.put(TextDelta(new, len(self.ids), logprobs=self._unsent_logprobs()))
        return None

    def _unsent_logprobs(self) -> list:
        out = self.logprobs[self._lp_sent:]
        self._lp_sent = len(self.logprobs)
        return out

    def finish(self, finish: Finish, snapshot_id: str = "") -> None:
        """Send the rest of the text and the final event."""
        now = time.monotonic()
        if finish != Finish.SNAPSHOT:   # (after a stop string, nothing is left to flush)
            self.detok.flush(self.ids)
        # A snapshot ends its stream with whole characters only: ids that end inside a character are decoded by
        # the generation that restores it, with the ids that complete them (flushing them here sent a "\ufffd"
        # that the restored stream then sent again, whole or as another "\ufffd")
        rest = self.detok.rest()
        if rest or self._lp_sent < len(self.logprobs):
            self.handle.put(TextDelta(rest, len(self.ids), logprobs=self._unsent_logprobs()))
        admitted = self.admitted_at or now
        self.handle.put(Final(
            text=self.text, finish=finish, prompt_tokens=len(self.req.prompt_ids), completion_tokens=len(self.ids),
            queue_wait_ms=(admitted - self.req.arrival) * 1e3,
            ttft_ms=((self.first_token_at or now) - self.req.arrival) * 1e3,
            total_ms=(now - self.req.arrival) * 1e3, token_ids=list(self.ids), preemptions=self.preemptions,
            logprobs=list(self.logprobs), prompt_logprobs=self.prompt_logprobs, closed=self.closed,
            snapshot_id=snapshot_id))
