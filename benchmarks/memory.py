"""Vector memory and storage through the syscall (gRPC, a real kernel process) against the same work
done in-process without Kernos.

Vector memory: add throughput (embedding included on both sides) and search p50/p99 at 1k, 10k and 100k
entries, against chromadb called in-process with the same embedder. Storage: small-file write and read
throughput through the syscall (every write a durable version) against plain local files, written
with and without fsync. Prints a table and one JSON line.

    python benchmarks/memory.py                  # 1k, 10k, 100k entries
    python benchmarks/memory.py --sizes 1000     # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import quick  # noqa: E402

WORDS = (
    "agent kernel memory storage schedule batch cache tool file paris france capital river mountain city "
    "blue green red fast slow small large plan search list run stop model token answer question note "
    "meeting friday budget report invoice travel hotel train flight museum coffee"
).split()


def texts(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + f" #{i}" for i in range(n)]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries, args.files = "50", 5, 5
    sizes = [int(x) for x in args.sizes.split(",")]

    import chromadb
    from chromadb.config import Settings
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel
    from kernos.memory.embed import Embedder

    work = Path(tempfile.mkdtemp(prefix="kernos-membench-"))
    cfg = write_config(
        work / "k.toml",
        [{"name": "echo", "path": "-", "kind": "echo"}],
        memory={"max_entries": 0},
        storage={"quota_bytes": 0},
    )
    proc, address = start_kernel(work / "data", str(cfg), timeout=120)
    rng = random.Random(0)
    embed = Embedder()
    local = chromadb.PersistentClient(path=str(work / "local-chroma"), settings=Settings(anonymized_telemetry=False))
    coll = local.get_or_create_collection("bench", embedding_function=None, configuration={"hnsw": {"space": "cosine"}})
    rows = []
    try:
        s = kernos.sdk.connect(address, agent="bench")
        s.memory.add(["warm up the embedder"])
        s.memory.delete(s.memory.search("warm up", k=1) and [s.memory.search("warm up", k=1)[0].id])
        have = 0
        for size in sizes:
            batch = texts(size - have, rng)
            t0 = time.perf_counter()
            for i in range(0, len(batch), 500):
                s.memory.add(batch[i : i + 500])
            sys_add = len(batch) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, len(batch), 500):
                chunk = batch[i : i + 500]
                coll.add(ids=[f"{have + i + j}" for j in range(len(chunk))], embeddings=embed(chunk), documents=chunk)
            loc_add = len(batch) / (time.perf_counter() - t0)
            have = size
            queries = texts(args.queries, rng)
            sys_lat, loc_lat = [], []
            for q in queries:
                t0 = time.perf_counter()
                s.memory.search(q, k=5)
                sys_lat.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                coll.query(query_embeddings=embed([q]), n_results=5, include=["documents", "metadatas", "distances"])
                loc_lat.append((time.perf_counter() - t0) * 1e3)
            rows.append(
                {
                    "entries": size,
                    "syscall_add_per_s": sys_add,
                    "local_add_per_s": loc_add,
                    "syscall_p50_ms": statistics.median(sys_lat),
                    "syscall_p99_ms": pct(sys_lat, 0.99),
                    "local_p50_ms": statistics.median(loc_lat),
                    "local_p99_ms": pct(loc_lat, 0.99),
                }
            )
            print(f"{size} entries done", flush=True)

        payloads = [rng.randbytes(rng.randrange(200, 4000)) for _ in range(args.files)]
        t0 = time.perf_counter()
        for i, p in enumerate(payloads):
            s.storage.write(f"docs/f{i % 50}.bin", p)  # 10 versions of each of 50 files
        sys_w = len(payloads) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(len(payloads)):
            s.storage.read(f"docs/f{i % 50}.bin")
        sys_r = len(payloads) / (time.perf_counter() - t0)
        plain = work / "plain"
        plain.mkdir()

        def plain_write(sync: bool):
            t0 = time.perf_counter()
            for i, p in enumerate(payloads):
                with open(plain / f"f{i % 50}.v{i // 50}.bin", "wb") as f:  # versions kept as separate files
                    f.write(p)
                    if sync:
                        f.flush()
                        os.fsync(f.fileno())
            return len(payloads) / (time.perf_counter() - t0)

        plain_w, plain_w_sync = plain_write(False), plain_write(True)
        t0 = time.perf_counter()
        for i in range(len(payloads)):
            (plain / f"f{i % 50}.v{i // 50}.bin").read_bytes()
        plain_r = len(payloads) / (time.perf_counter() - t0)
        s.exit()
    finally:
        stop_kernel(proc)

    print(f"\nvector memory (MiniLM embeddings on both sides, k=5, {args.queries} queries per size)")
    print(
        f"{'entries':>8}{'add/s sys':>11}{'add/s local':>12}{'p50 sys':>9}{'p50 local':>10}{'p50 delta':>10}"
        f"{'p99 sys':>9}{'p99 local':>10}"
    )
    for r in rows:
        print(
            f"{r['entries']:>8}{r['syscall_add_per_s']:>11.0f}{r['local_add_per_s']:>12.0f}{r['syscall_p50_ms']:>9.2f}"
            f"{r['local_p50_ms']:>10.2f}{r['syscall_p50_ms'] - r['local_p50_ms']:>10.2f}{r['syscall_p99_ms']:>9.2f}"
            f"{r['local_p99_ms']:>10.2f}"
        )
    print(f"\nstorage ({args.files} small files, 200 B - 4 KB, 10 versions each of 50 paths)")
    print(
        f"  syscall write (durable version) {sys_w:8.0f}/s   plain write {plain_w:8.0f}/s   "
        f"plain write+fsync {plain_w_sync:8.0f}/s"
    )
    print(f"  syscall read                    {sys_r:8.0f}/s   plain read  {plain_r:8.0f}/s")
    out = {
        "benchmark": "memory",
        "vector": rows,
        "storage": {
            "syscall_write_per_s": round(sys_w, 1),
            "plain_write_per_s": round(plain_w, 1),
            "plain_fsync_write_per_s": round(plain_w_sync, 1),
            "syscall_read_per_s": round(sys_r, 1),
            "plain_read_per_s": round(plain_r, 1),
            "write_ratio_vs_fsync": round(sys_w / plain_w_sync, 3),
        },
    }
    if rows:
        last = rows[-1]
        out["search_p50_delta_ms_at_largest"] = round(last["syscall_p50_ms"] - last["local_p50_ms"], 3)
        out["search_p99_ms_at_largest"] = round(last["syscall_p99_ms"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
