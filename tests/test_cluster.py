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


@pytest.fixture(scope="module")
def chroma():
    from services import chroma_server

    with chroma_server() as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture
def shared(pg_url, s3_url, s3_endpoint):
    """`[cluster]` settings of nodes on this test's database and bucket, with fast heartbeats; `more` on top."""
    return lambda **more: {"database": pg_url, "objects": s3_url, "s3_endpoint": s3_endpoint, "heartbeat_s": 0.5,
                           "lease_s": 3.0, **more}


@pytest.fixture
def cluster_config(tmp_path, shared, chroma):
    """Two or more nodes on shared backends, each serving calls where they arrive (no forwarding to home
    nodes): what one node wrote, another must read from the shared state."""
    from conftest import write_config

    return write_config(tmp_path / "cluster.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                        cluster=shared(forward=False, heartbeat_s=2.0, lease_s=10.0), server={"aios_compat": True},
                        memory={"chroma_url": chroma})


def test_two_nodes_share_agents_files_contexts_and_grants(tmp_path, cluster_config, pg_url):
    (a, addr_a), (b, addr_b) = (start_kernel(tmp_path / n, str(cluster_config), timeout=120) for n in "ab")
    try:
        with kernos.sdk.connect(addr_a, agent="alice") as alice_a:
            alice_a.storage.write("notes/plan.txt", "ship it", {"by": "alice"})
            alice_a.memory.create_context("c1", budget_tokens=500)
            alice_a.memory.add_block("c1", "remember the plan", role="user")
            fact = alice_a.memory.add(["The launch is on Friday at noon."])[0]
            alice_a.tools.register("triple", "result = args['n'] * 3", {"type": "object"})
            token = alice_a.token
        with kernos.sdk.connect(addr_b, agent="alice", token=token) as alice_b:    # the same agent on node b
            assert alice_b.storage.read_text("notes/plan.txt") == "ship it"
            assert [blk.content for blk in alice_b.memory.blocks("c1")[0]] == ["remember the plan"]
            assert alice_b.memory.search("when is the launch", k=1)[0].id == fact
            assert _soon(lambda: alice_b.tools.call("triple", n=4).result) == 12     # registered on a, kept for all
            alice_b.storage.write("notes/plan.txt", "ship it friday")
            with kernos.sdk.connect(addr_b, agent="bob") as bob_b:
                with pytest.raises(kernos.sdk.PermissionDenied):
                    bob_b.storage.read("notes/plan.txt", owner="alice")
                bob_token = bob_b.token
            alice_b.access.grant("bob", "storage", "read", "notes")
        with kernos.sdk.connect(addr_a, agent="bob", token=bob_token) as bob_a:   # granted on b, used on a
            assert bob_a.storage.read_text("notes/plan.txt", owner="alice") == "ship it friday"
            assert [h.version for h in bob_a.storage.history("notes/plan.txt", owner="alice")] == [1, 2]
        with kernos.sdk.connect(addr_b, agent="alice", token=token) as alice_b:
            alice_b.tools.unregister("triple")                 # removed on b: gone on a too
        with kernos.sdk.connect(addr_a, agent="alice", token=token) as alice_a:
            def gone():
                assert "triple" not in {t["name"] for t in alice_a.tools.list()}
            _soon(gone)
        with pytest.raises(kernos.sdk.AlreadyExists):        # the name is taken on every node
            kernos.sdk.connect(addr_a, agent="alice")
        # an AIOS agent (no token: the kernel holds it) used through node a, then b, then a again: one agent, the
        # same token on both (each node keeping its own once made the second rotate the first's token away)
        from test_aios import ok, send, storage_query

        bases = [f"http://{p.http_address}" for p in (a, b, a)]
        ok(send(bases[0], "cerebrum-bot", "storage", storage_query("write", file_path="n.txt", content="one")))
        assert "version 2" in ok(send(bases[1], "cerebrum-bot", "storage", storage_query(
            "write", file_path="n.txt", content="two")))["response_message"]
        assert "version 3" in ok(send(bases[2], "cerebrum-bot", "storage", storage_query(
            "write", file_path="n.txt", content="three")))["response_message"]
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
    """SIGKILL node a at random moments while a client writes files and memories through it; node b, never
    restarted, reads every acknowledged file version back byte for byte and finds every acknowledged memory."""
    b, addr_b = start_kernel(tmp_path / "b", str(cluster_config), timeout=120)
    rng = random.Random(7)
    acknowledged: dict[tuple[str, int], str] = {}
    memories: dict[str, str] = {}
    token, kills = None, 0
    try:
        for _ in range(3):
            a, addr_a = start_kernel(tmp_path / "a", str(cluster_config), timeout=120)
            session = kernos.sdk.connect(addr_a, agent="crashy", token=token) if token else \
                kernos.sdk.connect(addr_a, agent="crashy")
            token = session.token
            warm = f"warm-up {len(memories)}"                # opens the node's vector memory (seconds) first
            memories[session.memory.add([warm])[0]] = warm
            stop = threading.Event()

            def writer():
                while not stop.is_set():
                    path = f"f{rng.randrange(4)}.bin"
                    payload = rng.randbytes(rng.randrange(1, 30_000))
                    fact = f"fact {len(memories)}: the code word is {rng.randrange(10**9)}"
                    try:
                        info = session.storage.write(path, payload)
                        acknowledged[(info.path, info.version)] = hashlib.sha256(payload).hexdigest()
                        if len(acknowledged) % 3 == 0:
                            memories[session.memory.add([fact])[0]] = fact
                    except kernos.sdk.KernosError:
                        return
            t = threading.Thread(target=writer)
            t.start()
            time.sleep(rng.uniform(0.8, 2.0))
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
            assert len(memories) > 3
            found = {m.id: m.text for m in s.memory.get(list(memories))}
            assert found == memories, "an acknowledged memory is lost"
    finally:
        stop_kernel(b)
    print(f"cluster crash test: {len(acknowledged)} acknowledged writes and {len(memories)} memories across {kills} "
          "SIGKILLs, all intact on the other node")


