"""What a cluster costs and what its home nodes buy, on this machine (every node, PostgreSQL and the S3 server share
its cores, so the cluster's numbers are its worst case):

- syscall latency, p50/p99: a heartbeat (authentication and the edge only), a 1 KiB file write (durable: the
  version row committed, the blob stored) and read, on one kernel with the embedded backends (SQLite, folders)
  and on a cluster node (PostgreSQL, S3); and a heartbeat that enters a node that is not the agent's home
  (forwarded);
- storage write throughput: 4 writers, 64 KiB files, writes/s and MB/s, embedded against cluster;
- failover: an agent's calls enter a node that forwards them to its home; the home is SIGKILLed; the time until
  the agent's next call succeeds;
- resident KV with home nodes against random placement: agents hold multi-turn conversations in kernel contexts
  (each its own instructions, each turn a tool-result-sized message) on three nodes of a tiny model, each turn
  entering a random node; with `cluster.forward` on, the turn runs on the agent's home node (its resident KV is
  there); off, where it entered. Reported: the share of lookups that found a prefix, the share of prompt tokens
  not prefilled again (resident or prefix cache), and wall time.

Prints a table and one JSON line (`ratio_*`: embedded over cluster for latency and throughput; home over random
for the hit rate).

    python benchmarks/cluster.py [--calls 300] [--agents 6] [--turns 6] [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent / "tests"), str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import quick  # noqa: E402

os.environ.setdefault("AWS_ACCESS_KEY_ID", "kernos-bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kernos-bench")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def latencies(fn, calls: int) -> dict:
    fn()                                            # warm
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": pct(out, 0.5), "p99_ms": pct(out, 0.99)}


def syscalls(address: str, calls: int, forwarded_address: str = "") -> dict:
    import kernos.sdk

    with kernos.sdk.connect(address, agent=f"lat-{uuid.uuid4().hex[:6]}") as s:
        payload = os.urandom(1024)
        out = {"heartbeat": latencies(s.kernel.heartbeat, calls),
               "write_1k": latencies(lambda: s.storage.write("lat.bin", payload), calls),
               "read_1k": latencies(lambda: s.storage.read("lat.bin"), calls)}
        if forwarded_address:
            with kernos.sdk.connect(forwarded_address, agent=s.agent_id, token=s.token) as via:
                out["heartbeat_forwarded"] = latencies(via.kernel.heartbeat, calls)
    return out


def throughput(address: str, writes: int, writers: int = 4, size: int = 64 << 10) -> dict:
    import kernos.sdk

    sessions = [kernos.sdk.connect(address, agent=f"tp-{uuid.uuid4().hex[:6]}") for _ in range(writers)]
    payloads = [os.urandom(size) for _ in range(8)]

    def run(s):
        for i in range(writes // writers):
            s.storage.write(f"f{i % 16}.bin", payloads[i % 8])
    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    for s in sessions:
        s.close()
    done = writers * (writes // writers)
    return {"writes_per_s": done / wall, "mb_per_s": done * size / wall / 2**20}


def home_of(address: str, agent: str, admin: str) -> str:
    import kernos.sdk
    from kernos.kernel.cluster.nodes import Node, rendezvous

    with kernos.sdk.connect(address, token=admin) as op:
        st = op.kernel.stats()
    return rendezvous([Node(n.node_id, n.grpc_address, "") for n in st.nodes if n.alive and n.state == "up"],
                      agent).grpc_address


def failover(nodes: list, admin: str) -> float:
    """ms from SIGKILL of an agent's home to its next successful call through another node."""
    import kernos.sdk

    entry = nodes[0][1]
    for i in range(100):
        agent = f"fo-{i}"
        home = home_of(entry, agent, admin)
        if home != entry:
            break
    victim = next(p for p, a in nodes if a == home)
    with kernos.sdk.connect(entry, agent=agent) as s:
        s.kernel.heartbeat()
        victim.kill()
        victim.wait()
        t = time.perf_counter()
        while True:
            try:
                s.kernel.heartbeat()
                return (time.perf_counter() - t) * 1000
            except kernos.sdk.KernosError:
                time.sleep(0.01)


