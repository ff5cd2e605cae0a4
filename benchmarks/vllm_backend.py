"""Kernos's vLLM backend (models of kind "vllm") side by side with plain vLLM and with Kernos's own engine, in one
run: the same model folder, the same prompts, the same closed-loop client (the `openai` package, streaming,
against each server's `/v1`). N agents each make 3 chat calls of up to 64 tokens, greedy.

- vllm:          vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`);
- kernos-vllm:   `kernos serve` with the model on vLLM's in-process engine, the same engine arguments;
- kernos-own:    `kernos serve` with the model on Kernos's own engine (its defaults).

Kernos's overhead on vLLM is 1 - kernos-vllm / vllm (target: at most 5%). The servers run one after another,
never at once; each round runs all three, the best round of each is kept. Prints a table and one JSON line.

    python benchmarks/vllm_backend.py                       # 8 and 24 agents, embedded SmolLM2-135M, bf16
    python benchmarks/vllm_backend.py --agents 8 --rounds 1 --dtype float32
    python benchmarks/vllm_backend.py --model /srv/models/llama --memory 0.9     # on a GPU (vllm's CUDA build)
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent / "tests"), str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import quick  # noqa: E402
from vllm_server import VllmServer  # noqa: E402
from vs_vllm import MODEL, closed_loop, kernos_round  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="each round runs the three servers; the best is kept")
    ap.add_argument("--model", default="", help="a local transformers folder (default: the embedded model)")
    ap.add_argument("--dtype", default="bfloat16", help="for vLLM and Kernos's vLLM backend")
    ap.add_argument("--memory", type=float, default=0.3,
                    help="gpu_memory_utilization (on a CPU: share of the NUMA node's memory for the KV cache)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--skip-own", action="store_true", help="leave Kernos's own engine out")
    ap.add_argument("--quick", action="store_true", help=quick.HELP + " (Kernos's vLLM backend, not vLLM's "
                                                                      "server, which takes minutes to start)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="kernos-bench-vllm-backend-"))
    if args.quick:
        args.agents, args.calls, args.max_tokens, args.rounds, args.skip_own = [2], 1, 4, 1, True
        args.model, args.dtype, args.max_model_len = str(quick.tiny_model(work, head_dim=32)), "float32", 256
    if args.model:
        folder = Path(args.model).resolve()
    else:
        from kernos.kernel.llm.embedded import ensure_converted

        folder = ensure_converted(work / "data")
    # Like for like with vLLM's server: no LoRA slots (Kernos turns them on by default for the tuner's adapters).
    vllm_entry = {"kind": "vllm", "vllm": {"max_model_len": args.max_model_len,
                                          "gpu_memory_utilization": args.memory, "enable_lora": False}}
    if args.quick:         # as the suite runs vLLM on the CPU: no compilation, a small KV cache
        vllm_entry["vllm"] = {"max_model_len": args.max_model_len, "enable_lora": False, "enforce_eager": True,
                              "kv_cache_memory_bytes": 256 << 20}

    def plain_vllm() -> dict[int, dict]:
        with VllmServer(folder, MODEL, dtype=args.dtype, max_model_len=args.max_model_len,
                        memory_fraction=args.memory) as url:
            keys = ["none"] * max(args.agents)
            closed_loop(url, keys[:2], 1, 8)
            return {n: closed_loop(url, keys[:n], args.calls, args.max_tokens) for n in args.agents}

    runs = {} if args.quick else {"vllm": plain_vllm}
    runs["kernos-vllm"] = lambda: kernos_round(folder, work, args.agents, args.calls, args.max_tokens, args.dtype,
                                               {}, vllm_entry)
    if not args.skip_own:
        runs["kernos-own"] = lambda: kernos_round(folder, work, args.agents, args.calls, args.max_tokens, None, {})
    best: dict[str, dict[int, dict]] = {name: {} for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            for n, res in run().items():
                print(f"round {r + 1} {name:<11} {n:>3} agents: {res['tok_s']:7.1f} tok/s, "
                      f"TTFT p50 {res['ttft_p50_ms']:7.0f} ms", file=sys.stderr, flush=True)
                if n not in best[name] or res["tok_s"] > best[name][n]["tok_s"]:
                    best[name][n] = res

    cols = list(runs)
    print(f"{'agents':>6} | " + " | ".join(f"{c + ' tok/s':>17}" for c in cols) + " | overhead on vLLM")
    out = {"model": folder.name, "dtype": args.dtype, "calls": args.calls, "max_tokens": args.max_tokens}
    for n in args.agents:
        kv = best["kernos-vllm"][n]["tok_s"]
        v = best["vllm"][n]["tok_s"] if "vllm" in best else float("nan")
        overhead = 1 - kv / v
        print(f"{n:>6} | " + " | ".join(f"{best[c][n]['tok_s']:>17.1f}" for c in cols) + f" | {overhead:>15.1%}")
        row = {f"{c.replace('-', '_')}_tok_s": round(best[c][n]["tok_s"], 1) for c in cols}
        row.update({f"{c.replace('-', '_')}_ttft_p50_ms": round(best[c][n]["ttft_p50_ms"]) for c in cols})
        if "vllm" in best:
            row["ratio_kernos_vllm"] = round(kv / v, 3)
        if "kernos-own" in best:
            row["ratio_own_engine_vllm_backend"] = round(best["kernos-own"][n]["tok_s"] / kv, 3)
        out[f"agents_{n}"] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