ADMIN = "cluster-admin-token"


def _soon(fn, timeout: float = 5.0):
    """fn()'s answer once another node's change has reached this one (a notification: milliseconds)."""
    deadline = time.time() + timeout
    while True:
        try:
            return fn()
        except (AssertionError, kernos.sdk.NotFound):
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def _operator_stats(address: str):
    with kernos.sdk.connect(address, token=ADMIN) as op:
        return op.kernel.stats()


def _wait_for_view(addresses: list[str], n: int, timeout: float = 30.0) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        views = [_operator_stats(a) for a in addresses]
        if all(sum(1 for x in v.nodes if x.alive and x.state == "up") == n for v in views):
            return views
        time.sleep(0.3)
    raise AssertionError(f"the nodes did not all see {n} live nodes: {[list(v.nodes) for v in views]}")


def _homed_on(ids: list[str], node: int, prefix: str) -> str:
    """An agent name whose home, over these live nodes, is `ids[node]`."""
    from kernos.kernel.cluster.nodes import Node, rendezvous

    return next(f"{prefix}{i}" for i in range(200)
                if rendezvous([Node(n, "", "") for n in ids], f"{prefix}{i}").node_id == ids[node])


def _start(tmp_path, cfg, n: int, prefix: str) -> list:
    """`n` kernel processes on one config, each its own data dir: [(process, address)]. If one fails to start,
    those started are stopped."""
    procs = []
    try:
        for i in range(n):
            procs.append(start_kernel(tmp_path / f"{prefix}{i}", str(cfg), timeout=120))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs) -> None:
    for p, _ in procs:
        if p.poll() is None:
            stop_kernel(p)


def _served_on(addresses: list[str], agent: str) -> list[str]:
    """The nodes whose program table has a program of `agent` (a program lives where its calls ran)."""
    return [_operator_stats(a).node_id for a in addresses
            if any(p.agent_id == agent for p in _operator_stats(a).programs)]


