"""Tools through a real kernel: built-ins, JSON-schema validation, the sandboxed Python runner and its
limits, registered tools, per-tool limits, and the confirmation flow of irreversible tools."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.kernel.tools.builtins import calculate

ADMIN = "tools-admin-token-0123456789"


def test_calculator_is_arithmetic_only():
    assert calculate("2 + 3 * (4 - 1) ** 2") == 29
    assert calculate("sqrt(16) + pi") == pytest.approx(4 + 3.14159265, rel=1e-6)
    for hostile in ("__import__('os').system('true')", "open('/etc/passwd')", "(1).__class__", "x", "9 ** 99999",
                    "[1, 2]", "lambda: 1"):
        with pytest.raises((ValueError, SyntaxError)):
            calculate(hostile)


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("tools")
    cfg = write_config(d / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN}, tools={"confirm_timeout_s": 1.5})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield address
    assert stop_kernel(proc) == 0


def test_builtins_and_schema_validation(tk):
    with kernos.sdk.connect(tk, agent="tool-user") as s:
        names = {t["name"] for t in s.tools.list()}
        assert {"calculator", "memory_search", "storage_search", "python"} <= names
        r = s.tools.call("calculator", expression="6 * 7")
        assert r.state == "done" and r.result == 42
        with pytest.raises(kernos.sdk.InvalidArgument, match="expression"):
            s.tools.call("calculator")                         # missing required argument
        with pytest.raises(kernos.sdk.InvalidArgument, match="not of type"):
            s.tools.call("calculator", expression=7)
        with pytest.raises(kernos.sdk.InvalidArgument, match="Additional properties"):
            s.tools.call("calculator", expression="1", evil=True)
        with pytest.raises(kernos.sdk.InvalidArgument, match="calculator"):
            s.tools.call("calculator", expression="__import__('os')")
        with pytest.raises(kernos.sdk.NotFound):
            s.tools.call("rm_rf")
        s.storage.write("notes/tea.md", "Green tea is brewed at 80 degrees.", index=True)
        hits = s.tools.call("storage_search", query="how hot should the water be for tea", k=1).result
        assert hits[0]["path"] == "notes/tea.md"


def test_sandboxed_python_and_its_limits(tk):
    with kernos.sdk.connect(tk, agent="coder") as s:
        assert s.tools.call("python", code="result = sum(range(10))").result == 45
        r = s.tools.call("python", code="import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)")
        assert r.state == "error" and ("unreachable" in r.error.lower() or "error" in r.error.lower())
        r = s.tools.call("python", code="x = bytearray(2 << 30)")
        assert r.state == "error" and "memory" in r.error
        t0 = time.monotonic()
        r = s.tools.call("python", code="while True: pass")
        assert r.state == "error" and "CPU" in r.error and time.monotonic() - t0 < 15
        r = s.tools.call("python", code="import os\nresult = [os.getcwd(), sorted(os.environ)]")
        assert r.result[0] == "/work" and "KERNOS_TOKEN" not in r.result[1]     # the jail's own tmpfs


def test_registered_tools_private_public_and_limits(tk):
    with kernos.sdk.connect(tk, agent="maker") as maker, kernos.sdk.connect(tk, agent="user2") as user:
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]}
        maker.tools.register("square", "result = args['n'] ** 2", schema, "square a number")
        assert maker.tools.call("square", n=12).result == 144
        with pytest.raises(kernos.sdk.InvalidArgument, match="minimum"):
            maker.tools.call("square", n=-1)
        for name in ("square", "maker/square"):
            with pytest.raises(kernos.sdk.NotFound):          # private to its owner...
                user.tools.call(name, n=2)
        g = maker.access.grant("user2", "tool", "execute", resource="square")
        assert user.tools.call("maker/square", n=3).result == 9     # ...until granted, by "owner/name"
        assert "maker/square" in {t["name"] for t in user.tools.list()}
        maker.access.revoke(g.grant_id)
        with pytest.raises(kernos.sdk.NotFound):
            user.tools.call("maker/square", n=2)              # ...and revoked
        maker.tools.register("slow", "import time\ntime.sleep(args['s'])\nresult = 'ok'",
                             {"type": "object"}, public=True, timeout_s=1)
        assert user.tools.call("slow", s=0.1).result == "ok"
        r = user.tools.call("slow", s=5)
        assert r.state == "error" and "wall-clock" in r.error
        with pytest.raises(kernos.sdk.AlreadyExists):
            user.tools.register("calculator", "result = 0")
        with pytest.raises(kernos.sdk.InvalidArgument, match="JSON Schema"):
            maker.tools.register("bad_schema", "result = 1", {"type": "nonsense"})


def test_irreversible_tools_wait_for_a_human(tk):
    admin = kernos.sdk.connect(tk, token=ADMIN)
    admin.tools.register("send_payment", "result = {'paid': args['amount']}",
                         {"type": "object", "properties": {"amount": {"type": "number"}}}, irreversible=True)
    with kernos.sdk.connect(tk, agent="payer") as s:
        pending = s.tools.call("send_payment", amount=10)
        assert pending.state == "pending" and pending.result is None
        assert [c.call_id for c in admin.tools.pending()] == [pending.call_id]
        with pytest.raises(kernos.sdk.PermissionDenied):
            s.tools.confirm(pending.call_id)                  # agents cannot approve their own calls
        out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "confirm", pending.call_id,
                              "--address", tk, "--token", ADMIN], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "done" in out.stdout
        assert s.tools.wait(pending.call_id).result == {"paid": 10}

        second = s.tools.call("send_payment", amount=99)
        admin.tools.deny(second.call_id)
        assert s.tools.wait(second.call_id).state == "denied"

        third = s.tools.call("send_payment", amount=5)      # nobody answers: the timeout denies
        r = s.tools.wait(third.call_id, timeout=10)
        assert r.state == "denied" and "no confirmation" in r.error


def test_tools_need_the_tools_capability(tk):
    admin = kernos.sdk.connect(tk, token=ADMIN)
    with kernos.sdk.connect(tk, agent="no-tools") as s:
        admin.access.set_capabilities("no-tools", ["llm"])
        with pytest.raises(kernos.sdk.PermissionDenied, match="'tools'"):
            s.tools.call("calculator", expression="1+1")


def test_registered_tools_are_kept_until_unregistered(tmp_path):
    """A registered tool is acknowledged state: it outlives a restart; its owner (or an operator) removes it,
    nobody else can, and the kernel's own tools cannot be removed."""
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="keeper") as s, kernos.sdk.connect(address, agent="other") as o:
            s.tools.register("triple", "result = args['n'] * 3", {"type": "object"})
            s.tools.register("shout", "result = args['w'].upper()", {"type": "object"}, public=True)
            o.tools.register("mine", "result = 1", {"type": "object"})
            tokens = s.token, o.token
    finally:
        assert stop_kernel(proc) == 0
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="keeper", token=tokens[0]) as s, \
                kernos.sdk.connect(address, agent="other", token=tokens[1]) as o:
            assert s.tools.call("triple", n=5).result == 15            # the same tools after the restart
            assert o.tools.call("shout", w="hi").result == "HI"
            with pytest.raises(kernos.sdk.NotFound):
                o.tools.unregister("triple")                           # another agent's: not even seen
            with pytest.raises(kernos.sdk.NotFound):
                o.tools.unregister("shout")                            # public, but not its own
            with pytest.raises(kernos.sdk.FailedPrecondition, match="kernel's own"):
                kernos.sdk.connect(address, token=ADMIN).tools.unregister("calculator")
            assert s.tools.unregister("triple")["name"] == "triple"
            with pytest.raises(kernos.sdk.NotFound):
                s.tools.call("triple", n=1)
            kernos.sdk.connect(address, token=ADMIN).tools.unregister("other/mine")   # an operator: anyone's
            assert "mine" not in {t["name"] for t in o.tools.list()}
            assert "shout" in {t["name"] for t in o.tools.list()}
    finally:
        assert stop_kernel(proc) == 0
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="keeper", token=tokens[0]) as s:
            names = {t["name"] for t in s.tools.list()}
            assert "shout" in names and "triple" not in names and "other/mine" not in names   # removed for good
    finally:
        assert stop_kernel(proc) == 0
