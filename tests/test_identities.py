"""Identities and registration against real kernel processes (issue 12, findings 5 and 6): a name is bound to
its credential for good (after exit, after its TTL, across restarts), registration follows the configured
policy (open with per-address and total limits, enroll, closed), and group quotas make a swarm of fresh
agents share one budget."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

ADMIN = "identity-admin-token-0123456789"
ECHO = [{"name": "echo", "path": "-", "kind": "echo"}]


def _start(d, **sections):
    from conftest import write_config

    cfg = write_config(d / "k.toml", ECHO, server={"admin_token": ADMIN, **sections.pop("server", {})}, **sections)
    return start_kernel(d / "data", str(cfg), timeout=120)


def _cli(data, *args):
    return subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", *args, "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=60)


def test_a_name_stays_its_owners_after_exit_idle_and_restart(tmp_path):
    """Finding 5: after an agent exited, or its TTL passed, anyone registering its name read its files."""
    proc, address = _start(tmp_path, server={"agent_ttl_s": 1.0})
    try:
        victim = kernos.sdk.connect(address, agent="victim")
        token = victim.token
        victim.storage.write("diary.txt", "the victim's secret 4711")
        victim.exit()
        thief = kernos.sdk.connect(address, agent="thief")
        for credential in (None, thief.token, "kn_forged-0123456789", "kn_enroll_forged"):
            with pytest.raises(kernos.sdk.AlreadyExists):
                kernos.sdk.connect(address, agent="victim", credential=credential)
        time.sleep(1.5)                                    # past agent_ttl_s: idle, still owned
        admin = kernos.sdk.connect(address, token=ADMIN)
        state = {a.agent_id: a.state for a in admin.kernel.agents(include_exited=True)}
        assert state["victim"] == "exited" and state["thief"] == "idle"
        with pytest.raises(kernos.sdk.AlreadyExists):
            kernos.sdk.connect(address, agent="victim")
        with pytest.raises(kernos.sdk.PermissionDenied):    # the names are the thief's only way in
            thief.storage.read("diary.txt", owner="victim")
        back = kernos.sdk.connect(address, agent="victim", token=token)
        assert back.storage.read("diary.txt").decode() == "the victim's secret 4711"
    finally:
        assert stop_kernel(proc) == 0
    proc, address = _start(tmp_path, server={"agent_ttl_s": 1.0})        # same data dir: a restart
    try:
        with pytest.raises(kernos.sdk.AlreadyExists):
            kernos.sdk.connect(address, agent="victim")
        back = kernos.sdk.connect(address, agent="victim", token=token)
        assert back.storage.read("diary.txt").decode() == "the victim's secret 4711"
        # Registering again with its own token rotates it: the old one stops working.
        rotated = kernos.sdk.connect(address, agent="victim", credential=token)
        assert rotated.token != token and rotated.storage.read("diary.txt").decode().endswith("4711")
        with pytest.raises(kernos.sdk.Unauthenticated):
            kernos.sdk.connect(address, agent="victim", token=token)
        # An operator can give a name a new token (a lost credential); the agent's data stays with the name.
        reset = kernos.sdk.connect(address, agent="victim", credential=ADMIN)
        with pytest.raises(kernos.sdk.Unauthenticated):
            kernos.sdk.connect(address, agent="victim", token=rotated.token)
        assert reset.storage.read("diary.txt").decode().endswith("4711")
        # Offline, while the kernel runs: a new agent's token works at once; a revoked one stops at once.
        made = _cli(tmp_path / "data", "create", "--agent", "made-offline")
        assert made.returncode == 0, made.stderr
        offline = kernos.sdk.connect(address, agent="made-offline", token=made.stdout.strip())
        offline.kernel.heartbeat()
        assert _cli(tmp_path / "data", "revoke", "--agent", "made-offline").returncode == 0
        with pytest.raises(kernos.sdk.Unauthenticated):
            offline.kernel.heartbeat()
        with pytest.raises(kernos.sdk.AlreadyExists):          # revoked: the name stays reserved
            kernos.sdk.connect(address, agent="made-offline")
        listed = _cli(tmp_path / "data", "list")
        assert "made-offline" in listed.stdout and "kn_" not in listed.stdout      # names, never tokens
        # token_file: a program that runs again gets its own name back instead of ALREADY_EXISTS.
        keep = tmp_path / "creds" / "keeper.token"
        first = kernos.sdk.connect(address, agent="keeper", token_file=keep)
        first.exit()
        assert keep.stat().st_mode & 0o777 == 0o600 and keep.read_text().strip() == first.token
        assert kernos.sdk.connect(address, agent="keeper", token_file=keep).token == first.token
    finally:
        assert stop_kernel(proc) == 0
    other = tmp_path / "other"                  # another kernel does not know the saved token: a new one
    other.mkdir()
    proc, address = _start(other)
    try:
        fresh = kernos.sdk.connect(address, agent="keeper", token_file=keep)
        assert fresh.token != first.token and keep.read_text().strip() == fresh.token
    finally:
        assert stop_kernel(proc) == 0


def test_open_registration_is_limited_and_new_agents_share_their_groups_budget(tmp_path):
    """Finding 6: with concurrent_generations = 1, four freshly registered agents each got a generation;
    Register needed no credential and had no rate limit."""
    proc, address = _start(tmp_path, registration={"per_peer_per_minute": 6, "max_agents": 4, "group": "newcomers"},
                           quotas={"groups": {"newcomers": {"tokens_per_minute": 16}}})
    try:
        a = kernos.sdk.connect(address, agent="fresh-a")
        b = kernos.sdk.connect(address, agent="fresh-b")
        admin = kernos.sdk.connect(address, token=ADMIN)
        assert set(admin.access.groups()["newcomers"]) == {"fresh-a", "fresh-b"}
        a.llm.chat("one two three four five six", model="echo", max_tokens=5)     # 11 of the group's 16
        with pytest.raises(kernos.sdk.ResourceExhausted, match="group 'newcomers'") as err:
            b.llm.chat("seven eight nine ten eleven twelve", model="echo", max_tokens=1)
        assert 50 < err.value.retry_after_s <= 60
        # An operator's agent is not a newcomer; it is not counted against the per-address limit either.
        trusted = kernos.sdk.connect(address, agent="trusted", credential=ADMIN)
        assert trusted.llm.chat("seven eight nine ten eleven twelve", model="echo", max_tokens=1).completion_tokens == 1
        kernos.sdk.connect(address, agent="fresh-c")                         # four agents: the cap
        with pytest.raises(kernos.sdk.ResourceExhausted, match="maximum of 4 agents"):
            kernos.sdk.connect(address, agent="fresh-d")
        with pytest.raises(kernos.sdk.ResourceExhausted, match="per minute") as err:   # six calls from here
            for i in range(10):
                try:
                    kernos.sdk.connect(address, agent=f"fresh-x{i}")
                except kernos.sdk.ResourceExhausted as e:
                    if "per minute" in e.message:
                        raise
        assert 0 < err.value.retry_after_s <= 60
        kernos.sdk.connect(address, agent="fresh-e", credential=ADMIN)        # operators pass both limits
    finally:
        assert stop_kernel(proc) == 0


def test_enroll_policy_needs_an_enrollment_token(tmp_path):
    data = tmp_path / "data"
    made = _cli(data, "create", "--enroll", "--name", "swarm-key", "--uses", "2", "--group", "swarm")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    proc, address = _start(tmp_path, registration={"policy": "enroll"},
                           quotas={"groups": {"swarm": {"tokens_per_minute": 16}}})
    try:
        for credential in (None, "kn_enroll_guess", ADMIN[:-1]):
            with pytest.raises(kernos.sdk.Unauthenticated, match="enrollment token"):
                kernos.sdk.connect(address, agent="bee", credential=credential)
        one = kernos.sdk.connect(address, agent="bee-1", credential=key)
        two = kernos.sdk.connect(address, agent="bee-2", credential=key)
        with pytest.raises(kernos.sdk.Unauthenticated, match="used up"):
            kernos.sdk.connect(address, agent="bee-3", credential=key)
        admin = kernos.sdk.connect(address, token=ADMIN)
        assert set(admin.access.groups()["swarm"]) == {"bee-1", "bee-2"}
        one.llm.chat("one two three four five six", model="echo", max_tokens=5)
        with pytest.raises(kernos.sdk.ResourceExhausted, match="group 'swarm'"):
            two.llm.chat("seven eight nine ten eleven twelve", model="echo", max_tokens=1)
        again = _cli(data, "create", "--enroll", "--name", "once")
        late = again.stdout.strip()
        assert _cli(data, "revoke", "--enroll", "--name", "once").returncode == 0
        with pytest.raises(kernos.sdk.Unauthenticated):
            kernos.sdk.connect(address, agent="bee-4", credential=late)
        kernos.sdk.connect(address, agent="queen", credential=ADMIN)
    finally:
        assert stop_kernel(proc) == 0


def test_closed_policy_only_operators_create_agents(tmp_path):
    proc, address = _start(tmp_path, registration={"policy": "closed"})
    try:
        with pytest.raises(kernos.sdk.PermissionDenied, match="closed"):
            kernos.sdk.connect(address, agent="walk-in")
        with pytest.raises(kernos.sdk.PermissionDenied):
            kernos.sdk.connect(address, agent="walk-in", credential="kn_enroll_anything")
        staff = kernos.sdk.connect(address, agent="staff", credential=ADMIN)
        assert staff.llm.chat("hello there", model="echo").text == "hello there"
        made = _cli(tmp_path / "data", "create", "--agent", "contractor")
        assert kernos.sdk.connect(address, agent="contractor", token=made.stdout.strip()).kernel.heartbeat() > 0
    finally:
        assert stop_kernel(proc) == 0