def test_three_nodes_serve_each_agent_on_its_home_and_move_it_on_death_and_drain(tmp_path, pg_url, shared):
    from conftest import write_config

    from kernos.kernel.cluster.nodes import Node, rendezvous

    cfg = write_config(tmp_path / "c.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN},
                       cluster=shared())
    procs = _start(tmp_path, cfg, 3, "n")
    addresses = [a for _, a in procs]
    try:
        views = _wait_for_view(addresses, 3)
        ids = [v.node_id for v in views]
        by_id = dict(zip(ids, addresses))
        # every call enters through node 0; each agent's calls run on its rendezvous home, whichever that is
        agents = {}
        for i in range(8):
            s = kernos.sdk.connect(addresses[0], agent=f"ag{i}")
            agents[f"ag{i}"] = s
            assert s.llm.chat("hello there", model="echo", max_tokens=4, program_id=f"p{i}").text
        homes = {a: rendezvous([Node(n, "", "") for n in ids], a).node_id for a in agents}
        assert len(set(homes.values())) >= 2, "eight agents should spread over the nodes"
        for a, home in homes.items():
            assert _served_on(addresses, a) == [home], f"{a} ran off its home {home}"
        assert _operator_stats(addresses[0]).forwarded >= sum(1 for h in homes.values() if h != ids[0])
        # an operator moves one agent by hand, then gives it back
        mover = next(a for a, h in homes.items() if h != ids[2])
        node = [sys.executable, "-m", "kernos.kernel.cli", "node", "move"]
        flags = ["--database", pg_url, "--agent", mover]
        assert subprocess.run(node + [ids[2]] + flags, capture_output=True, text=True).returncode == 0
        time.sleep(1.5)
        agents[mover].llm.chat("moved", model="echo", max_tokens=4, program_id="moved-p")
        assert [n for n in ids if any(p.program_id == "moved-p" for p in _operator_stats(by_id[n]).programs)] == \
            [ids[2]]
        assert subprocess.run(node + flags + ["--unpin"], capture_output=True, text=True).returncode == 0
        time.sleep(1.5)
        # a node dies: its agents' next calls through node 0 succeed at once, served on a live node
        victim_id = next(h for h in homes.values() if h != ids[0])
        victim = procs[ids.index(victim_id)][0]
        moved = [a for a, h in homes.items() if h == victim_id]
        victim.kill()
        victim.wait()
        killed = time.monotonic()
        for a in moved:
            assert agents[a].llm.chat("still there?", model="echo", max_tokens=4).text
        failover_s = time.monotonic() - killed
        print(f"failover: {len(moved)} agents' next calls all answered {failover_s * 1000:.0f} ms after SIGKILL")
        assert failover_s < 10
        live = [i for i in ids if i != victim_id]
        _wait_for_view([by_id[i] for i in live], 2)
        # drain: the drained node's agents move to the last node; nothing else moves
        drained = live[1]
        out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "node", "drain", drained,
                              "--database", pg_url], capture_output=True, text=True)
        assert out.returncode == 0 and "draining" in out.stdout, out.stderr
        listing = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "node", "list", "--database", pg_url],
                                 capture_output=True, text=True, check=True).stdout
        assert drained in listing and "draining" in listing and victim_id in listing
        time.sleep(1.5)                                        # the next heartbeats carry the new state
        for i, a in enumerate(agents):
            agents[a].llm.chat("after drain", model="echo", max_tokens=4, program_id=f"d{i}")
        for i, a in enumerate(agents):
            ran = [node for node in (live[0], drained)
                   if any(p.program_id == f"d{i}" for p in _operator_stats(by_id[node]).programs)]
            assert ran == [live[0]], f"{a}'s call after the drain ran on {ran}"
        status = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "status", "--address", addresses[0],
                                 "--token", ADMIN], capture_output=True, text=True, check=True).stdout
        assert f"cluster node {ids[0]}" in status and "draining" in status
    finally:
        for s in locals().get("agents", {}).values():
            s.close()
        _stop(procs)


