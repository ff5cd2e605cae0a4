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

import torch  # noqa: E402
from concurrency import QUESTIONS  # noqa: E402


def chat_ids(tokenizer, i: int, j: int) -> list[int]:
    """The prompt `vs_vllm.py` sends for agent i's call j, as token ids."""
    q = QUESTIONS[(i * 3 + j) % len(QUESTIONS)]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": f"{q} (agent {i}, call {j})"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def decode_step_ms(lm, batch_size: int, steps: int) -> float:
    """Mean ms of one decode step of `batch_size` rows, each holding a prefilled chat prompt."""
    from kernos.kernel.llm.engine.batch import RunningBatch
    from kernos.kernel.llm.engine.runner import ModelRunner

    runner, batch = ModelRunner(lm), RunningBatch(threading.Lock())

    class Row:
        def __init__(self, pending: int, position: int):
            self.pending, self.position = pending, position
            self.req = type("Req", (), {"adapter": None})()

    with torch.inference_mode():
        for i in range(batch_size):
            ids = chat_ids(lm.tokenizer, i, 0)
            logits, past, mask, _ = runner.prefill(ids, None)
            batch.join(Row(int(logits.float().argmax()), len(ids)), past, mask)

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


def prefill_ms(lm, chunk: int, repeats: int = 5) -> tuple[int, float]:
    from kernos.kernel.llm.engine.runner import ModelRunner

    runner, ids = ModelRunner(lm), chat_ids(lm.tokenizer, 3, 1)
    with torch.inference_mode():
        for _ in range(2):
            runner.prefill(ids, None, chunk=chunk)
        t0 = time.perf_counter()
        for _ in range(repeats):
            runner.prefill(ids, None, chunk=chunk)
    return len(ids), (time.perf_counter() - t0) / repeats * 1e3


def closed_loop(engine, tokenizer, agents: int, calls: int, max_tokens: int) -> dict:
    """`agents` threads, each submitting `calls` requests one after another; a failed call fails the run."""
    from kernos.kernel.llm.types import GenRequest, RequestHandle

    def agent(i: int) -> int:
        used = 0
        for j in range(calls):
            req = GenRequest(request_id=f"a{agents}-{i}-{j}", agent_id=f"agent-{i}",
                             prompt_ids=chat_ids(tokenizer, i, j), max_tokens=max_tokens)
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
    args = ap.parse_args()

    from kernos.kernel.config import EngineConfig, KernelConfig, ModelConfig
    from kernos.kernel.llm.core import LLMCore

    work = Path(tempfile.mkdtemp(prefix="kernos-bench-steps-"))
    models = [ModelConfig(name="bench", path=str(Path(args.model).resolve()), dtype=args.dtype)] if args.model \
        else [ModelConfig(name="bench", path="embedded", dtype=args.dtype)]
    # The engine exactly as `kernos serve` builds it (policy, budgets, resident cache, threads, packed weights).
    core = LLMCore(KernelConfig(data_dir=work, models=models, engine=EngineConfig(threads=args.threads)))
    engine = core.get("bench").engine
    lm = engine.lm
    result: dict = {"dtype": str(lm.dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
    print(f"{lm.name} ({lm.path}): {result['dtype']}, {result['threads']} torch threads", file=sys.stderr)

    for b in args.batch:
        ms = decode_step_ms(lm, b, steps=20)
        result[f"decode_step_ms_b{b}"] = round(ms, 1)
        print(f"decode step, batch {b:3d}: {ms:7.1f} ms ({b / ms * 1e3:6.1f} tok/s)")
    for c in args.chunks:
        n, ms = prefill_ms(lm, c)
        result[f"prefill_ms_chunk{c}"] = round(ms, 1)
        print(f"prefill of {n} tokens, chunk {c or 'whole':>5}: {ms:7.1f} ms")

    try:
        closed_loop(engine, lm.tokenizer, 2, 1, 8)          # warm-up
        for n in args.batch:
            r = closed_loop(engine, lm.tokenizer, n, args.calls, args.max_tokens)
            result[f"agents_{n}"] = r
            print(f"in-process, {n:3d} agents x {args.calls} calls x {args.max_tokens} tokens: {r['tok_s']:7.1f} "
                  f"tok/s, wall {r['wall_s']} s, {r['decode_steps']} decode steps, mean batch {r['mean_batch']}")
    finally:
        core.drain(30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
