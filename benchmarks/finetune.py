"""A LoRA fine-tuning job through the kernel against the same peft training loop run directly, side by side
in one run; then the kernel's serving throughput with and without a job training.

1. direct: a plain loop in its own process (peft `get_peft_model`, AdamW, forward/backward/step) on the
   same encoded examples, batch size, LoRA config and thread count. Steps/s over the training steps;
   peak RSS of that process.
2. kernel: the same data written to an agent's storage, `s.tuner.finetune(...)`; the job runs in the
   kernel's worker process. Steps/s is the worker's own rate over all its steps, checkpoints included;
   peak RSS is the worker's. Also the wall time from StartFinetune to the published adapter (worker start,
   evaluations before/after, publication and hot-load included).
3. serving: N agents x M chat calls on the served model with no job, then again while a job trains
   (default tuner settings: a niced worker with its own thread count), generated tokens/s of each.

    python benchmarks/finetune.py --model tiny        # tiny random Llama (seconds)
    python benchmarks/finetune.py --model embedded    # SmolLM2-135M-Instruct (minutes on 2 cores)

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quick  # noqa: E402
from concurrency import QUESTIONS, model_folder  # noqa: E402

ANSWER = (
    "Here is a short and careful answer to that question, number {i}, written in the house style: "
    "first the key fact, then one reason, then a closing line."
)


def rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})"},
                {"role": "assistant", "content": ANSWER.format(i=i)},
            ]
        }
        for i in range(n)
    ]


def direct(model_dir: str, data: str, steps: int, batch: int, rank: int, threads: int) -> dict:
    """The plain peft loop a user would write, on the same examples."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kernos.kernel.tuner.config import TrainConfig
    from kernos.kernel.tuner.train import collate, encode, load_base, lora_targets

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = load_base(Path(model_dir))
    examples = [encode(tok, r, 512) for r in json.loads(Path(data).read_text())]
    modules, params = lora_targets(model, TrainConfig(rank=rank))
    model = get_peft_model(
        model,
        LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=modules, target_parameters=params or None, task_type="CAUSAL_LM"
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    for step in range(steps):
        b = [examples[(step * batch + j) % len(examples)] for j in range(batch)]
        x, m, y = collate(b, pad)
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {
        "steps_per_s": steps / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(loss),
    }


def serve_load(address: str, agents: int, calls: int, max_tokens: int) -> float:
    """Generated tokens per second of `agents` concurrent agents making `calls` chat calls each."""
    import kernos.sdk

    sessions = [
        kernos.sdk.connect(address, agent=f"srv-{os.getpid()}-{i}-{time.monotonic_ns()}") for i in range(agents)
    ]
    tokens = [0] * agents

    def run(i):
        for c in range(calls):
            r = sessions[i].llm.chat(f"{QUESTIONS[(i + c) % len(QUESTIONS)]} (agent {i})", max_tokens=max_tokens)
            tokens[i] += r.completion_tokens

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for s in sessions:
        s.exit()
    return sum(tokens) / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | embedded | a local model folder")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: 300 tiny, 30 embedded)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both loops")
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="kernel job's checkpoint interval in steps (default: TrainConfig's, 25)",
    )
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--direct-only", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps, args.agents, args.calls, args.max_tokens = "tiny", 4, 2, 1, 4
    if args.direct_only:
        spec = json.loads(args.direct_only[0])
        print(json.dumps(direct(**spec)))
        return 0

    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel

    work = Path(tempfile.mkdtemp(prefix="kernos-bench-ft-"))
    name, folder = model_folder(args.model, work)
    steps = args.steps or (300 if args.model == "tiny" else 30)
    data = rows(64)
    (work / "data.json").write_text(json.dumps(data))

    # 1. direct, in its own process (clean peak RSS)
    spec = dict(
        model_dir=str(folder),
        data=str(work / "data.json"),
        steps=steps,
        batch=args.batch,
        rank=args.rank,
        threads=args.threads,
    )
    out = subprocess.run(
        [sys.executable, __file__, "--direct-only", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    d = json.loads(out.stdout.strip().splitlines()[-1])

    # 2. the same through the kernel
    cfg = write_config(work / "k.toml", [{"name": name, "path": str(folder)}], tuner={"threads": 1})
    proc, address = start_kernel(work / "kdata", str(cfg), timeout=600)
    try:
        with kernos.sdk.connect(address, agent="bench-tuner") as s:
            train = "".join(json.dumps(r) + "\n" for r in data)
            s.storage.write("datasets/bench.train.jsonl", train.encode())
            s.storage.write("datasets/bench.eval.jsonl", "".join(json.dumps(r) + "\n" for r in data[:4]).encode())
            job_cfg = {
                "max_steps": steps,
                "batch_size": args.batch,
                "rank": args.rank,
                "alpha": 2 * args.rank,
                "threads": args.threads,
                "eval_limit": 4,
                "eval_max_new_tokens": 8,
            }
            if args.checkpoint_every:
                job_cfg["checkpoint_every"] = args.checkpoint_every
            t0 = time.perf_counter()
            job = s.tuner.wait(s.tuner.finetune("bench", "bench", config=job_cfg).job_id, timeout=3600)
            wall = time.perf_counter() - t0
            k = {"steps_per_s": job.steps_per_s, "peak_rss_mb": job.peak_rss_mb, "wall_s": wall, "state": job.state}

            # 3. serving throughput: alone, then with a job training (default worker: 1 thread, niced)
            alone = serve_load(address, args.agents, args.calls, args.max_tokens)
            long_cfg = {"max_steps": 100000, "batch_size": args.batch, "rank": args.rank, "eval_limit": 1}
            bg = s.tuner.finetune("background", "bench", config=long_cfg)
            while s.tuner.job(bg.job_id).step < 2:
                time.sleep(0.2)
            during = serve_load(address, args.agents, args.calls, args.max_tokens)
            bg_job = s.tuner.job(bg.job_id)
            s.tuner.cancel(bg.job_id)
    finally:
        stop_kernel(proc)

    ratio = k["steps_per_s"] / d["steps_per_s"]
    serve_ratio = during / alone
    print(f"model {name}, {steps} steps, batch {args.batch}, LoRA r={args.rank}, {args.threads} threads")
    print(f"{'':<34}{'steps/s':>10}{'peak RSS MB':>13}")
    print(f"{'direct peft loop':<34}{d['steps_per_s']:>10.2f}{d['peak_rss_mb']:>13.0f}")
    print(f"{'kernel job (worker process)':<34}{k['steps_per_s']:>10.2f}{k['peak_rss_mb']:>13.0f}")
    print(
        f"kernel / direct: {ratio:.2f}x (target >= 0.9x); job wall time {k['wall_s']:.1f} s "
        f"(start to published, evaluations included), state {k['state']}"
    )
    print(
        f"serving: {alone:.1f} tok/s alone, {during:.1f} tok/s with a job training "
        f"({serve_ratio:.2f}x; the job made {bg_job.steps_per_s:.2f} steps/s meanwhile)"
    )
    print(
        json.dumps(
            {
                "benchmark": "finetune",
                "model": name,
                "steps": steps,
                "batch": args.batch,
                "direct_steps_per_s": round(d["steps_per_s"], 3),
                "kernel_steps_per_s": round(k["steps_per_s"], 3),
                "kernel_vs_direct": round(ratio, 3),
                "direct_peak_rss_mb": round(d["peak_rss_mb"]),
                "kernel_peak_rss_mb": round(k["peak_rss_mb"]),
                "job_wall_s": round(k["wall_s"], 1),
                "serving_tok_s_alone": round(alone, 1),
                "serving_tok_s_training": round(during, 1),
                "serving_ratio": round(serve_ratio, 3),
                "background_steps_per_s": round(bg_job.steps_per_s, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