def record(name: str, turn: int, rows: int) -> str:
    r = random.Random(f"{name}/{turn}")
    return "; ".join(f"{r.choice(['order', 'ticket', 'file', 'user'])} {r.randrange(10**5)} is "
                     f"{r.choice(['open', 'closed', 'late', 'new'])}" for _ in range(rows))


def conversations(addresses: list[str], agents: int, turns: int, seed: int = 3) -> dict:
    import kernos.sdk

    rng = random.Random(seed)
    tokens = {}
    names = [f"conv-{uuid.uuid4().hex[:6]}-{i}" for i in range(agents)]
    for name in names:
        with kernos.sdk.connect(addresses[0], agent=name) as s:
            tokens[name] = s.token
            s.memory.create_context("c", budget_tokens=1800,
                                    system=f"You are agent {name}. Your task list: " + record(name, 0, 12))

    def agent(name: str):
        for turn in range(turns):     # each turn brings a tool-result-sized message, as an agent's turns do
            with kernos.sdk.connect(rng.choice(addresses), agent=name, token=tokens[name]) as s:
                s.llm.chat([{"role": "user", "content": f"Result {turn}: " + record(name, turn + 1, 8)}],
                           context_id="c", max_tokens=16, temperature=0)
    t = time.perf_counter()
    threads = [threading.Thread(target=agent, args=(n,)) for n in names]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"wall_s": time.perf_counter() - t}


def reuse(addresses: list[str], admin: str) -> dict:
    import kernos.sdk

    hits = lookups = reused = prompt = 0
    for a in addresses:
        with kernos.sdk.connect(a, token=admin) as op:
            for m in op.kernel.stats().models:
                hits, lookups = hits + m.prefix_hits, lookups + m.prefix_lookups
                reused, prompt = reused + m.prefix_tokens_reused, prompt + m.prompt_tokens
    return {"hit_rate": hits / lookups if lookups else 0.0, "reused_share": reused / prompt if prompt else 0.0}