def test_migrate_a_single_kernel_into_the_cluster(tmp_path, pg_url, shared):
    """A single kernel's agents, tokens, grants, files (every version), contexts, memories and traces carry over
    with `kernos migrate`; a second run copies nothing twice; the cluster node goes on from there."""
    from conftest import write_config
    from services import chroma_server

    from kernos.storage.db import Databases
    from kernos.storage.traces import TraceLog

    echo = [{"name": "echo", "path": "-", "kind": "echo"}]
    solo = write_config(tmp_path / "solo.toml", echo)
    single = tmp_path / "single"
    proc, addr = start_kernel(single, str(solo), timeout=120)
    try:
        with kernos.sdk.connect(addr, agent="owner") as s, kernos.sdk.connect(addr, agent="reader") as r:
            s.storage.write("doc.txt", "first")
            s.storage.write("doc.txt", "second")
            s.memory.create_context("c", budget_tokens=300)
            s.memory.add_block("c", "a pinned fact", role="system")
            ids = s.memory.add(["The capital of France is Paris.", "Bananas are yellow."])
            s.access.grant("reader", "storage", "read", "doc.txt")
            s.llm.chat("hello", model="echo", max_tokens=4)
            owner_token, reader_token = s.token, r.token
    finally:
        stop_kernel(proc)
    op = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "create", "--name", "ops",
                         "--data-dir", str(single)], capture_output=True, text=True, check=True).stdout.strip()
    with chroma_server() as (host, port):
        cfg = write_config(tmp_path / "cluster.toml", echo,
                           cluster=shared(),
                           memory={"chroma_url": f"http://{host}:{port}"})
        for run in range(2):
            out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "migrate", "--config", str(cfg),
                                  "--data-dir", str(single)], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert "2 memories" in out.stdout and "blobs" in out.stdout, out.stdout
        traces = TraceLog(Databases(tmp_path, pg_url)("traces.db"))
        before = len(traces.query("owner"))
        assert before >= 5 and len({(t.ts, t.kind) for t in traces.query("owner")}) == before, "no row copied twice"
        proc, addr = start_kernel(tmp_path / "node", str(cfg), timeout=120)
        try:
            with kernos.sdk.connect(addr, agent="owner", token=owner_token) as s:
                assert s.storage.read_text("doc.txt") == "second"
                assert [h.version for h in s.storage.history("doc.txt")] == [1, 2]
                assert s.storage.read_text("doc.txt", version=1) == "first"
                assert [b.content for b in s.memory.blocks("c")[0]] == ["a pinned fact"]
                assert s.memory.search("capital of France", k=1)[0].id == ids[0]
                s.storage.write("doc.txt", "third")                # the node goes on where the single kernel was
                s.llm.chat("again", model="echo", max_tokens=4)
            with kernos.sdk.connect(addr, agent="reader", token=reader_token) as r:
                assert r.storage.read_text("doc.txt", owner="owner") == "third"
            with kernos.sdk.connect(addr, token=op) as o:
                assert {a.agent_id for a in o.kernel.agents(include_exited=True)} >= {"owner", "reader"}
        finally:
            stop_kernel(proc)
        assert len(traces.query("owner")) > before, "new traces get ids past the copied ones"
        traces.close()


def test_a_client_given_every_node_rides_out_the_death_of_its_node(tmp_path, cluster_config):
    """`connect("a,b")`: the channel uses the first node that answers; when it dies, reads (idempotent) are retried
    by gRPC onto the next node and succeed; a write fails UNAVAILABLE at most once, then succeeds."""
    (a, addr_a), (b, addr_b) = (start_kernel(tmp_path / n, str(cluster_config), timeout=120) for n in "ab")
    try:
        with kernos.sdk.connect(f"{addr_a},{addr_b}", agent="rider") as s:
            s.storage.write("x.txt", "before")
            a.kill()
            a.wait()
            assert s.storage.read_text("x.txt") == "before"            # retried onto b by gRPC itself
            for attempt in range(3):
                try:
                    s.storage.write("x.txt", "after")
                    break
                except kernos.sdk.Unavailable:
                    assert attempt == 0
            assert s.storage.read_text("x.txt") == "after"
    finally:
        if a.poll() is None:
            stop_kernel(a)
        stop_kernel(b)


