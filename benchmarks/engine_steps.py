"""Where the own engine's time goes, without the kernel around it: one decode step of a running batch, one
prompt's prefill at several chunk sizes, and N closed-loop agents driving the engine in-process (threads
submitting GenRequests, no gRPC, no HTTP). Compare the last with `vs_vllm.py` (the same workload through the
kernel) to tell the engine's cost from the servers'. Prints a table and one JSON line.

    python benchmarks/engine_steps.py                      # embedded SmolLM2-135M, bf16, engine threads
    python benchmarks/engine_steps.py --threads 2 --batch 8 24 --dtype float32
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quick  # noqa: E402
import torch  # noqa: E402
from concurrency import QUESTIONS  # noqa: E402


def chat_ids(served, i: int, j: int) -> list[int]:
    """The prompt `vs_vllm.py` sends for agent i's call j, encoded as the kernel encodes a chat call."""
    q = QUESTIONS[(i * 3 + j) % len(QUESTIONS)]
    return served.encode_chat([{"role": "user", "content": f"{q} (agent {i}, call {j})"}])


def decode_step_ms(served, batch_size: int, steps: int) -> float:
    """Mean ms of one decode step of `batch_size` rows, each holding a prefilled chat prompt."""
    from kernos.kernel.llm.engine.batch import RunningBatch
    from kernos.kernel.llm.engine.sequence import Sequence
    from kernos.kernel.llm.types import GenRequest, RequestHandle

    runner, batch = served.engine.runner, RunningBatch(threading.Lock())
    with torch.inference_mode():
        for i in range(batch_size):
            req = GenRequest(request_id=f"step-{i}", agent_id=f"agent-{i}", prompt_ids=chat_ids(served, i, 0),
                             max_tokens=steps + 3)
            logits, past, mask, _ = runner.prefill(req.prompt_ids, None)
            row = Sequence(req, RequestHandle(req), served.tokenizer, served.engine.lm.eos_ids)
            row.pending, row.position = int(logits.float().argmax()), len(req.prompt_ids)
            batch.join(row, past, mask)

        def step() -> None:
            nxt = runner.decode(batch).float().argmax(-1).tolist()
            for row, tok in zip(batch.rows, nxt, strict=True):
                row.pending, row.position = tok, row.position + 1

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps * 1e3


def prefill_ms(served, chunk: int, repeats: int = 5) -> tuple[int, float]:
    runner, ids = served.engine.runner, chat_ids(served, 3, 1)
    with torch.inference_mode():
        for _ in range(2):
            runner.prefill(ids, None, chunk=chunk)
        t0 = time.perf_counter()
        for _ in range(repeats):
            runner.prefill(ids, None, chunk=chunk)
    return len(ids), (time.perf_counter() - t0) / repeats * 1e3


def closed_loop(served, agents: int, calls: int, max_tokens: int) -> dict:
    """`agents` threads, each submitting `calls` requests one after another; a failed call fails the run."""
    from kernos.kernel.llm.types import GenRequest, RequestHandle

    engine = served.engine

    def agent(i: int) -> int:
        used = 0
        for j in range(calls):
            req = GenRequest(request_id=f"a{agents}-{i}-{j}", agent_id=f"agent-{i}",
                             prompt_ids=chat_ids(served, i, j), max_tokens=max_tokens)
            handle = RequestHandle(req)
            engine.submit(req, handle)
            used += handle.result(timeout=600).completion_tokens
        return used

    steps0, rows0 = engine.stats.decode_steps, engine.stats.batch_rows
    t0 = time.perf_counter()
    with ThreadPoolExecutor(agents) as pool:
        tokens = sum(pool.map(agent, range(agents)))
    wall = time.perf_counter() - t0
    steps = engine.stats.decode_steps - steps0
    return {"tok_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "decode_steps": steps,
            "mean_batch": round((engine.stats.batch_rows - rows0) / max(1, steps), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a local transformers folder (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the kernel's default)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 24], help="decode-step batch sizes and agents")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 64], help="prefill chunk sizes (0: whole)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kernos-bench-steps-"))
    if args.quick:
        args.model = str(quick.tiny_model(work))
        args.batch, args.chunks, args.calls, args.max_tokens = [2], [0, 8], 1, 4

    from kernos.kernel.config import EngineConfig, KernelConfig, ModelConfig
    from kernos.kernel.llm.core import LLMCore

    models = [ModelConfig(name="bench", path=str(Path(args.model).resolve()), dtype=args.dtype)] if args.model \
        else [ModelConfig(name="bench", path="embedded", dtype=args.dtype)]
    # The engine exactly as `kernos serve` builds it (policy, budgets, resident cache, threads, packed weights).
    core = LLMCore(models, "bench", EngineConfig(threads=args.threads), KernelConfig().scheduler.make, work)
    served = core.get("bench")
    lm = served.engine.lm
    result: dict = {"dtype": str(lm.dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    print(f"{lm.name} ({lm.path}): {result['dtype']}, {result['threads']} torch threads", file=sys.stderr)

    for b in args.batch:
        ms = decode_step_ms(served, b, steps=20)
        result[f"decode_step_ms_b{b}"] = round(ms, 1)
        print(f"decode step, batch {b:3d}: {ms:7.1f} ms ({b / ms * 1e3:6.1f} tok/s)")
    for c in args.chunks:
        n, ms = prefill_ms(served, c)
        result[f"prefill_ms_chunk{c}"] = round(ms, 1)
        print(f"prefill of {n} tokens, chunk {c or 'whole':>5}: {ms:7.1f} ms")

    try:
        closed_loop(served, 2, 1, 8)          # warm-up
        for n in args.batch:
            r = closed_loop(served, n, args.calls, args.max_tokens)
            step = result.get(f"decode_step_ms_b{n}")
            if step:     # what prefills, joins and scheduling leave of the batch's bare decode rate
                r["ratio_closed_loop_decode_only"] = round(r["tok_s"] / (n / step * 1e3), 3)
            result[f"agents_{n}"] = r
            print(f"in-process, {n:3d} agents x {args.calls} calls x {args.max_tokens} tokens: {r['tok_s']:7.1f} "
                  f"tok/s, wall {r['wall_s']} s, {r['decode_steps']} decode steps, mean batch {r['mean_batch']}"
                  + (f", {r['ratio_closed_loop_decode_only']:.2f}x of the bare decode rate" if step else ""))
    finally:
        core.drain(30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
