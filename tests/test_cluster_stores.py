"""The stores on the cluster backends: a real PostgreSQL server and a real S3 server (SeaweedFS). Two instances of a
store on one database stand for two kernel nodes: what one writes the other sees, and racing writers never lose or
duplicate anything."""
from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace

import pytest

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import syscall
from kernos.abi.trace import TraceRecord
from kernos.kernel.security.access import AccessControl
from kernos.kernel.security.enrollment import Enrollments
from kernos.kernel.security.principals import AgentRegistry
from kernos.memory.context import ContextStore
from kernos.storage.blobs import S3Blobs
from kernos.storage.db import Databases, Postgres, connect, upsert
from kernos.storage.files import FileStore, StorageError
from kernos.storage.traces import TraceLog


def test_one_sql_for_both_dialects(pg_url, tmp_path):
    """The same statements (placeholders, upserts, RETURNING, the SQLite column types) on SQLite and PostgreSQL."""
    schema = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, n INTEGER NOT NULL, x REAL NOT NULL, b BLOB);"
    for db in (connect(tmp_path / "x.db"), connect(Postgres(pg_url, "kernos_x"))):
        db.executescript(schema)
        db.execute(upsert("t", ("k", "n", "x", "b"), ("k",)), ("a", 3_000_000_000, 0.1, b"\x00\xff"))
        db.execute(upsert("t", ("k", "n", "x", "b"), ("k",)), ("a", 4, 1.5, None))          # replaces the row
        assert db.execute("SELECT k, n, x, b FROM t").fetchall() == [("a", 4, 1.5, None)]
        assert db.execute("UPDATE t SET n=n+1 WHERE k=? RETURNING n", ("a",)).fetchone() == (5,)
        assert db.execute("SELECT COUNT(*) FROM t WHERE k LIKE ?", ("%a%",)).fetchone()[0] == 1
        with pytest.raises(ZeroDivisionError), db:       # `with db:` rolls back an explicit transaction
            db.execute("BEGIN")
            db.execute("DELETE FROM t")
            raise ZeroDivisionError
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
        assert db.columns("t") == {"k", "n", "x", "b"}
        db.close()


def test_files_on_postgres_and_s3_are_shared_and_durable(pg_url, s3_url, s3_endpoint, tmp_path):
    where = Databases(tmp_path, pg_url)("files/files.db")
    a = FileStore(tmp_path / "a", quota_bytes=100_000, db=where, blobs=S3Blobs(s3_url, s3_endpoint))
    b = FileStore(tmp_path / "b", quota_bytes=100_000, db=where, blobs=S3Blobs(s3_url, s3_endpoint))
    v1 = a.write("ag", "notes/x.txt", b"one", {"by": "a"})
    v2 = b.write("ag", "notes/x.txt", b"two")
    assert (v1.version, v2.version) == (1, 2)
    assert a.read("ag", "notes/x.txt")[1] == b"two" and b.read("ag", "notes/x.txt", 1)[1] == b"one"
    assert a.rollback("ag", "notes/x.txt", 1).version == 3 and b.read("ag", "notes/x.txt")[1] == b"one"
    assert [f.path for f in b.list("ag")] == ["notes/x.txt"] and b.list("other") == []
    assert not list((tmp_path / "a").rglob("blobs/*/*")), "the contents are in the object store"
    b.write("ag", "big", b"0" * 60_000)
    with pytest.raises(StorageError, match="quota"):         # the quota counts what every node wrote
        a.write("ag", "big2", b"1" * 60_000)
    a.delete("ag", "notes/x.txt")
    with pytest.raises(StorageError) as e:
        b.stat("ag", "notes/x.txt")
    assert e.value.code == "NOT_FOUND"