def main() -> None:
    from conftest import write_config
    from services import fresh_database, postgres_server, s3_server

    from kernos.agents.demo import start_kernel, stop_kernel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="calls per latency measurement")
    ap.add_argument("--writes", type=int, default=400, help="writes in the throughput measurement")
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    if args.quick:
        args.calls, args.writes, args.agents, args.turns = 20, 40, 2, 2
    admin = "bench-admin-token-0123"
    work = Path(tempfile.mkdtemp(prefix="kernos-bench-cluster-"))
    model = quick.tiny_model(work)
    results: dict = {}
    with postgres_server() as pg, s3_server() as s3:
        echo = [{"name": "echo", "path": "-", "kind": "echo"}]
        solo_cfg = write_config(work / "solo.toml", echo, server={"admin_token": admin})
        proc, addr = start_kernel(work / "solo", str(solo_cfg), timeout=120)
        try:
            results["embedded"] = syscalls(addr, args.calls) | throughput(addr, args.writes)
        finally:
            stop_kernel(proc)

        def cluster(name: str, models: list[dict], forward: bool = True, n: int = 3) -> tuple[list, Path]:
            cfg = write_config(work / f"{name}.toml", models, server={"admin_token": admin},
                               cluster={"database": fresh_database(pg, f"bench_{name}"),
                                        "objects": f"s3://bench-{name}-{uuid.uuid4().hex[:6]}/b",
                                        "s3_endpoint": s3, "heartbeat_s": 0.5, "lease_s": 3.0,
                                        "forward": forward})
            nodes = [start_kernel(work / f"{name}-{i}", str(cfg), timeout=300) for i in range(n)]
            time.sleep(1.5)                          # every node's view holds every node
            return nodes, cfg

        nodes, _ = cluster("echo", echo)
        try:
            addresses = [a for _, a in nodes]
            a = addresses[0]
            # latency on the agent's home node (entered directly), then through another node
            agent_home = syscalls(a, args.calls, forwarded_address=addresses[1])
            results["cluster"] = agent_home | throughput(a, args.writes)
            results["failover_ms"] = failover(nodes, admin)
        finally:
            for p, _ in nodes:
                if p.poll() is None:
                    stop_kernel(p)
        tiny = [{"name": "tiny", "path": str(model)}]
        for placement, forward in (("home", True), ("random", False)):
            nodes, _ = cluster(f"kv{placement}", tiny, forward=forward)
            try:
                addresses = [a for _, a in nodes]
                results[placement] = conversations(addresses, args.agents, args.turns) | reuse(addresses, admin)
            finally:
                for p, _ in nodes:
                    stop_kernel(p)
    e, c = results["embedded"], results["cluster"]
    rows = [(k, e[k]["p50_ms"], e[k]["p99_ms"], c[k]["p50_ms"], c[k]["p99_ms"]) for k in ("heartbeat", "write_1k",
                                                                                            "read_1k")]
    print(f"{'syscall':<22}{'embedded p50':>13}{'p99':>8}{'cluster p50':>13}{'p99':>8}   (ms)")
    for k, a1, a2, b1, b2 in rows:
        print(f"{k:<22}{a1:>13.2f}{a2:>8.2f}{b1:>13.2f}{b2:>8.2f}")
    hf = c["heartbeat_forwarded"]
    print(f"{'heartbeat, forwarded':<22}{'':>21}{hf['p50_ms']:>13.2f}{hf['p99_ms']:>8.2f}")
    print(f"storage writes (4 writers, 64 KiB): embedded {e['writes_per_s']:.0f}/s ({e['mb_per_s']:.1f} MB/s), "
          f"cluster {c['writes_per_s']:.0f}/s ({c['mb_per_s']:.1f} MB/s)")
    print(f"failover: next call {results['failover_ms']:.0f} ms after the home node's SIGKILL")
    h, r = results["home"], results["random"]
    print(f"multi-turn on 3 nodes: home nodes hit {h['hit_rate']:.0%} (reused {h['reused_share']:.0%} of prompt "
          f"tokens, {h['wall_s']:.1f} s); random placement hit {r['hit_rate']:.0%} (reused {r['reused_share']:.0%}, "
          f"{r['wall_s']:.1f} s)")
    print(json.dumps({
        "benchmark": "cluster", "quick": args.quick,
        **{f"{k}_{side}_{q}": results[side][k][q] for k in ("heartbeat", "write_1k", "read_1k")
           for side in ("embedded", "cluster") for q in ("p50_ms", "p99_ms")},
        "heartbeat_forwarded_p50_ms": hf["p50_ms"], "heartbeat_forwarded_p99_ms": hf["p99_ms"],
        "writes_per_s_embedded": e["writes_per_s"], "writes_per_s_cluster": c["writes_per_s"],
        "failover_ms": results["failover_ms"],
        "hit_rate_home": h["hit_rate"], "hit_rate_random": r["hit_rate"],
        "reused_share_home": h["reused_share"], "reused_share_random": r["reused_share"],
        "wall_s_home": h["wall_s"], "wall_s_random": r["wall_s"],
        "ratio_write_p50": e["write_1k"]["p50_ms"] / c["write_1k"]["p50_ms"] if c["write_1k"]["p50_ms"] else 0,
        "ratio_write_throughput": c["writes_per_s"] / e["writes_per_s"] if e["writes_per_s"] else 0,
        "ratio_hit_rate": h["hit_rate"] / r["hit_rate"] if r["hit_rate"] else 0}))


if __name__ == "__main__":
    main()
