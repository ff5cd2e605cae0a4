"""Prompt-lookup decoding: drafts copied from what a sequence already holds.

Agents restate their context: they quote tool results, extract records, edit files, repeat a JSON key's path.
The tokens that follow the last few tokens of a reply are then often the tokens that followed the same few
tokens earlier in the prompt or the reply. A sequence's `PromptLookup` keeps an index of its n-grams (prompt
and output, updated as tokens arrive: O(1) a token) and drafts the k tokens that followed the latest earlier
occurrence of its last n tokens (the longest n that matches, from `n_max` down to `n_min`). The engine verifies
a draft in one forward of the model over the pending token and the draft (`drafting.py`).

How many tokens to draft adapts per sequence: after a draft accepted whole, k doubles (to `k_max`); after one
mostly rejected, it halves. A sequence whose drafts keep failing (`REST_AFTER` in a row) stops drafting for a while
(longer with each further failure), because a rejected draft costs a forward over k + 1 tokens for one. On the
own CPU kernels a verify forward costs a decode step plus about a tenth of one per drafted token (the embedded
model, 300-1,000 tokens of context): a failed draft of one token costs 10%, an accepted one saves 90%, so drafts
are cheap to try and 1-grams are worth matching.
"""
from __future__ import annotations

REST_AFTER = 8        # drafts rejected whole in a row before a sequence rests from drafting


class PromptLookup:
    __slots__ = ("k_max", "n_max", "n_min", "k", "tokens", "index", "failures", "off_until", "drafted",
                 "accepted")

    def __init__(self, k_max: int = 8, n_max: int = 3, n_min: int = 1):
        self.k_max, self.n_max, self.n_min = k_max, n_max, max(1, min(n_min, n_max))
        self.k = min(4, k_max)
        self.tokens: list[int] = []
        # n -> {n-gram: where the tokens after its latest occurrence start}, for occurrences followed by a token
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in range(self.n_min, self.n_max + 1)}
        self.failures = 0          # drafts in a row that were all rejected
        self.off_until = 0         # no drafting until the sequence holds this many tokens
        self.drafted = self.accepted = 0

    def sync(self, prompt: list[int], output: list[int]) -> None:
        """Take in the tokens the sequence gained since the last call (its prompt, then its output)."""
        have = len(self.tokens)
        total = len(prompt) + len(output)
        if have >= total:
            return
        new = (prompt[have:] + output) if have < len(prompt) else output[have - len(prompt):]
        for tok in new:
            self.tokens.append(tok)
            end = len(self.tokens) - 1          # the n-grams that end before the new token are followed by it
            for n, table in self.index.items():
                if end >= n:
                    table[tuple(self.tokens[end - n:end])] = end

    def draft(self, room: int) -> list[int]:
        """Up to min(k, room) tokens that followed the latest earlier occurrence of the last n tokens; [] if none
        (or drafting is resting after failures)."""
        k = min(self.k, room)
        if k <= 0 or len(self.tokens) < self.off_until:
            return []
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(self.tokens) <= n:
                continue
            start = self.index[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + k]
        return []

    def observe(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens of which the model agreed with the first `accepted`."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.k = min(self.k_max, self.k * 2)
        elif accepted * 2 < drafted:
            self.k = max(1, self.k // 2)
        if accepted:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= REST_AFTER:       # rest: 8, 16, 32, 64 tokens before the next try
            self.off_until = len(self.tokens) + min(64, 1 << (self.failures - REST_AFTER + 3))
