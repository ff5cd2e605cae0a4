"""`kernos demo`: the main job end to end. Starts a kernel (a subprocess) on the embedded default model,
runs the example agents concurrently through the SDK, prints each exchange and a per-agent table, then
stops the kernel with SIGTERM and checks that it drained cleanly."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kernos.sdk

from .examples import ALL_AGENTS, AgentRun


def start_kernel(
    data_dir: Path,
    config: str | None = None,
    timeout: float = 300.0,
    extra_env: dict | None = None,
    listen: str = "127.0.0.1:0",
    http: str = "127.0.0.1:0",
) -> tuple[subprocess.Popen, str]:
    """Start `kernos serve` (on free ports by default); return the process and its gRPC address once READY.
    The HTTP API's address is `proc.http_address` ('' when off)."""
    cmd = [sys.executable, "-m", "kernos.kernel.cli", "serve", "--listen", listen, "--http", http,
           "--data-dir", str(data_dir)]
    if config:
        cmd += ["--config", config]
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    found: list[str] = []

    def read():
        for line in proc.stdout:
            if line.startswith("KERNOS READY") and not found:
                fields = line.split()
                proc.http_address = next((f[5:] for f in fields if f.startswith("http=")), "")
                found.append(fields[2])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None:
            raise RuntimeError(f"the kernel exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the kernel was not ready after {timeout:.0f} s")
        time.sleep(0.1)
    return proc, found[0]


def stop_kernel(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _run_agent(cls, address: str, max_tokens: int) -> AgentRun:
    agent = cls(max_tokens=max_tokens)
    with kernos.sdk.connect(address, agent=f"{agent.name}-{os.getpid()}", description=agent.description) as s:
        return agent.run(s)


def print_report(runs: list[AgentRun], wall_s: float) -> None:
    for r in runs:
        print(f"\n=== {r.name} " + "=" * max(0, 66 - len(r.name)))
        for ex in r.exchanges:
            print(textwrap.indent(textwrap.fill(ex.prompt, 96), "  > "))
            print(textwrap.indent(textwrap.fill(ex.reply or "(empty)", 96), "  < "))
        if r.verdict:
            print(f"  [{r.verdict}]")
    print(
        f"\n{'agent':<16}{'calls':>6}{'prompt tok':>11}{'gen tok':>9}{'mean lat s':>11}"
        f"{'queue ms':>10}{'gen tok/s':>10}"
    )
    total = 0
    for r in runs:
        gen = sum(e.completion_tokens for e in r.exchanges)
        total += gen
        n = len(r.exchanges)
        print(
            f"{r.name:<16}{n:>6}{sum(e.prompt_tokens for e in r.exchanges):>11}{gen:>9}"
            f"{sum(e.latency_s for e in r.exchanges) / n:>11.2f}{sum(e.queue_wait_ms for e in r.exchanges) / n:>10.1f}"
            f"{gen / r.wall_s:>10.1f}"
        )
    print(
        f"{'all agents':<16}{sum(len(r.exchanges) for r in runs):>6}{'':>11}{total:>9}{'':>11}{'':>10}"
        f"{total / wall_s:>10.1f}   (wall {wall_s:.1f} s)"
    )


def run_demo(data_dir: str = ".kernos-demo", max_tokens: int = 64, config: str | None = None,
             linger_s: float = 0.0) -> int:
    data = Path(data_dir).expanduser().resolve()
    print(f"starting the kernel (data dir {data}; the first start converts the embedded model, ~30 s) ...", flush=True)
    t0 = time.perf_counter()
    # An operator token for this run only, to log in to the console (a config's own admin_token gives way to it).
    console_token = secrets.token_urlsafe(24)
    proc, address = start_kernel(data, config, extra_env={"KERNOS_SERVER__ADMIN_TOKEN": console_token})
    print(
        f"kernel ready at {address} after {time.perf_counter() - t0:.1f} s; running {len(ALL_AGENTS)} agents "
        f"concurrently",
        flush=True,
    )
    if proc.http_address:
        print(f"watch it in the console: http://{proc.http_address}/console  (log in with the operator token "
              f"{console_token}; add --linger 600 to keep the kernel up after the agents finish)", flush=True)
    try:
        t1 = time.perf_counter()
        with ThreadPoolExecutor(len(ALL_AGENTS)) as pool:
            runs = list(pool.map(lambda cls: _run_agent(cls, address, max_tokens), ALL_AGENTS))
        wall = time.perf_counter() - t1
        with kernos.sdk.connect(address, agent=f"demo-observer-{os.getpid()}") as s:
            stats = s.kernel.stats()
    except BaseException:
        stop_kernel(proc)
        raise
    print_report(runs, wall)
    for m in stats.models:
        print(
            f"\nkernel: model {m.name} ({m.architecture}, {m.device}) served {m.completed} requests, "
            f"{m.generated_tokens} tokens in {m.decode_steps} decode steps, mean batch size {m.mean_batch_size:.2f}"
        )
    if linger_s > 0:
        print(f"\nthe kernel stays up {linger_s:.0f} s for the console (Ctrl-C stops it sooner) ...", flush=True)
        try:
            time.sleep(linger_s)
        except KeyboardInterrupt:
            pass
    code = stop_kernel(proc)
    print(f"kernel stopped (exit code {code})")
    return 0 if code == 0 else 1