def test_a_groups_quota_holds_across_nodes(tmp_path, shared):
    """Members of one group homed on different nodes share the group's requests per second and its tokens per
    minute: together they get the budget once, not once per node."""
    from conftest import write_config

    from kernos.kernel.cluster.nodes import Node, rendezvous

    cfg = write_config(tmp_path / "q.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN},
                       quotas={"groups": {"team": {"requests_per_second": 6, "tokens_per_minute": 400}}},
                       cluster=shared())
    procs = _start(tmp_path, cfg, 2, "q")
    try:
        views = _wait_for_view([a for _, a in procs], 2)
        ids = [v.node_id for v in views]
        nodes = [Node(i, "", "") for i in ids]
        names = [f"m{i}" for i in range(20)]
        x = next(n for n in names if rendezvous(nodes, n).node_id == ids[0])
        y = next(n for n in names if rendezvous(nodes, n).node_id == ids[1])
        with kernos.sdk.connect(procs[0][1], token=ADMIN) as op:
            op.access.create_group("team")
            op.access.add_member("team", x)
            op.access.add_member("team", y)
        sx = kernos.sdk.connect(procs[0][1], agent=x)
        sy = kernos.sdk.connect(procs[1][1], agent=y)
        time.sleep(1.1)                                       # the registrations' requests leave the window
        passed, refused = {x: 0, y: 0}, {x: "", y: ""}
        start = time.monotonic()
        while time.monotonic() - start < 0.6:
            for name, s in ((x, sx), (y, sy)):
                try:
                    s.kernel.heartbeat()
                    passed[name] += 1
                except kernos.sdk.ResourceExhausted as e:
                    refused[name] = str(e)
        assert 4 <= passed[x] + passed[y] <= 6, passed      # one budget of 6 a second, not 6 per node
        assert "across the cluster" in refused[x] and "across the cluster" in refused[y]
        time.sleep(1.1)
        # tokens: what x used on node 0 counts against y on node 1
        long = "word " * 150
        used = 0
        with pytest.raises(kernos.sdk.ResourceExhausted, match="tokens per minute across the cluster"):
            for _ in range(20):
                reply = sx.llm.chat(long, model="echo", max_tokens=8)
                used += reply.prompt_tokens + reply.completion_tokens
                time.sleep(0.2)                               # under the request rate
        assert 0 < used <= 400
        with pytest.raises(kernos.sdk.ResourceExhausted, match="tokens per minute"):
            sy.llm.chat(long, model="echo", max_tokens=8)
        sx.close()
        sy.close()
    finally:
        _stop(procs)


