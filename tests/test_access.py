"""Access control through a real kernel: the access matrix (owner / granted / not granted / revoked /
expired / via a group) for memory namespaces and storage prefixes, capability families, operator tokens,
and the audit log."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

ADMIN = "test-admin-token-0123456789"


@pytest.fixture(scope="module")
def ak(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("access")
    cfg = write_config(d / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}], server={"admin_token": ADMIN})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield address, d / "data"
    assert stop_kernel(proc) == 0


def ops(owner_id: str):
    return {
        ("storage", "read"): lambda s: s.storage.read("shared/a.txt", owner=owner_id),
        ("storage", "write"): lambda s: s.storage.write("shared/new.txt", "z", owner=owner_id),
        ("memory", "read"): lambda s: s.memory.get(["f1"], namespace=owner_id),
        ("memory", "write"): lambda s: s.memory.add(["another fact"], namespace=owner_id),
    }


def allowed(fn, s) -> bool:
    try:
        fn(s)
        return True
    except kernos.sdk.PermissionDenied as e:
        assert "missing capability" in e.message
        return False


def test_access_matrix(ak):
    address, _ = ak
    owner = kernos.sdk.connect(address, agent="owner")
    other = kernos.sdk.connect(address, agent="other")
    owner.storage.write("shared/a.txt", "shared text")
    owner.storage.write("private/b.txt", "private text")
    owner.memory.add(["the launch code is 1234"], ids=["f1"])
    table = ops("owner")

    # owner: everything on its own resources
    assert all(allowed(fn, owner) for fn in table.values())
    # not granted: nothing, and the message names the capability
    with pytest.raises(kernos.sdk.PermissionDenied, match="storage:read on owner/shared/a.txt"):
        table["storage", "read"](other)
    assert not any(allowed(fn, other) for fn in table.values())

    # granted read on the storage prefix "shared": read there only
    g = owner.access.grant("other", "storage", "read", resource="shared")
    assert allowed(table["storage", "read"], other)
    assert not allowed(lambda s: s.storage.read("private/b.txt", owner="owner"), other)
    assert not allowed(table["storage", "write"], other)
    assert not allowed(table["memory", "read"], other)
    # write includes read
    w = owner.access.grant("other", "storage", "write", resource="shared")
    assert allowed(table["storage", "write"], other)
    # revoked: denied again
    owner.access.revoke(g.grant_id)
    owner.access.revoke(w.grant_id)
    assert not allowed(table["storage", "read"], other) and not allowed(table["storage", "write"], other)

    # memory namespace grant
    m = owner.access.grant("other", "memory", "read")
    assert other.memory.get(["f1"], namespace="owner")[0].text == "the launch code is 1234"
    assert not allowed(table["memory", "write"], other)
    owner.access.revoke(m.grant_id)
    assert not allowed(table["memory", "read"], other)

    # expiring grant
    owner.access.grant("other", "memory", "read", ttl_s=0.5)
    assert allowed(table["memory", "read"], other)
    time.sleep(0.7)
    assert not allowed(table["memory", "read"], other)

    # an agent cannot grant what it does not own, nor revoke others' grants
    with pytest.raises(kernos.sdk.PermissionDenied):
        other.access.grant("other", "storage", "read", owner="owner")
    g2 = owner.access.grant("other", "storage", "read")
    stranger = kernos.sdk.connect(address, agent="stranger")
    with pytest.raises(kernos.sdk.PermissionDenied):
        stranger.access.revoke(g2.grant_id)
    assert [x.grant_id for x in other.access.grants()] == [g2.grant_id]
    assert stranger.access.grants() == []


def test_groups_capabilities_and_operators(ak):
    address, data = ak
    admin = kernos.sdk.connect(address, token=ADMIN)
    boss = kernos.sdk.connect(address, agent="boss")
    member = kernos.sdk.connect(address, agent="member")
    outsider = kernos.sdk.connect(address, agent="outsider")
    boss.memory.add(["quarterly numbers are up"], ids=["q"])

    with pytest.raises(kernos.sdk.PermissionDenied, match="admin"):
        boss.access.create_group("team")  # groups are an operator's business
    admin.access.create_group("team")
    admin.access.add_member("team", "member")
    boss.access.grant("group:team", "memory", "read")
    assert member.memory.get(["q"], namespace="boss")[0].text == "quarterly numbers are up"
    assert not allowed(lambda s: s.memory.get(["q"], namespace="boss"), outsider)
    admin.access.remove_member("team", "member")
    assert not allowed(lambda s: s.memory.get(["q"], namespace="boss"), member)

    # operators act on any resource
    assert admin.memory.get(["q"], namespace="boss")[0].id == "q"

    # capability families: without "llm" the agent cannot generate
    assert admin.access.set_capabilities("outsider", ["memory", "storage"]) == ["memory", "storage"]
    with pytest.raises(kernos.sdk.PermissionDenied, match="'llm'"):
        outsider.llm.chat("hi", model="echo")
    outsider.storage.write("mine.txt", "still allowed")
    assert outsider.access.capabilities() == ["memory", "storage"]

    # the audit log records the denials with the capability
    denied = admin.access.audit(denied_only=True, limit=1000)
    assert any(e["principal"] == "outsider" and e["capability"] == "llm" for e in denied)
    assert any(e["principal"] == "other" and "storage:read on owner" in e["capability"] for e in denied)
    with pytest.raises(kernos.sdk.PermissionDenied):
        boss.access.audit()


def test_operator_token_from_the_cli_and_revocation(ak):
    address, data = ak
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "create", "--admin", "--name", "ops",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    ops_session = kernos.sdk.connect(address, token=token)
    assert "admin" in ops_session.access.capabilities()
    ops_session.access.create_group("from-cli")
    revoked = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "revoke", "--name", "ops",
                              "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0
    with pytest.raises(kernos.sdk.Unauthenticated):
        ops_session.access.groups()


def test_hostile_owner_fields_do_not_escape(ak):
    address, _ = ak
    s = kernos.sdk.connect(address, agent="hostile")
    for owner in ("../owner", "owner/..", "", "owner\x00"):
        with pytest.raises((kernos.sdk.PermissionDenied, kernos.sdk.NotFound, kernos.sdk.InvalidArgument)):
            s.storage.read("shared/a.txt", owner=owner)
    with pytest.raises(kernos.sdk.InvalidArgument):
        s.storage.read("../owner/shared/a.txt")


def test_restricted_models_and_adapters_need_a_grant(tiny_models, lora_adapters, tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [
        {"name": "open", "path": "-", "kind": "echo"},
        {"name": "vip", "path": "-", "kind": "echo", "restricted": True},
        {"name": "tiny", "path": str(tiny_models["llama"]), "adapters": {k: str(v) for k, v in lora_adapters.items()},
         "restricted_adapters": ["beta"]}], server={"admin_token": ADMIN})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        admin = kernos.sdk.connect(address, token=ADMIN)
        s = kernos.sdk.connect(address, agent="caller")
        assert s.llm.chat("hello", model="open").text == "hello"
        with pytest.raises(kernos.sdk.PermissionDenied, match="model:execute on vip"):
            s.llm.chat("hello", model="vip")
        assert s.llm.chat("hello", model="tiny", adapter="alpha", max_tokens=2).completion_tokens == 2
        with pytest.raises(kernos.sdk.PermissionDenied, match="tiny/beta"):
            s.llm.chat("hello", model="tiny", adapter="beta", max_tokens=2)
        with pytest.raises(kernos.sdk.PermissionDenied):
            s.access.grant("caller", "model", "execute", resource="vip")  # only operators grant models
        g = admin.access.grant("caller", "model", "execute", resource="vip")
        admin.access.grant("caller", "model", "execute", resource="tiny/beta")
        assert s.llm.chat("now allowed", model="vip").text == "now allowed"
        assert s.llm.chat("hello", model="tiny", adapter="beta", max_tokens=2).completion_tokens == 2
        admin.access.revoke(g.grant_id)
        with pytest.raises(kernos.sdk.PermissionDenied):
            s.llm.chat("hello", model="vip")
    finally:
        assert stop_kernel(proc) == 0
