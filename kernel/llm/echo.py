"""The echo engine: no model, no compute. It answers with the last message's words (at most max_tokens of
them) at once. It exists to measure the kernel's own overhead per syscall (gRPC, auth, validation,
dispatch, tracing) and to test the syscall surface quickly."""
from __future__ import annotations

import time

from .base import Engine, EngineStats
from .types import EngineClosed, Final, Finish, GenRequest, RequestHandle, TextDelta


class EchoTokenizer:
    """Words are tokens; ids index a growing vocabulary."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


class EchoEngine(Engine):
    architecture = "echo"

    def __init__(self, name: str):
        self.name = name
        self.tokenizer = EchoTokenizer()
        self.stats = EngineStats()
        self._accepting = True

    def submit(self, request: GenRequest, handle: RequestHandle) -> None:
        if not self._accepting:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        out = request.prompt_ids[-request.max_tokens:] if request.prompt_ids else []
        text = self.tokenizer.decode(out)
        now = time.monotonic()
        if text:
            handle.put(TextDelta(text, len(out)))
        ms = (now - request.arrival) * 1e3
        handle.put(Final(text, Finish.LENGTH if len(out) == request.max_tokens else Finish.STOP,
                         len(request.prompt_ids), len(out), 0.0, ms, ms))
        self.stats.completed += 1
        self.stats.prompt_tokens += len(request.prompt_ids)
        self.stats.generated_tokens += len(out)

    def start(self) -> None:
        pass

    def drain(self, timeout: float) -> bool:
        self._accepting = False
        return True

    def snapshot(self):
        return self.stats, []
