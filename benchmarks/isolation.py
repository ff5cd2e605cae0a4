"""A victim agent's latency under a hostile neighbour, against a real kernel (issue 30's findings 1, 2, 7 and 8):
1. a grammar bomb (a 315-byte json_schema with minItems 10^8): the kernel's peak memory, and how long the refusal
   took;
2. a temperature of 1.08e-37 beside a victim's stream, both on the embedded model: the victim's gaps between tokens
   (p50/max) and whether it finished;
7. four /v1/embeddings calls of 48 long texts: a victim's memory search + 1 KB storage write (p50/max);
8. two fresh names with 5 slow tool calls each: an operator-created agent's python call (p50/max).
Prints a table and one JSON line. Runs against whatever kernel this checkout is (compare two checkouts).

    python benchmarks/isolation.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import quick  # noqa: E402

ADMIN = "isolation-bench-admin-token-0123"
EMBEDDED = "smollm2-135m-instruct"


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def stats(xs: list[float]) -> tuple[float, float]:
    return (round(statistics.median(xs), 3), round(max(xs), 3)) if xs else (float("nan"), float("nan"))


def grammar_bomb(proc, client) -> dict:
    import openai

    before = peak_rss_mb(proc.pid)
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"},
                                                     "minItems": 100_000_000}}, "required": ["a"]}
    t0 = time.monotonic()
    status = "ok"
    try:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "list"}], max_tokens=8,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    except openai.APIStatusError as e:
        status = str(e.status_code)
    except openai.APIConnectionError:
        status = "connection lost"
    took = time.monotonic() - t0
    time.sleep(6)                       # a compile left running keeps allocating after the answer
    alive = proc.poll() is None
    return {"bomb_status": status, "bomb_answer_s": round(took, 2), "kernel_alive": alive,
            "peak_rss_growth_mb": round(peak_rss_mb(proc.pid) - before, 1) if alive else None}


def tiny_temperature(address, client) -> dict:
    import kernos.sdk

    victim = kernos.sdk.connect(address, agent="bench-steady")
    gaps, out = [], {}

    def stream():
        last = time.monotonic()
        try:
            for c in victim.llm.stream("Tell me a long story about a kernel.", model=EMBEDDED, max_tokens=200,
                                       temperature=0.7, seed=3, stop=["never-appears-xyz"]):
                now = time.monotonic()
                if c.text:
                    gaps.append(now - last)
                    last = now
                if c.done:
                    out["finish"] = c.completion.finish_reason
        except kernos.sdk.KernosError as e:
            out["finish"] = f"error: {e.code}"
    t = threading.Thread(target=stream)
    t.start()
    failed = 0
    for i in range(4):
        try:
            client.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": f"Count to {i + 20}"}],
                                           temperature=1.08e-37, max_tokens=60)
        except Exception:  # noqa: BLE001 - counted
            failed += 1
    t.join(120)
    p50, mx = stats(gaps)
    return {"victim_finish": out.get("finish"), "victim_gap_p50_s": p50, "victim_gap_max_s": mx,
            "attacker_errors": failed}


def embedding_flood(address, client) -> dict:
    from conftest import flood_embeddings

    import kernos.sdk

    victim = kernos.sdk.connect(address, agent="bench-searcher")
    victim.memory.add("the kernel schedules agents fairly")
    victim.memory.search("warm up")

    def probe():
        victim.memory.search("fair scheduling")
        victim.storage.write("note.txt", "x" * 1024)
    waits, flood_s = flood_embeddings(client, probe)
    p50, mx = stats(waits)
    return {"victim_search_write_p50_s": p50, "victim_search_write_max_s": mx, "flood_s": round(flood_s, 1)}


def tool_slots(address) -> dict:
    from conftest import start_nappers

    import kernos.sdk

    known = kernos.sdk.connect(address, agent="bench-known", credential=ADMIN)
    _, threads = start_nappers(address, "bench-napper", calls=5)
    waits = []
    for _ in range(3):
        t0 = time.monotonic()
        known.tools.call("python", code="result = 6 * 7")
        waits.append(time.monotonic() - t0)
        time.sleep(1.0)
    for t in threads:
        t.join()
    p50, mx = stats(waits)
    return {"victim_tool_p50_s": p50, "victim_tool_max_s": mx}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick.HELP + " (the tiny model stands in for the embedded)")
    args = ap.parse_args()
    import openai
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel
    from kernos.kernel.llm.testing import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="kernos-isolation-"))
    tiny = build_tiny_model(work / "tiny", "llama")
    cfg = write_config(work / "k.toml", [{"name": "tiny", "path": str(tiny), "dtype": "float32"},
                                         {"name": EMBEDDED, "path": str(tiny) if args.quick else "embedded"}],
                       server={"admin_token": ADMIN})
    proc, address = start_kernel(work / "data", str(cfg), timeout=300)
    results = {}
    try:
        session = kernos.sdk.connect(address, agent="bench-attacker")
        client = openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=session.token, max_retries=0,
                               timeout=120)
        results["1_grammar_bomb"] = grammar_bomb(proc, client)
        if proc.poll() is None:
            results["2_tiny_temperature"] = tiny_temperature(address, client)
            results["7_embedding_flood"] = embedding_flood(address, client)
            results["8_tool_slots"] = tool_slots(address)
    finally:
        if proc.poll() is None:
            stop_kernel(proc)
    for finding, r in results.items():
        print(f"{finding:22s} " + "  ".join(f"{k}={v}" for k, v in r.items()))
    print(json.dumps({"benchmark": "isolation", **{k: v for r in results.values() for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