def test_an_adapter_published_on_one_node_is_served_by_the_others(tmp_path, pg_url, s3_url, s3_endpoint, shared,
                                                                  tiny_models, lora_adapters):
    """The registry is shared and a version's files travel through the object store: a node that did not train
    it fetches it, checks it, hot-loads it at its next heartbeat, and follows the agent's default adapter."""
    from conftest import write_config

    from kernos.storage.adapters import AdapterStore
    from kernos.storage.blobs import S3Blobs
    from kernos.storage.db import Databases

    cfg = write_config(tmp_path / "a.toml", [{"name": "tiny", "path": str(tiny_models["llama"])}],
                       cluster=shared(), engine={"dtype": "float32"})
    proc, addr = start_kernel(tmp_path / "node", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(addr, agent="ada") as s:
            plain = s.llm.chat("hello", model="tiny", max_tokens=6, temperature=0)
            # another node publishes (a store on the same database and bucket, in this process)
            other = AdapterStore(tmp_path / "other-node-adapters", Databases(tmp_path, pg_url)("adapters/adapters.db"),
                                 S3Blobs(s3_url.rstrip("/") + "/adapters", s3_endpoint))
            v = other.publish("ada", "style", "tiny", lora_adapters["alpha"], {"tuned": {"loss": 0.5}}, "job-x")
            assert v.files and "adapter_config.json" in v.files
            deadline = time.time() + 20
            while "ada:style" not in next(m for m in s.llm.models() if m.name == "tiny").adapters:
                assert time.time() < deadline, "the node did not load the adapter published elsewhere"
                time.sleep(0.3)
            tuned = s.llm.chat("hello", model="tiny", max_tokens=6, temperature=0, adapter="ada:style")
            assert tuned.adapter == "ada:style" and tuned.text != plain.text
            other.set_default("ada", "tiny", "ada:style")
            deadline = time.time() + 20
            while s.llm.chat("hello", model="tiny", max_tokens=6, temperature=0).adapter != "ada:style":
                assert time.time() < deadline, "the node did not follow the default set elsewhere"
                time.sleep(0.3)
            other.close()
        assert (tmp_path / "node" / "adapters" / "ada" / "style" / "v1" / "adapter_config.json").exists()
    finally:
        stop_kernel(proc)


def test_a_drained_node_hands_a_running_stream_to_the_agents_new_home(tmp_path, pg_url, shared, tiny_models):
    """Drain the node a generation streams on: it is snapshotted there, restored on the agent's new home, and the
    client's one stream goes on to the same tokens as an uninterrupted run."""
    from conftest import write_config


    cfg = write_config(tmp_path / "d.toml", [{"name": "tiny", "path": str(tiny_models["llama"])}],
                       server={"admin_token": ADMIN}, engine={"dtype": "float32"},
                       cluster=shared(heartbeat_s=0.3))
    procs = _start(tmp_path, cfg, 2, "d")
    try:
        views = _wait_for_view([a for _, a in procs], 2)
        ids = [v.node_id for v in views]
        agent = _homed_on(ids, 0, "mover")
        kw = dict(model="tiny", max_tokens=1500, temperature=0.9, top_k=50, seed=11, stop=["never-appears-xyz"])
        with kernos.sdk.connect(procs[0][1], agent=agent) as s:
            reference = s.llm.chat("the agent kernel", **kw)
            assert reference.completion_tokens > 300
            stream = s.llm.stream("the agent kernel", **kw)
            first = next(stream)
            text = "".join(c.text for c in [first, next(c for c in stream if c.text)])
            out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "node", "drain", ids[0],
                                  "--database", pg_url], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            chunks = list(stream)
            final = chunks[-1].completion
            text += "".join(c.text for c in chunks)
        assert final.finish_reason == reference.finish_reason and final.request_id != first.request_id, \
            "the generation ended on the drained node instead of continuing elsewhere"
        assert (final.text, final.completion_tokens) == (reference.text, reference.completion_tokens)
        assert text == reference.text
        other = next(m for m in _operator_stats(procs[1][1]).models if m.name == "tiny")
        assert 0 < other.generated_tokens < reference.completion_tokens, "the rest ran on the other node"
    finally:
        _stop(procs)


