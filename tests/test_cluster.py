"""Kernel processes sharing one PostgreSQL database and one S3 bucket (`[cluster]`): an agent, its token, its files,
its contexts, its grants and operators' tokens are the same on every node; a node SIGKILLed under a write load loses
nothing it acknowledged, read back from the node that stayed up."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel


@pytest.fixture
def cluster_config(tmp_path, pg_url, s3_url, s3_endpoint):
    from conftest import write_config

    return write_config(tmp_path / "cluster.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                        cluster={"database": pg_url, "objects": s3_url, "s3_endpoint": s3_endpoint})


def test_two_nodes_share_agents_files_contexts_and_grants(tmp_path, cluster_config, pg_url):
    (a, addr_a), (b, addr_b) = (start_kernel(tmp_path / n, str(cluster_config), timeout=120) for n in "ab")
    try:
        with kernos.sdk.connect(addr_a, agent="alice") as alice_a:
            alice_a.storage.write("notes/plan.txt", "ship it", {"by": "alice"})
            alice_a.memory.create_context("c1", budget_tokens=500)
            alice_a.memory.add_block("c1", "remember the plan", role="user")
            token = alice_a.token
        with kernos.sdk.connect(addr_b, agent="alice", token=token) as alice_b:    # the same agent on node b
            assert alice_b.storage.read_text("notes/plan.txt") == "ship it"
            assert [blk.content for blk in alice_b.memory.blocks("c1")[0]] == ["remember the plan"]
            alice_b.storage.write("notes/plan.txt", "ship it friday")
            with kernos.sdk.connect(addr_b, agent="bob") as bob_b:
                with pytest.raises(kernos.sdk.PermissionDenied):
                    bob_b.storage.read("notes/plan.txt", owner="alice")
                bob_token = bob_b.token
            alice_b.access.grant("bob", "storage", "read", "notes")
        with kernos.sdk.connect(addr_a, agent="bob", token=bob_token) as bob_a:   # granted on b, used on a
            assert bob_a.storage.read_text("notes/plan.txt", owner="alice") == "ship it friday"
            assert [h.version for h in bob_a.storage.history("notes/plan.txt", owner="alice")] == [1, 2]
        with pytest.raises(kernos.sdk.AlreadyExists):        # the name is taken on every node
            kernos.sdk.connect(addr_a, agent="alice")
        # an operator token made offline against the cluster's database works on both nodes
        out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "create", "--name", "ops",
                              "--data-dir", str(tmp_path / "offline")], capture_output=True, text=True, check=True,
                             env=dict(os.environ, KERNOS_CLUSTER__DATABASE=pg_url))
        op_token = out.stdout.strip()
        for addr in (addr_a, addr_b):
            with kernos.sdk.connect(addr, token=op_token) as op:
                assert {x.agent_id for x in op.kernel.agents(include_exited=True)} >= {"alice", "bob"}
    finally:
        stop_kernel(a)
        stop_kernel(b)


def test_a_node_killed_under_load_loses_nothing_acknowledged(tmp_path, cluster_config):
    """SIGKILL node a at random moments while a client writes through it; node b, never restarted, reads every
    acknowledged version back byte for byte."""
    b, addr_b = start_kernel(tmp_path / "b", str(cluster_config), timeout=120)
    rng = random.Random(7)
    acknowledged: dict[tuple[str, int], str] = {}
    token, kills = None, 0
    try:
        for _ in range(3):
            a, addr_a = start_kernel(tmp_path / "a", str(cluster_config), timeout=120)
            session = kernos.sdk.connect(addr_a, agent="crashy", token=token) if token else \
                kernos.sdk.connect(addr_a, agent="crashy")
            token = session.token
            stop = threading.Event()

            def writer():
                while not stop.is_set():
                    path = f"f{rng.randrange(4)}.bin"
                    payload = rng.randbytes(rng.randrange(1, 30_000))
                    try:
                        info = session.storage.write(path, payload)
                    except kernos.sdk.KernosError:
                        return
                    acknowledged[(info.path, info.version)] = hashlib.sha256(payload).hexdigest()
            t = threading.Thread(target=writer)
            t.start()
            time.sleep(rng.uniform(0.5, 1.5))
            a.kill()
            a.wait()
            kills += 1
            stop.set()
            t.join(30)
            session.close()
        with kernos.sdk.connect(addr_b, agent="crashy", token=token) as s:
            assert len(acknowledged) > 10, "the writer should have got many writes acknowledged"
            for (path, version), digest in acknowledged.items():
                assert hashlib.sha256(s.storage.read(path, version=version)).hexdigest() == digest, \
                    f"{path} v{version} is torn or lost"
            for f in s.storage.list():
                assert hashlib.sha256(s.storage.read(f.path)).hexdigest() == f.sha256
    finally:
        stop_kernel(b)
    print(f"cluster crash test: {len(acknowledged)} acknowledged writes across {kills} SIGKILLs, all intact on "
          "the other node")