def test_racing_writers_on_two_nodes_get_distinct_versions(pg_url, s3_url, s3_endpoint, tmp_path):
    where = Databases(tmp_path, pg_url)("files/files.db")
    nodes = [FileStore(tmp_path / n, db=where, blobs=S3Blobs(s3_url, s3_endpoint)) for n in "ab"]
    got: list[tuple[int, str]] = []

    def write(node, i):
        for j in range(10):
            payload = f"{i}-{j}".encode()
            info = node.write("ag", "hot.txt", payload)
            got.append((info.version, hashlib.sha256(payload).hexdigest()))
    threads = [threading.Thread(target=write, args=(nodes[i % 2], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in got) == list(range(1, 41)), "every acknowledged write has its own version"
    for version, digest in got:
        assert hashlib.sha256(nodes[0].read("ag", "hot.txt", version)[1]).hexdigest() == digest


def soon(condition, timeout: float = 5.0):
    """What one node committed reaches another's caches by a change notification: milliseconds, not at once."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "another node's change did not arrive"
        time.sleep(0.005)
    return True


def test_access_decisions_follow_another_node(pg_url, tmp_path):
    dbs = Databases(tmp_path, pg_url)
    a, b = AccessControl(dbs("access.db")), AccessControl(dbs("access.db"))
    op = SimpleNamespace(agent_id="root", operator=True)
    a.create_group("team")
    a.add_member("team", "alice")
    assert soon(lambda: b.groups_of("alice") == frozenset({"team"}))
    a.set_capabilities("bob", ["llm"])
    assert soon(lambda: b.capabilities("bob") == ("llm",))
    alice = SimpleNamespace(agent_id="alice", operator=False)
    read = syscall("storage.read", owner="carol", path="shared/x.txt")
    assert not b.decide(alice, read)[0]
    g = a.grant(op, "group:team", "storage", "carol", "shared", "read")
    assert soon(lambda: b.decide(alice, read)[0]) and "group:team" in b.decide(alice, read)[2]
    b.revoke(op, g.grant_id)
    assert soon(lambda: not a.decide(alice, read)[0]) and a.grants(alice) == []
    token, _ = a.create_token("ops")
    assert b.operator(token).agent_id == "admin:ops"
    b.revoke_token("ops")
    assert a.operator(token) is None


def test_an_enrollment_use_is_redeemed_once_across_nodes(pg_url, tmp_path):
    dbs = Databases(tmp_path, pg_url)
    nodes = [Enrollments(dbs("access.db")) for _ in range(4)]
    token, _ = nodes[0].create("batch", uses=3)
    won = []
    threads = [threading.Thread(target=lambda n=n: won.append(n.redeem(token))) for n in nodes * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(w is not None for w in won) == 3
    assert sorted(w.uses_left for w in won if w) == [0, 1, 2]


def test_agents_registered_on_one_node_are_known_on_another(pg_url, tmp_path):
    dbs = Databases(tmp_path, pg_url)
    a, b = AgentRegistry(dbs("kernel.db"), ttl_s=60), AgentRegistry(dbs("kernel.db"), ttl_s=60)
    _, token = a.create("planner", "plans")
    assert b.authenticate(token).agent_id == "planner"
    with pytest.raises(StatusError) as e:        # the name is taken on every node
        b.create("planner")
    assert e.value.code == "ALREADY_EXISTS"
    _, token2 = b.rotate("planner")
    assert a.authenticate(token2).agent_id == "planner"
    assert soon(lambda: a.authenticate(token) is None)       # the old one stops working there too


def test_one_name_registered_on_two_nodes_at_once_goes_to_one(pg_url, tmp_path):
    dbs = Databases(tmp_path, pg_url)
    nodes = [AgentRegistry(dbs("kernel.db"), ttl_s=60) for _ in range(4)]
    won, barrier = [], threading.Barrier(4)

    def register(node):
        barrier.wait()
        try:
            won.append(node.create("contested")[1])
        except StatusError as e:
            assert e.code == "ALREADY_EXISTS"
    threads = [threading.Thread(target=register, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and all(n.authenticate(won[0]).agent_id == "contested" for n in nodes)


def test_contexts_appended_from_two_nodes_keep_every_block_in_order(pg_url, tmp_path):
    dbs = Databases(tmp_path, pg_url)
    a, b = ContextStore(dbs("contexts.db")), ContextStore(dbs("contexts.db"))
    a.create("ag", "c1", 1000, False, "m")
    threads = [threading.Thread(target=lambda s=s, i=i: [s.add_block("ag", "c1", "user", f"{i}-{j}")
                                                        for j in range(10)]) for i, s in enumerate([a, b] * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [blk.seq for blk in b.blocks("ag", "c1")]
    assert len(seqs) == 40 and len(set(seqs)) == 40 and seqs == sorted(seqs)


def test_traces_and_outcomes_on_postgres(pg_url, tmp_path):
    dbs = Databases(tmp_path, pg_url)
    log = TraceLog(dbs("traces.db"))
    for i in range(5):
        log.record(TraceRecord("ag", "llm.generate", "OK", {"i": i}, {"request_id": f"r{i}"}, {"ms": 1.0}))
    log.close()
    reader = TraceLog(dbs("traces.db"))
    assert [r.request["i"] for r in reader.query("ag")] == [0, 1, 2, 3, 4]
    assert reader.has_generation("ag", "r3") and not reader.has_generation("ag", "r9")
    assert reader.add_outcome("ag", "r3", 1.0, True) == 1
    assert reader.outcomes("ag")["r3"][0]["success"] is True
    assert [r.request["i"] for r in reader.scan("ag", "llm.generate", page=2)] == [0, 1, 2, 3, 4]
    reader.close()


def test_s3_blobs_are_cached_by_the_node_that_read_or_wrote_them(s3_url, s3_endpoint):
    import boto3

    data = b"immutable " * 100
    digest = hashlib.sha256(data).hexdigest()
    cached, uncached = S3Blobs(s3_url, s3_endpoint), S3Blobs(s3_url, s3_endpoint, cache_bytes=0)
    cached.put(digest, data)
    assert uncached.get(digest) == data
    bucket, _, prefix = s3_url[5:].partition("/")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").delete_object(
        Bucket=bucket, Key=f"{prefix}/{digest[:2]}/{digest}")
    assert cached.get(digest) == data               # from this node's cache: a blob never changes
    with pytest.raises(StatusError) as e:
        uncached.get(digest)
    assert e.value.code == "DATA_LOSS"


def test_continual_tuning_state_goes_to_the_agents_new_home(pg_url, tmp_path):
    """Only the agent's home runs its continual-tuning rounds; the state is shared, so a node that becomes the home
    (its old home died) goes on from the state the old one last wrote."""
    from kernos.kernel.tuner.continual import Continual, ContinualSpec

    dbs = Databases(tmp_path, pg_url)
    home = {"ada": "a"}
    traces = TraceLog(dbs("traces.db"))
    a = Continual(dbs("tuner/continual.db"), None, traces, None, mine=lambda agent: home[agent] == "a")
    b = Continual(dbs("tuner/continual.db"), None, traces, None, mine=lambda agent: home[agent] == "b")
    st = a.configure("ada", ContinualSpec(min_feedback=7))
    st.round, st.phase = 3, "training"
    a._save(st)
    a._take_over()
    b._take_over()
    assert a._owned == {"ada"} and b._owned == set()
    assert b.state("ada").round == 3                 # seen there, not run there
    home["ada"] = "b"                                # a died: b is the home now
    b._take_over()
    assert b._owned == {"ada"} and (b.state("ada").round, b.state("ada").phase) == (3, "training")
    assert b.state("ada").spec["min_feedback"] == 7
    a.close()
    b.close()
    traces.close()


def test_registered_tools_are_shared_and_a_public_name_has_one_owner(pg_url):
    """Two nodes' tool stores on one database: what one registers the other serves, and two owners racing for
    one public name: exactly one gets it."""
    from kernos.kernel.tools.registry import ToolStore
    from kernos.kernel.tools.spec import Tool

    where = Postgres(pg_url, "kernos_tools")
    a, b = ToolStore(where), ToolStore(where)
    b.changed()
    assert a.put(Tool("triple", "", {"type": "object"}, "alice", "result = 3", public=False))
    assert b.changed() and [(t.key, t.code) for t in b.load()] == [("alice/triple", "result = 3")]
    results = {}

    def claim(store, owner):
        results[owner] = store.put(Tool("weather", "", {"type": "object"}, owner, "result = 1", public=True))

    threads = [threading.Thread(target=claim, args=(s, o)) for s, o in ((a, "alice"), (b, "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [False, True]
    winner = next(o for o, ok in results.items() if ok)
    assert [t.owner for t in a.load() if t.key == "weather"] == [winner]
    assert b.put(Tool("weather", "", {"type": "object"}, winner, "result = 2", public=True))   # its owner: replaces
    assert a.put(Tool("triple", "", {"type": "object"}, "alice", "result = 9", public=True), replaces="alice/triple")
    assert sorted(t.key for t in b.load()) == ["triple", "weather"]
    assert a.delete("triple") and not b.delete("triple")
    a.close()
    b.close()
