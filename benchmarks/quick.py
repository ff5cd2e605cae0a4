"""`--quick`, which every benchmark script takes: its smallest run, on a tiny random model where it has a model,
in seconds. The suite runs each script so (`tests/test_benchmarks.py`): a move in the kernel that breaks a
benchmark fails there, not months later. Its numbers mean nothing."""
from __future__ import annotations

from pathlib import Path

HELP = ("the smallest run (tiny random model, a few calls) that checks the script still works; the suite runs "
        "it; its numbers mean nothing")


def tiny_model(work: Path, head_dim: int | None = None) -> Path:
    """A tiny random Llama with a trained tokenizer and a chat template, built in `work` (vLLM's CPU attention
    takes head_dim 32 and up)."""
    from kernos.kernel.llm.testing import build_tiny_model

    return build_tiny_model(work / "tiny", "llama", head_dim=head_dim)
