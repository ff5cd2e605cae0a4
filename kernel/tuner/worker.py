"""A fine-tuning job's worker process: `python -m kernos.kernel.tuner.worker JOB_DIR`.

The kernel starts one per running job (niced, with its own torch thread count) so that serving keeps
its threads; it reads the JSON lines this prints (progress, evaluations, the result). The job folder
holds `job.json` (model path, hyper-parameters), `train.jsonl`, `eval.jsonl`; the worker writes
`checkpoint/` as it goes and `result.json` (atomically) at the end. SIGTERM means cancel: the worker
checkpoints at the current step and exits 3. A lock file keeps two workers off one job folder (a kernel
restarted while the old worker still writes its last checkpoint waits for it)."""
from __future__ import annotations

import fcntl
import functools
import json
import os
import resource
import signal
import sys
import traceback
from pathlib import Path

EXIT_CANCELLED = 3


def _emit(event: dict) -> None:
    event["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tie_to_parent() -> None:
    """Lower this process's priority, and get SIGTERM (checkpoint and exit) when the kernel dies."""
    nice = int(os.environ.pop("_KERNOS_WORKER_NICE", "0") or 0)
    if nice:
        os.nice(nice)
    parent = int(os.environ.pop("_KERNOS_WORKER_PARENT", "0") or 0)
    if parent and sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:      # the kernel died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)


def main(job_dir: str) -> int:
    job = Path(job_dir)
    lock = open(job / "lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    stop = {"flag": (job / "cancel").exists()}

    def on_term(*_):
        stop["flag"] = True
    signal.signal(signal.SIGTERM, on_term)
    _tie_to_parent()
    spec = json.loads((job / "job.json").read_text())
    import torch

    from . import preference
    from .config import TrainConfig
    from .grpo import GRPO
    from .train import DataError, train

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        method = spec.get("method", "sft")
        if method == "grpo":
            run = functools.partial(train, objective=GRPO(TrainConfig(**spec["config"]).beta))
        else:
            run = train if method == "sft" else functools.partial(preference.train, method)
        start = job / "start" if (job / "start").is_dir() else None     # continuing from an adapter
        result = run(Path(spec["model_path"]), _rows(job / "train.jsonl"), _rows(job / "eval.jsonl"),
                     TrainConfig(**spec["config"]), job, report=_emit,
                     should_stop=lambda: stop["flag"] or (job / "cancel").exists(), start=start)
        if start is not None and not result["cancelled"]:
            from .combine import combine

            combine(start, Path(result["adapter"]))          # one adapter on the base: the start and the new LoRA
    except DataError as e:
        _emit({"event": "failed", "message": str(e)})
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the kernel, which marks the job failed
        _emit({"event": "failed", "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        return 1
    if result["cancelled"]:
        _emit({"event": "cancelled", "step": result["step"], "total": result["total"]})
        return EXIT_CANCELLED
    if spec.get("retention"):
        try:
            result["retention"] = _retention(spec, job, Path(result["adapter"]))
        except Exception as e:  # noqa: BLE001 - reported; the job fails rather than publish unmeasured
            _emit({"event": "failed", "message": f"retention: {type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-4000:]})
            return 1
        _emit({"event": "retention", **result["retention"]})
    tmp = job / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.rename(job / "result.json")
    _emit({"event": "done", **result})
    return 0


def _retention(spec: dict, job: Path, adapter: Path) -> dict:
    from peft import PeftModel

    from .retention import measure
    from .train import load_base

    base, tok = load_base(Path(spec["model_path"]))
    model = PeftModel.from_pretrained(base, adapter)
    r = spec["retention"]
    return measure(model, tok, _rows(job / "replay.jsonl"), r["reply_tokens"], r["generic"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
