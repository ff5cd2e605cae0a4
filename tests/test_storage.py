"""The versioned file store, in-process (paths, versions, rollback, quota) and through a real kernel
(isolation between agents, the SDK), plus the crash test: a client writes continuously while the kernel
is killed with SIGKILL at random moments; every acknowledged write reads back intact."""
from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.storage.files import FileStore, StorageError, normalize_path


@pytest.mark.parametrize("raw,norm", [("a/b/c.txt", "a/b/c.txt"), ("a//b/./c", "a/b/c"), ("./x", "x"),
                                      ("notes/", "notes")])
def test_paths_are_normalised(raw, norm):
    assert normalize_path(raw) == norm


@pytest.mark.parametrize("bad", ["", "   ", "/etc/passwd", "../up", "a/../../b", "a\x00b", "C:/win", "a\\b",
                                 "x" * 300, "a/" * 600, ".", "./."])
def test_hostile_paths_are_refused(bad):
    with pytest.raises(StorageError) as err:
        normalize_path(bad)
    assert err.value.code == "INVALID_ARGUMENT"


def test_versions_history_rollback_and_delete(tmp_path):
    fs = FileStore(tmp_path)
    v1 = fs.write("a", "notes/todo.md", b"one")
    v2 = fs.write("a", "notes/todo.md", b"two", {"tag": "x"})
    assert (v1.version, v2.version) == (1, 2)
    assert fs.read("a", "notes/todo.md")[1] == b"two"
    assert fs.read("a", "notes/todo.md", version=1)[1] == b"one"
    v3 = fs.rollback("a", "notes/todo.md", 1)
    assert v3.version == 3 and fs.read("a", "notes/todo.md")[1] == b"one"
    assert [h.version for h in fs.history("a", "notes/todo.md")] == [1, 2, 3]
    assert [f.path for f in fs.list("a", "notes")] == ["notes/todo.md"]
    gone = fs.delete("a", "notes/todo.md")
    assert gone.deleted and gone.version == 4
    with pytest.raises(StorageError, match="no file"):
        fs.read("a", "notes/todo.md")
    assert fs.list("a") == []
    assert fs.read("a", "notes/todo.md", version=2)[1] == b"two"  # history survives deletion
    fs.close()
    again = FileStore(tmp_path)  # reopened: everything is still there
    assert [h.version for h in again.history("a", "notes/todo.md")] == [1, 2, 3, 4]


def test_agents_are_isolated_and_quota_is_enforced(tmp_path):
    fs = FileStore(tmp_path, quota_bytes=100)
    fs.write("a", "f", b"x" * 60)
    with pytest.raises(StorageError) as err:
        fs.read("b", "f")
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(StorageError) as err:
        fs.write("a", "g", b"y" * 50)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "quota" in str(err.value)
    fs.write("b", "f", b"z" * 60)  # another agent's quota is its own


def test_a_corrupt_blob_is_detected(tmp_path):
    fs = FileStore(tmp_path)
    info = fs.write("a", "f", b"precious")
    (tmp_path / "blobs" / info.sha256[:2] / info.sha256).write_bytes(b"tampered")
    with pytest.raises(StorageError) as err:
        fs.read("a", "f")
    assert err.value.code == "DATA_LOSS"


@pytest.fixture(scope="module")
def echo_kernel(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("storage-kernel")
    cfg = write_config(d / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       storage={"quota_bytes": 200_000, "max_file_bytes": 100_000})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield address
    assert stop_kernel(proc) == 0


def test_storage_syscalls_through_the_kernel(echo_kernel):
    with kernos.sdk.connect(echo_kernel, agent="writer") as a, kernos.sdk.connect(echo_kernel, agent="reader") as b:
        info = a.storage.write("reports/q3.txt", "revenue up", {"author": "writer"})
        assert info.version == 1 and info.metadata == {"author": "writer"} and info.size == 10
        a.storage.write("reports/q3.txt", "revenue flat")
        assert a.storage.read_text("reports/q3.txt") == "revenue flat"
        assert [f.path for f in a.storage.list("reports")] == ["reports/q3.txt"]
        assert a.storage.rollback("reports/q3.txt", 1).version == 3
        assert a.storage.read_text("reports/q3.txt") == "revenue up"
        assert [h.version for h in a.storage.history("reports/q3.txt")] == [1, 2, 3]
        with pytest.raises(kernos.sdk.NotFound):
            b.storage.read("reports/q3.txt")  # another agent's file is invisible
        assert b.storage.list() == []
        for bad in ("../writer/reports/q3.txt", "/abs", "a\x00b", "x" * 2000):
            with pytest.raises(kernos.sdk.InvalidArgument):
                b.storage.write(bad, "x")
        with pytest.raises(kernos.sdk.ResourceExhausted, match="limit"):
            a.storage.write("big.bin", b"0" * 150_000)
        a.storage.write("half.bin", b"0" * 90_000)
        a.storage.write("half2.bin", b"1" * 90_000)  # 180 KB of 200 KB used (every version counts)
        with pytest.raises(kernos.sdk.ResourceExhausted, match="quota"):
            a.storage.write("half3.bin", b"2" * 90_000)
        a.storage.delete("reports/q3.txt")
        with pytest.raises(kernos.sdk.NotFound):
            a.storage.stat("reports/q3.txt")


def test_acknowledged_writes_survive_sigkill(tmp_path):
    """Kill the kernel with SIGKILL at random moments while a client writes; restart; every acknowledged
    write must read back byte for byte (its exact version), and no file may be torn."""
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}])
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    acknowledged: dict[tuple[str, int], str] = {}   # (path, version) -> sha256
    token = None
    kills = 0
    for round_ in range(4):
        proc, address = start_kernel(data_dir, str(cfg), timeout=120)
        session = kernos.sdk.connect(address, agent="crashy", token=token) if token else \
            kernos.sdk.connect(address, agent="crashy")
        token = session.token
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                path = f"f{rng.randrange(5)}.bin"
                payload = rng.randbytes(rng.randrange(1, 20_000))
                try:
                    info = session.storage.write(path, payload)
                except kernos.sdk.KernosError:
                    return  # the kernel died mid-call: not acknowledged
                acknowledged[(info.path, info.version)] = hashlib.sha256(payload).hexdigest()
                i += 1
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(rng.uniform(0.3, 1.2))
        proc.kill()  # SIGKILL: no drain, no flush
        proc.wait()
        kills += 1
        stop.set()
        t.join(30)
        session.close()
    proc, address = start_kernel(data_dir, str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="crashy", token=token) as s:
            assert len(acknowledged) > 20, "the writer should have got many writes acknowledged"
            for (path, version), digest in acknowledged.items():
                data = s.storage.read(path, version=version)
                assert hashlib.sha256(data).hexdigest() == digest, f"{path} v{version} is torn or lost"
            for f in s.storage.list():  # the latest version of every file is whole too
                assert hashlib.sha256(s.storage.read(f.path)).hexdigest() == f.sha256
    finally:
        stop_kernel(proc)
    assert kills == 4
    print(f"crash test: {len(acknowledged)} acknowledged writes across {kills} SIGKILLs, all intact")
