"""N agents each issuing M chat calls through the kernel, against what a user without Kernos writes: the
same model in-process, `model.generate` per request, one at a time. Same prompts, same max_tokens, greedy.

Also measured in the same run: a static batch through `generate` (the ceiling continuous batching
should approach) and the kernel's own overhead per syscall (an empty LLM call on the echo engine,
gRPC loopback). Prints a table and one JSON line.

    python benchmarks/concurrency.py --model tiny          # tiny random Llama built on the fly
    python benchmarks/concurrency.py --model embedded      # SmolLM2-135M-Instruct
    python benchmarks/concurrency.py --model /path/to/local/model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import quick  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Explain what an operating system does.",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "What is a neural network?",
    "Give me a tip for learning Python.",
    "Why is the sky blue?",
    "Name three planets.",
    "What is 12 times 7?",
    "Describe a cat in one sentence.",
    "What does a compiler do?",
]


def prompts_for(n_agents: int, calls: int) -> list[list[str]]:
    return [
        [f"{QUESTIONS[(a * calls + c) % len(QUESTIONS)]} (agent {a}, call {c})" for c in range(calls)]
        for a in range(n_agents)
    ]


def model_folder(spec: str, work: Path) -> tuple[str, Path]:
    if spec == "tiny":
        from kernos.kernel.llm.testing import build_tiny_model

        return "tiny-llama", build_tiny_model(work / "tiny", "llama")
    if spec == "embedded":
        from kernos.kernel.llm.embedded import ensure_converted

        return "smollm2-135m-instruct", ensure_converted(Path(os.path.expanduser("~/.kernos")))
    return Path(spec).name, Path(spec)


_RUNS = itertools.count()


def run_kernel(address: str, model: str, prompts, max_tokens: int):
    import kernos.sdk

    results = [[None] * len(p) for p in prompts]
    run = next(_RUNS)           # each agent name registers once per kernel: new names for each run
    sessions = [kernos.sdk.connect(address, agent=f"bench-{os.getpid()}-{run}-{i}") for i in range(len(prompts))]
    barrier = threading.Barrier(len(prompts) + 1)

    def agent(i):
        barrier.wait()
        for j, p in enumerate(prompts[i]):
            t0 = time.perf_counter()
            c = sessions[i].llm.chat(p, model=model, max_tokens=max_tokens, temperature=0)
            results[i][j] = (c.text, c.completion_tokens, time.perf_counter() - t0)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for s in sessions:
        s.exit()
    return results, wall


def run_baseline(lm, prompts, max_tokens: int):
    import torch

    results = []
    t0 = time.perf_counter()
    for agent_prompts in prompts:
        row = []
        for p in agent_prompts:
            t1 = time.perf_counter()
            ids = encode(lm, p)
            with torch.inference_mode():
                out = lm.model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=sorted(lm.eos_ids),
                    pad_token_id=lm.tokenizer.pad_token_id or 0,
                )
            new = [t for t in out[0, len(ids) :].tolist() if t not in lm.eos_ids]
            row.append((lm.tokenizer.decode(new, skip_special_tokens=True), len(new), time.perf_counter() - t1))
        results.append(row)
    return results, time.perf_counter() - t0


def run_static_batch(lm, prompts, max_tokens: int):
    """One left-padded batch of the first call of every agent through generate (padding rows keep running
    after EOS, so only real tokens are counted)."""
    import torch

    batch = [encode(lm, p[0]) for p in prompts]
    width = max(len(b) for b in batch)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=sorted(lm.eos_ids),
            pad_token_id=pad,
        )
    wall = time.perf_counter() - t0
    tokens = 0
    for row in out[:, width:].tolist():
        for t in row:
            if t in lm.eos_ids:
                break
            tokens += 1
    return tokens, wall


def encode(lm, text):
    out = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def overhead(address: str, calls: int) -> list[float]:
    import kernos.sdk

    lat = []
    with kernos.sdk.connect(address, agent=f"bench-overhead-{os.getpid()}") as s:
        for _ in range(20):
            s.llm.chat("warm up", model="echo", max_tokens=1)
        for _ in range(calls):
            t0 = time.perf_counter()
            s.llm.chat("ping", model="echo", max_tokens=1)
            lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | embedded | path to a local model folder")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3, help="chat calls per agent")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--overhead-calls", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    if args.quick:
        args.model, args.agents, args.calls, args.max_tokens, args.overhead_calls = "tiny", 2, 1, 4, 20

    from conftest import write_config

    from kernos.agents.demo import start_kernel, stop_kernel
    from kernos.kernel.config import EngineConfig, ModelConfig
    from kernos.kernel.llm.registry import load_model

    work = Path(tempfile.mkdtemp(prefix="kernos-bench-"))
    name, folder = model_folder(args.model, work)
    prompts = prompts_for(args.agents, args.calls)
    cfg = write_config(
        work / "k.toml",
        [{"name": name, "path": str(folder)}, {"name": "echo", "path": "-", "kind": "echo"}],
        engine={"max_batch_size": max(args.agents, 1)},
    )
    print(
        f"model {name} from {folder}; {args.agents} agents x {args.calls} calls, max_tokens {args.max_tokens}",
        flush=True,
    )

    lm = load_model(ModelConfig(name=name, path=str(folder)), EngineConfig(), work)
    # Warm both sides once so neither pays first-call costs inside the measurement.
    run_baseline(lm, [[prompts[0][0]]], 4)
    proc, address = start_kernel(work / "data", str(cfg), timeout=300)
    try:
        run_kernel(address, name, [[prompts[0][0]]], 4)
        kernel_res, kernel_wall = run_kernel(address, name, prompts, args.max_tokens)
        base_res, base_wall = run_baseline(lm, prompts, args.max_tokens)
        static_tokens, static_wall = run_static_batch(lm, prompts, args.max_tokens)
        lat = overhead(address, args.overhead_calls)
        kernel_rss = peak_rss_mb(proc.pid)
    finally:
        stop_kernel(proc)
    import resource

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # this process: the baseline

    k_tokens = sum(r[1] for row in kernel_res for r in row)
    b_tokens = sum(r[1] for row in base_res for r in row)
    same = sum(k[0] == b[0] for kr, br in zip(kernel_res, base_res) for k, b in zip(kr, br))
    total = args.agents * args.calls
    k_tps, b_tps, s_tps = k_tokens / kernel_wall, b_tokens / base_wall, static_tokens / static_wall
    k_lat = [r[2] for row in kernel_res for r in row]
    b_lat = [r[2] for row in base_res for r in row]
    print(f"\n{'':<34}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'p50 lat s':>11}{'p99 lat s':>11}")
    print(
        f"{'kernel (continuous batching)':<34}{k_tokens:>8}{kernel_wall:>9.2f}{k_tps:>9.1f}"
        f"{pct(k_lat, 0.5):>11.2f}{pct(k_lat, 0.99):>11.2f}"
    )
    print(
        f"{'baseline (generate per request)':<34}{b_tokens:>8}{base_wall:>9.2f}{b_tps:>9.1f}"
        f"{pct(b_lat, 0.5):>11.2f}{pct(b_lat, 0.99):>11.2f}"
    )
    print(f"{'static batch of %d (generate)' % args.agents:<34}{static_tokens:>8}{static_wall:>9.2f}{s_tps:>9.1f}")
    print(f"\nkernel / baseline throughput: {k_tps / b_tps:.2f}x   kernel / static batch: {k_tps / s_tps:.2f}")
    print(f"identical greedy replies kernel vs baseline: {same}/{total}")
    print(f"peak RSS: kernel process {kernel_rss:.0f} MB (all its models, resident KV, servers); "
          f"baseline process {baseline_rss:.0f} MB")
    print(
        f"kernel overhead per syscall (echo engine, gRPC loopback, {len(lat)} calls): "
        f"p50 {statistics.median(lat):.3f} ms, p99 {pct(lat, 0.99):.3f} ms"
    )
    print(
        json.dumps(
            {
                "benchmark": "concurrency",
                "model": name,
                "agents": args.agents,
                "calls": args.calls,
                "max_tokens": args.max_tokens,
                "kernel_tok_s": round(k_tps, 2),
                "baseline_tok_s": round(b_tps, 2),
                "static_batch_tok_s": round(s_tps, 2),
                "ratio_kernel_baseline": round(k_tps / b_tps, 3),
                "ratio_kernel_static": round(k_tps / s_tps, 3),
                "identical_replies": same,
                "requests": total,
                "overhead_p50_ms": round(statistics.median(lat), 3),
                "overhead_p99_ms": round(pct(lat, 0.99), 3),
                "kernel_peak_rss_mb": round(kernel_rss),
                "baseline_peak_rss_mb": round(baseline_rss),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
