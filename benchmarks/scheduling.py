"""Scheduling policies under a mixed agent workload, and the cost of a context switch.

Part 1 (per policy): 2 agents with long generations (256 tokens) and 8 agents with short ones
(16 tokens) arriving over time, on one engine whose batch holds only 2 sequences (a device that is full).
Prints p50/p99 latency of the short requests, total throughput, and Jain's fairness index over agents
(of each agent's tokens per second of latency). Shorts carry priority 5, longs 0 (used by the priority
policy only). End-of-sequence is ignored so every request generates exactly its max_tokens, as in
vLLM's benchmarks (`ignore_eos`).

Part 2: context-switch cost against context length for a Llama and a Jamba of similar size (random
weights; the timing does not depend on them): recompute (re-prefill), swap to host memory (copy out +
in) and swap to disk (safetensors out + in). The crossover is where recompute becomes cheaper.

    python benchmarks/scheduling.py                 # embedded SmolLM2-135M for part 1
    python benchmarks/scheduling.py --model tiny    # fast smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import quick  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLICIES = {
    "fifo": {},
    "round_robin": {"quantum": 16},
    "priority": {"aging_per_s": 1.0, "preempt_margin": 1.0},
    "fair_share": {"window_s": 60.0, "quantum": 16},
}


def load(spec: str, work: Path):
    from kernos.kernel.config import EngineConfig, ModelConfig
    from kernos.kernel.llm.registry import load_model

    if spec == "tiny":
        from kernos.kernel.llm.testing import build_tiny_model

        path = build_tiny_model(work / "tiny", "llama")
    elif spec == "embedded":
        from kernos.kernel.llm.embedded import ensure_converted

        path = ensure_converted(Path(os.path.expanduser("~/.kernos")))
    else:
        path = Path(spec)
    lm = load_model(ModelConfig(name="bench", path=str(path)), EngineConfig(), work)
    lm.eos_ids = set()  # ignore_eos: fixed-length requests
    return lm


def workload(lm, long_tokens: int, short_tokens: int, n_short: int, spacing_s: float):
    from kernos.kernel.llm.types import GenRequest

    def ids(text):
        out = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    jobs = [
        (0.0, GenRequest(f"long{i}", f"long-agent-{i}", ids(f"Write a long essay, part {i}."), long_tokens))
        for i in range(2)
    ]
    jobs += [
        (
            0.05 + i * spacing_s,
            GenRequest(f"short{i}", f"short-agent-{i}", ids(f"Quick question {i}?"), short_tokens, priority=5),
        )
        for i in range(n_short)
    ]
    return jobs


def run_policy(lm, name: str, jobs, batch: int):
    from kernos.kernel.llm.engine import TransformersEngine
    from kernos.kernel.llm.types import GenRequest, RequestHandle
    from kernos.scheduler import make_policy

    engine = TransformersEngine(lm, max_batch_size=batch, policy=make_policy(name, **POLICIES[name]))
    engine.start()
    results = {}
    t0 = time.monotonic()

    def submit(at, req):
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        r = GenRequest(req.request_id, req.agent_id, req.prompt_ids, req.max_tokens, priority=req.priority)
        h = RequestHandle(r)
        start = time.monotonic()
        engine.submit(r, h)
        final = h.result(timeout=3600)
        results[r.request_id] = (r.agent_id, final.completion_tokens, time.monotonic() - start)

    threads = [threading.Thread(target=submit, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makespan = time.monotonic() - t0
    engine.drain(5)
    short = [lat for rid, (_, _, lat) in results.items() if rid.startswith("short")]
    tokens = sum(n for _, n, _ in results.values())
    rates = [n / lat for _, n, lat in results.values()]
    jain = sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates))
    return {
        "policy": name,
        "short_p50_s": statistics.median(short),
        "short_p99_s": pct(short, 0.99),
        "throughput_tok_s": tokens / makespan,
        "jain": jain,
        "context_switches": engine.stats.context_switches,
        "switch_ms": engine.stats.switch_seconds * 1e3,
    }


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def switch_costs(work: Path, lengths: list[int]):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, JambaConfig, LlamaConfig

    from kernos.kernel.llm.engine import cache as cache_ops

    common = dict(
        vocab_size=8192,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=4096,
    )
    configs = {
        "llama": LlamaConfig(**common),
        "jamba": JambaConfig(
            attn_layer_period=4,
            attn_layer_offset=3,
            expert_layer_period=100,
            expert_layer_offset=99,
            num_experts=1,
            mamba_d_state=16,
            **common,
        ),
    }
    rows = []
    for arch, cfg in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        for n in lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, n))
            with torch.inference_mode():
                model(ids[:, :8], use_cache=True)  # warm up
                t0 = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                recompute = time.perf_counter() - t0
                cache = out.past_key_values
                t0 = time.perf_counter()
                saved = cache_ops.extract_row(cache, 0, n)
                back = cache_ops.extract_row(saved, 0, n)
                host = time.perf_counter() - t0
                path = work / f"swap-{arch}-{n}.safetensors"
                t0 = time.perf_counter()
                save_file({k: v.contiguous() for k, v in cache_ops.tensors(saved).items()}, str(path))
                cache_ops.load_tensors(saved, load_file(str(path)), "cpu")
                disk = time.perf_counter() - t0
                path.unlink()
            rows.append(
                {
                    "arch": arch,
                    "tokens": n,
                    "cache_bytes": cache_ops.nbytes(cache),
                    "recompute_ms": recompute * 1e3,
                    "swap_host_ms": host * 1e3,
                    "swap_disk_ms": disk * 1e3,
                }
            )
            del back
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | tiny | local model folder")
    ap.add_argument("--batch", type=int, default=2, help="sequences the engine may run at once")
    ap.add_argument("--long-tokens", type=int, default=256)
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--shorts", type=int, default=8)
    ap.add_argument("--spacing", type=float, default=None, help="seconds between short arrivals (default: scaled)")
    ap.add_argument("--lengths", default="64,128,256,512,1024,2048")
    ap.add_argument("--skip-switch", action="store_true")
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    if args.quick:
        args.model, args.long_tokens, args.short_tokens, args.shorts, args.lengths = "tiny", 16, 4, 2, "16,32"
    work = Path(tempfile.mkdtemp(prefix="kernos-sched-"))
    lm = load(args.model, work)
    spacing = args.spacing
    if spacing is None:  # spread the shorts over roughly the first half of the long generations
        from kernos.kernel.llm.engine import TransformersEngine
        from kernos.kernel.llm.types import GenRequest, RequestHandle

        probe = TransformersEngine(lm, 2)
        probe.start()
        reqs = [GenRequest(f"p{i}", "p", [1, 2, 3, 4], 32) for i in range(2)]
        handles = [RequestHandle(r) for r in reqs]
        t0 = time.monotonic()
        for r, h in zip(reqs, handles):
            probe.submit(r, h)
        [h.result(600) for h in handles]
        step_s = (time.monotonic() - t0) / 32
        probe.drain(1)
        spacing = step_s * args.long_tokens / 2 / args.shorts
    jobs = workload(lm, args.long_tokens, args.short_tokens, args.shorts, spacing)
    print(
        f"part 1: {args.model}, batch {args.batch}, 2 x {args.long_tokens} + {args.shorts} x {args.short_tokens} "
        f"tokens, shorts every {spacing * 1e3:.0f} ms",
        flush=True,
    )
    results = [run_policy(lm, name, jobs, args.batch) for name in POLICIES]
    fifo = results[0]
    print(
        f"\n{'policy':<13}{'short p50 s':>12}{'short p99 s':>12}{'p99 vs fifo':>12}{'tok/s':>9}{'vs fifo':>9}"
        f"{'Jain':>7}{'switches':>10}{'switch ms':>11}"
    )
    for r in results:
        print(
            f"{r['policy']:<13}{r['short_p50_s']:>12.2f}{r['short_p99_s']:>12.2f}"
            f"{fifo['short_p99_s'] / r['short_p99_s']:>11.2f}x{r['throughput_tok_s']:>9.1f}"
            f"{r['throughput_tok_s'] / fifo['throughput_tok_s']:>9.2f}{r['jain']:>7.2f}{r['context_switches']:>10}"
            f"{r['switch_ms']:>11.1f}"
        )
    out = {
        "benchmark": "scheduling",
        "model": args.model,
        "policies": {
            r["policy"]: {
                "short_p99_s": round(r["short_p99_s"], 3),
                "p99_cut_vs_fifo": round(fifo["short_p99_s"] / r["short_p99_s"], 2),
                "throughput_vs_fifo": round(r["throughput_tok_s"] / fifo["throughput_tok_s"], 3),
                "jain": round(r["jain"], 3),
            }
            for r in results
        },
    }
    if not args.skip_switch:
        lengths = [int(x) for x in args.lengths.split(",")]
        print(
            "\npart 2: context-switch cost (random Llama / Jamba, hidden 576, 12 layers; Jamba: 3 attention + 9 Mamba)"
        )
        rows = switch_costs(work, lengths)
        print(f"{'arch':<7}{'tokens':>7}{'cache KB':>10}{'recompute ms':>14}{'swap host ms':>14}{'swap disk ms':>14}")
        for r in rows:
            print(
                f"{r['arch']:<7}{r['tokens']:>7}{r['cache_bytes'] / 1024:>10.0f}{r['recompute_ms']:>14.1f}"
                f"{r['swap_host_ms']:>14.2f}{r['swap_disk_ms']:>14.2f}"
            )
        crossover = {}
        for arch in ("llama", "jamba"):
            mine = [r for r in rows if r["arch"] == arch]
            crossover[arch] = {
                "recompute_beats_host_swap_below": max(
                    [r["tokens"] for r in mine if r["recompute_ms"] < r["swap_host_ms"]], default=0
                ),
                "recompute_beats_disk_swap_below": max(
                    [r["tokens"] for r in mine if r["recompute_ms"] < r["swap_disk_ms"]], default=0
                ),
            }
        print(f"crossover (largest length where recompute is cheaper; 0 = never): {crossover}")
        out["switch"] = rows
        out["crossover"] = crossover
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
