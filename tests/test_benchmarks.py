"""Benchmarks do not rot: every script in `benchmarks/` that runs (`__main__`) takes `--quick`, its smallest run
on a tiny model, and this test runs each one so: a move in the kernel that breaks a benchmark fails here. The
numbers mean nothing; the script must finish and print its JSON line."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text())


def test_every_runnable_script_is_covered():
    assert len(SCRIPTS) >= 12
    for name in SCRIPTS:
        assert "--quick" in (BENCHMARKS / name).read_text(), f"{name} has no --quick"


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run(script, tmp_path):
    if script == "vllm_backend.py" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here (make vllm installs its CPU build)")
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    last = [line for line in out.stdout.splitlines() if line.strip()][-1]
    assert isinstance(json.loads(last), dict), last
