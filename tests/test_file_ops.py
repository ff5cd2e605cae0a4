"""AIOS's model-driven file operations as a use case, without HTTP: each operation is admitted as the syscall
it is and done by the files use case, on a real kernel built in this process (echo model, real stores)."""
from __future__ import annotations

import asyncio
import json

import pytest


@pytest.fixture()
def kernel(tmp_path):
    from conftest import write_config

    from kernos.kernel.app import Kernel
    from kernos.kernel.config import load_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}])
    k = Kernel(load_config(str(cfg), data_dir=str(tmp_path / "data")))
    yield k
    k.drain(0)
    k.close()


def test_each_operation_is_admitted_as_its_syscall_and_done(kernel):
    from kernos.abi.errors import StatusError
    from kernos.abi.syscalls import syscall
    from kernos.kernel.syscalls.file_ops import FileOperations

    _, token = kernel.registry.create("ops-agent")
    me = kernel.gate.authenticate(token)
    kernel.access_control.create_group("aios")
    admitted = []

    def admit(principal, name, path="", args=None):
        kernel.gate.admit(principal, syscall(name, path=path))       # the real gate: capability, rate, audit
        admitted.append((name, path))

    async def no_model(principal, g):
        raise AssertionError("run() needs no model")

    ops = FileOperations(kernel.storage, kernel.access, "aios", no_model, admit)

    async def work():
        said = await ops.run(me, "write", {"file_path": "notes/a.txt", "content": "first"})
        assert "version 1" in said
        assert "already exists" in await ops.run(me, "create_file", {"file_path": "notes/a.txt"})
        await ops.run(me, "write", {"file_path": "notes/a.txt", "content": "second"})
        assert "back to version 1" in await ops.run(me, "rollback", {"file_path": "notes/a.txt", "n": 1})
        f, data = await kernel.storage.read(me, "notes/a.txt")
        assert data == b"first" and f.version == 3
        assert "shared 'notes/a.txt'" in await ops.run(me, "share", {"file_path": "notes/a.txt"})
        assert [g.grantee for g in kernel.access_control.grants(me)] == ["group:aios"]
        with pytest.raises(StatusError, match="cannot go back 9"):
            await ops.run(me, "rollback", {"file_path": "notes/a.txt", "n": 9})
        with pytest.raises(StatusError, match="params.file_path must be a non-empty string"):
            await ops.run(me, "write", {"file_path": " "})
        json.loads(await ops.run(me, "retrieve", {"query_text": "first"}))
    asyncio.run(work())
    assert admitted == [("storage.write", "notes/a.txt"), ("storage.write", "notes/a.txt"),
                        ("storage.write", "notes/a.txt"), ("storage.rollback", "notes/a.txt"),
                        ("access.grant", ""), ("storage.rollback", "notes/a.txt"), ("storage.search", "")]
    decisions = [r.kind for r in kernel.audit.query("ops-agent", limit=100)]
    assert {"storage.write", "storage.rollback", "storage.search"} <= set(decisions)
