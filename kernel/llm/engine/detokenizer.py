"""Incremental detokenization of one sequence, with its stop strings.

Each step decodes only a short window of the newest ids (from the last point where the text was whole),
not every generated id again: the text grows by what the window adds beyond its known prefix, and only
once it ends in a whole character. The result is the text a full decode gives (the window starts at a
token boundary, so tokenizers that treat the first token of a decode specially see the same context).
A stop string is searched only where a new one could appear; text that could be the start of one is held
back from streaming."""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0           # chars of `text` already streamed
        self._prefix = 0           # ids[_prefix:_read] decode to the tail of `text`
        self._read = 0             # ids up to here are in `text`

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> bool:
        """`ids` (all generated ids, the newest last) grew: extend the text. True if a stop string appeared
        (the text is cut before it)."""
        known = self._decode(ids[self._prefix:self._read])
        window = self._decode(ids[self._prefix:])
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return False           # no whole new character yet
        start = len(self.text)
        self.text += window[len(known):]
        self._prefix, self._read = self._read, len(ids)
        if self.stop:
            lo = max(0, start - self.hold)
            cut = min((i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                return True
        return False

    def flush(self, ids: list[int]) -> None:
        """At the end: whatever the last ids decode to, an incomplete character included."""
        if self._read < len(ids):
            known = self._decode(ids[self._prefix:self._read])
            self.text += self._decode(ids[self._prefix:])[len(known):]
            self._prefix = self._read = len(ids)

    def ready(self) -> str:
        """New text that is safe to stream (cannot become part of a stop string); marks it streamed."""
        safe = len(self.text) - (self.hold if self.stop else 0)
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:safe], safe
        return out

    def rest(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out

    def restore(self, ids: list[int], emitted: int) -> None:
        """Continue after `ids` were generated and `emitted` chars of their text already streamed."""
        end = len(ids)
        while end > 0 and end > len(ids) - 4 and self._decode(ids[:end]).endswith("\ufffd"):
            end -= 1
        self.text = self._decode(ids[:end])
        self._prefix = self._read = end
        self.emitted = min(emitted, len(self.text))
