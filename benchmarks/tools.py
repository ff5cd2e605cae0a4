"""The cost of running tool code in the jail: an empty `python` tool call through a real kernel (SDK,
gRPC loopback), a built-in call for comparison, and, in-process side by side, the jailed runner against the
unjailed one (the same limits without the namespaces: what `tools.unsafe_no_jail` runs). Prints a table
and one JSON line.

    python benchmarks/tools.py [--calls 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import quick  # noqa: E402


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    if args.quick:
        args.calls = 6
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel

    work = Path(tempfile.mkdtemp(prefix="kernos-bench-tools-"))
    cfg = write_config(work / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}])
    proc, address = start_kernel(work / "data", str(cfg), timeout=120)
    rows = {}
    try:
        with kernos.sdk.connect(address, agent="bench-tools") as s:
            for _ in range(5):
                s.tools.call("python", code="result = None")
            rows["python tool (kernel)"] = timed(lambda: s.tools.call("python", code="result = None"), args.calls)
            rows["calculator (kernel)"] = timed(lambda: s.tools.call("calculator", expression="1+1"), args.calls)
    finally:
        stop_kernel(proc)
    try:
        from kernos.kernel.tools.jail import Jail, Limits
        from kernos.kernel.tools.sandbox import run_python

        jail, limits = Jail(), Limits()
        for _ in range(3):   # alternate, so drift on a noisy machine hits both
            rows.setdefault("runner, jailed", []).extend(
                timed(lambda: run_python("result = None", {}, limits, jail), args.calls // 3))
            rows.setdefault("runner, unjailed", []).extend(
                timed(lambda: run_python("result = None", {}, limits, None), args.calls // 3))
    except ImportError:
        pass                  # a kernel from before the jail
    print(f"{'':<24}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, xs in rows.items():
        print(f"{name:<24}{statistics.median(xs):>9.1f}{p(xs, .9):>9.1f}{p(xs, .99):>9.1f}")
    out = {"benchmark": "tools", "calls": args.calls,
           **{name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + "_p50_ms":
              round(statistics.median(xs), 2) for name, xs in rows.items()}}
    if "runner, jailed" in rows:
        out["jail_cost_ms"] = round(statistics.median(rows["runner, jailed"]) -
                                    statistics.median(rows["runner, unjailed"]), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