def test_aios_queries_reach_the_agents_home_through_any_node(tmp_path, shared):
    """AIOS's /query names its agent in its body, with no token: node 0 sends a query of an agent homed on node 1
    there, with the cluster's secret and the caller's address, and node 1 checks that address (loopback only, by
    default) as if the caller had come straight to it. The nodes listen on every interface and reach each other
    on this machine's LAN address when it has one, so node 1 sees node 0 as a remote caller."""
    from conftest import write_config
    from services import free_ports
    from test_aios import _lan_address, llm_query, ok, send, storage_query

    lan = _lan_address()
    cfg = write_config(tmp_path / "q.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN, "aios_compat": True}, cluster=shared())
    procs = []
    try:
        for i, port in enumerate(free_ports(2)):
            procs.append(start_kernel(tmp_path / f"q{i}", str(cfg), timeout=120, listen=f"0.0.0.0:{port}",
                                      http="0.0.0.0:0",
                                      extra_env={"KERNOS_CLUSTER__ADVERTISE": f"{lan or '127.0.0.1'}:{port}"}))
        ids = [v.node_id for v in _wait_for_view([a for _, a in procs], 2)]
        name = _homed_on(ids, 1, "aios.w")[len("aios."):]
        http = [p.http_address.rsplit(":", 1)[1] for p, _ in procs]
        body = llm_query([{"role": "user", "content": "a b c"}], max_new_tokens=2)
        assert ok(send(f"http://127.0.0.1:{http[0]}", name, "llm", body))["response_message"]
        generated = [sum(m.generated_tokens for m in _operator_stats(a).models) for _, a in procs]
        assert generated[0] == 0 and generated[1] > 0, f"the query ran on {generated}, not on its home (node 1)"
        assert _operator_stats(procs[0][1]).forwarded == 1
        ok(send(f"http://127.0.0.1:{http[0]}", name, "storage", storage_query("write", file_path="n.txt",
                                                                              content="one")))
        assert "version 2" in ok(send(f"http://127.0.0.1:{http[1]}", name, "storage", storage_query(
            "write", file_path="n.txt", content="two")))["response_message"]          # one agent, whichever node
        if lan:
            # a caller on the LAN enters node 0: its home refuses it, as it refuses such a caller coming to it
            r = send(f"http://{lan}:{http[0]}", name, "llm", body)
            assert r.status_code == 403 and "loopback" in r.json()["detail"]
            # a caller that forges the forwarding headers without the cluster's secret: refused
            r = send(f"http://{lan}:{http[1]}", name, "llm", body, headers={
                "kernos-forwarded-by": ids[0], "kernos-forwarded-for": "127.0.0.1", "kernos-cluster-secret": "x" * 64})
            assert r.status_code == 403 and "loopback" in r.json()["detail"]
    finally:
        _stop(procs)


def test_openai_clients_reach_the_agents_home_through_any_node(tmp_path, shared):
    """The `openai` package against node 0's /v1, for an agent homed on node 1: the call (and a stream) runs on
    node 1; the client never knows."""
    import openai
    from conftest import write_config


    cfg = write_config(tmp_path / "h.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN},
                       cluster=shared())
    procs = _start(tmp_path, cfg, 2, "h")
    try:
        ids = [v.node_id for v in _wait_for_view([a for _, a in procs], 2)]
        name = _homed_on(ids, 1, "web")
        with kernos.sdk.connect(procs[1][1], agent=name) as s:
            token = s.token
        client = openai.OpenAI(base_url=f"http://{procs[0][0].http_address}/v1", api_key=token)
        reply = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi there"}],
                                               max_tokens=8, extra_body={"program_id": "web-p"})
        assert reply.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "stream it"}], max_tokens=8, stream=True)
            if c.choices)
        assert streamed
        ran = [n for n, (_, a) in zip(ids, procs) if any(p.program_id == "web-p"
                                                          for p in _operator_stats(a).programs)]
        assert ran == [ids[1]]
        assert _operator_stats(procs[0][1]).forwarded >= 2
        with pytest.raises(openai.AuthenticationError):            # a bad token is refused where it arrives
            openai.OpenAI(base_url=f"http://{procs[0][0].http_address}/v1", api_key="kn_nope").models.list()
    finally:
        _stop(procs)


def test_a_fine_tuning_job_on_a_dead_node_resumes_on_another(tmp_path, shared, tiny_models):
    """The job's folder and its last whole checkpoint are in the object store as it trains: when its node is
    SIGKILLed, a live node adopts the job once the lease expires and resumes it from that checkpoint."""
    import signal

    from conftest import write_config
    from test_finetune import LOOSE_RETENTION, task


    cfg = write_config(tmp_path / "j.toml", [{"name": "tiny-llama", "path": str(tiny_models["llama"])}],
                       server={"admin_token": ADMIN}, tuner={"threads": 1, "retention": LOOSE_RETENTION},
                       cluster=shared())
    procs = _start(tmp_path, cfg, 2, "j")
    try:
        ids = [v.node_id for v in _wait_for_view([a for _, a in procs], 2)]
        name = _homed_on(ids, 0, "tuner")
        with kernos.sdk.connect(procs[0][1], agent=name) as s:
            for q, right in task(24, seed=1):
                s.tuner.feedback(s.llm.chat(q, max_tokens=2).request_id, preferred=right)
            s.tuner.build_dataset("long", eval_fraction=0.25)
            job = s.tuner.finetune("long", "long", config={"max_steps": 100000, "checkpoint_every": 10,
                                                            "learning_rate": 1e-3})
            while (j := s.tuner.job(job.job_id)).step < 35:
                assert j.state in ("queued", "running"), j.message
                time.sleep(0.1)
            time.sleep(1.5)                       # the supervisor stores the checkpoint of step 30
            token = s.token
        procs[0][0].send_signal(signal.SIGKILL)
        procs[0][0].wait()
        with kernos.sdk.connect(procs[1][1], agent=name, token=token) as s:
            deadline = time.time() + 90
            while (j := s.tuner.job(job.job_id)).resumed_from_step == 0:
                assert time.time() < deadline, f"not adopted: {j.state} {j.message}"
                time.sleep(0.3)
            assert j.resumed_from_step >= 20 and j.state == "running"   # from a checkpoint, not from scratch
            assert j.base.loss is not None                                # the base evaluation came along
            assert s.tuner.cancel(job.job_id).job_id == job.job_id
    finally:
        _stop(procs)


def test_nodes_serving_tls_forward_to_each_other_over_tls(tmp_path, pg_url, shared):
    """Two nodes that serve only TLS with client certificates (mTLS): a call for an agent homed on the other node
    is forwarded over TLS, the forwarding node presenting its own certificate."""
    import ipaddress

    from conftest import write_config
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from test_transport import _cert, _key


    def write(name, cert, key):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ca_key, node_key, client_key = _key(), _key(), _key()
    write("ca", _cert("cluster-ca", ca_key, "cluster-ca", ca_key, ca=True), ca_key)
    write("node", _cert("node", node_key, "cluster-ca", ca_key,
                        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), node_key)
    write("client", _cert("agent", client_key, "cluster-ca", ca_key), client_key)
    pem = {n: str(tmp_path / f"{n}.pem") for n in ("ca", "node", "client")}
    cfg = write_config(tmp_path / "t.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"tls_cert": pem["node"], "tls_key": str(tmp_path / "node.key"),
                               "tls_client_ca": pem["ca"], "admin_token": ADMIN},
                       cluster=shared(tls_ca=pem["ca"]))
    procs = _start(tmp_path, cfg, 2, "t")
    tls = dict(tls_ca=pem["ca"], tls_cert=pem["client"], tls_key=str(tmp_path / "client.key"))
    try:
        deadline = time.time() + 30
        while True:
            from kernos.kernel.cluster.nodes import Nodes
            from kernos.storage.db import Postgres

            nodes = Nodes(Postgres(pg_url, "kernos_cluster"), node_id="", lease_s=3.0)
            live = nodes.live()
            nodes.close()
            if len(live) == 2:
                break
            assert time.time() < deadline
            time.sleep(0.3)
        time.sleep(1.0)                                  # each node's view holds both
        ids = sorted(n.node_id for n in live)
        by_address = {n.grpc_address: n.node_id for n in live}
        entry = procs[0][1]
        other = next(i for i in ids if i != by_address[entry])
        name = _homed_on(ids, ids.index(other), "tls")
        with kernos.sdk.connect(entry, agent=name, **tls) as s:
            assert s.llm.chat("over tls", model="echo", max_tokens=4, program_id="tls-p").text
        stats = {}
        for _, address in procs:
            with kernos.sdk.connect(address, token=ADMIN, **tls) as op:
                stats[by_address[address]] = op.kernel.stats()
        entry_stats = stats[by_address[entry]]
        assert entry_stats.forwarded >= 1 and entry_stats.served_for_unreachable == 0, \
            "the call was forwarded to the agent's home over TLS"
        assert any(p.program_id == "tls-p" for p in stats[other].programs)
    finally:
        _stop(procs)
