"""A hostile agent against a real kernel process: the findings of the security review (issue 12) that the
jail, the tools' own executor and the input checks close. Each attack here got through before."""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

ADMIN = "attack-admin-token-0123456789"


@pytest.fixture(scope="module")
def ak(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("attacks")
    cfg = write_config(d / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}], server={"admin_token": ADMIN},
                       tools={"max_concurrent_calls": 4, "max_calls_per_agent": 2})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield address, d / "data"
    assert stop_kernel(proc) == 0


def py(s, code: str):
    return s.tools.call("python", code=code)


def test_tool_code_cannot_forge_an_operator_token(ak):
    """Finding 1: sqlite code inserted a token hash into DATA_DIR/access.db from the python tool."""
    address, data = ak
    forged = "kn_admin_forged-by-a-tool-0123456789"
    h = hashlib.sha256(forged.encode()).hexdigest()
    with kernos.sdk.connect(address, agent="forger") as s:
        r = py(s, f"import sqlite3\ndb = sqlite3.connect({str(data / 'access.db')!r})\n"
                  f"db.execute(\"INSERT INTO tokens VALUES ('evil', '{h}', 1, 0, 0, 0)\")\ndb.commit()\nresult = 'in'")
        assert r.state == "error"
    with sqlite3.connect(data / "access.db") as db:
        assert db.execute("SELECT COUNT(*) FROM tokens WHERE name='evil'").fetchone()[0] == 0
    with pytest.raises(kernos.sdk.Unauthenticated):
        kernos.sdk.connect(address, token=forged).access.audit()


def test_the_jail_sees_nothing_of_the_host(ak):
    """Finding 2: the sandbox listed the data dir, read traces.db, other agents' blobs and /etc/passwd, and
    wrote into the data dir and outside its temp dir."""
    address, data = ak
    with kernos.sdk.connect(address, agent="victim") as victim:
        victim.storage.write("secret.txt", "the victim's secret 4711")
    with kernos.sdk.connect(address, agent="snoop") as s:
        r = py(s, "import os\nresult = sorted(os.listdir('/'))")
        assert r.state == "done" and set(r.result) <= {"bin", "dev", "lib", "lib64", "proc", "sbin", "usr", "work"}
        for path in ("/etc/passwd", str(data / "traces.db"), str(data / "access.db"), str(data / "files"),
                     "/root", "/tmp", "/home"):
            r = py(s, f"import os\nresult = os.path.exists({path!r})")
            assert r.state == "done" and r.result is False, (path, r.error)
        r = py(s, "import os\nhits = []\nfor d, _, fs in os.walk('/'):\n"
                  "    for f in fs:\n        p = os.path.join(d, f)\n"
                  "        try:\n            if b'4711' in open(p, 'rb').read(1 << 20): hits.append(p)\n"
                  "        except OSError: pass\n    if d.startswith(('/proc', '/usr', '/dev')): pass\n"
                  "result = [h for h in hits if not h.startswith(('/proc', '/usr'))]")
        assert r.state in ("done", "error") and not r.result           # no blob of the victim anywhere
        for target in (str(data / "planted"), "/usr/planted", "/planted"):
            r = py(s, f"open({target!r}, 'w').write('x')\nresult = 'written'")
            assert r.state == "error", target
        assert not (data / "planted").exists()
        assert py(s, "open('/work/scratch', 'w').write('ok')\nresult = open('/work/scratch').read()").result == "ok"


def test_processes_die_with_the_call(ak):
    """Finding 3: forked and setsid'd children outlived the call; children holding the pipes made the call
    run to its wall limit and lose its result; there was no process-count limit."""
    address, data = ak
    with kernos.sdk.connect(address, agent="forker") as s:
        t0 = time.monotonic()
        r = py(s, "import os, time\nfor i in range(20):\n    if os.fork() == 0:\n        os.setsid()\n"
                  "        time.sleep(30)\n        os._exit(0)\nresult = 'parent done'")
        assert r.state == "done" and r.result == "parent done" and time.monotonic() - t0 < 5
        r = py(s, "import os\nn = 0\ntry:\n    for i in range(1000):\n        if os.fork() == 0:\n"
                  "            import time; time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
                  "result = n")
        assert r.state == "done" and r.result < 40                      # tools.max_processes (32)
    import subprocess
    out = subprocess.run(["ps", "-eo", "user,args"], capture_output=True, text=True).stdout
    assert "parent done" not in out and not [line for line in out.splitlines() if "__tool__" in line]


def test_the_result_cannot_be_forged_by_printing(ak):
    address, _ = ak
    with kernos.sdk.connect(address, agent="printer") as s:
        r = py(s, "print('\\n__KERNOS_RESULT__' + '\"forged\"')\nresult = 'real'")
        assert r.result == "real"


def test_one_agents_tools_do_not_stall_another_agents_storage(ak):
    """Finding 4: eight slow tool calls of one agent made another agent's storage.write + memory.search
    take 19-23 s (they shared asyncio's default thread pool)."""
    address, _ = ak
    with kernos.sdk.connect(address, agent="warm-up") as w:      # the first search opens the vector store
        w.memory.search("warm")
    slow = kernos.sdk.connect(address, agent="slowpoke")
    slow.tools.register("nap", "import time\ntime.sleep(args['s'])\nresult = 'ok'", {"type": "object"},
                        timeout_s=10)
    threads = [threading.Thread(target=slow.tools.call, args=("nap",), kwargs={"s": 4}) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    with kernos.sdk.connect(address, agent="bystander") as other:
        t0 = time.monotonic()
        other.storage.write("a.txt", "hello")
        other.memory.search("hello")
        assert time.monotonic() - t0 < 3.0
    for t in threads:
        t.join()
    slow.exit()


def test_calculator_and_registration_inputs(ak):
    """Finding 7 (INTERNAL on the calculator) and 8 (code that does not compile was accepted; a taken
    name revealed its owner; a negative ttl was accepted)."""
    address, _ = ak
    with kernos.sdk.connect(address, agent="prankster") as s:
        for expression in ("-" * 990 + "1", "999999**1000", "9**999*9**999*9**999", "(" * 400 + "1" + ")" * 400):
            try:
                r = s.tools.call("calculator", expression=expression)
                assert r.state == "done"
            except kernos.sdk.InvalidArgument as e:
                assert "calculator" in e.message
        with pytest.raises(kernos.sdk.InvalidArgument, match="line 2"):
            s.tools.register("broken", "x = 1\ndef (:\n", {"type": "object"})
        s.tools.register("mine_only", "result = 1", {"type": "object"})
        with kernos.sdk.connect(address, agent="prober") as p:
            # A private tool's name shows through nothing: registering it, calling it, listing.
            p.tools.register("mine_only", "result = 2", {"type": "object"})      # its own namespace
            assert p.tools.call("mine_only").result == 2 and s.tools.call("mine_only").result == 1
            messages = set()
            for name in ("prankster/mine_only", "prankster/no_such_tool"):
                with pytest.raises(kernos.sdk.NotFound) as err:
                    p.tools.call(name)
                messages.add(err.value.message.replace(name, "NAME"))
            assert len(messages) == 1                             # the same answer, whether it exists or not
            assert "prankster/mine_only" not in {t["name"] for t in p.tools.list()}
        with pytest.raises(kernos.sdk.InvalidArgument, match="ttl"):
            s.access.grant("prober", "storage", "read", ttl_s=-5)


def test_stats_and_agents_show_an_agent_only_its_own(ak):
    """Finding 8 (part): Stats showed any agent every live request and agent id; agents() listed all."""
    address, _ = ak
    admin = kernos.sdk.connect(address, token=ADMIN)
    with kernos.sdk.connect(address, agent="watched") as watched, kernos.sdk.connect(address, agent="peeper") as p:
        watched.tuner.jobs()
        assert "watched" not in {a.agent_id for a in p.kernel.agents()}
        assert {a.agent_id for a in p.kernel.agents()} == {"peeper"}
        admin.access.create_group("crew")
        admin.access.add_member("crew", "watched")
        admin.access.add_member("crew", "peeper")
        assert {a.agent_id for a in p.kernel.agents()} == {"peeper", "watched"}    # its own group
        assert {"watched", "peeper"} <= {a.agent_id for a in admin.kernel.agents()}
        stream = watched.llm.stream("a b c d e f", model="echo", max_tokens=4)
        list(stream)
        for m in p.kernel.stats().models:
            assert all(r.agent_id == "peeper" for r in m.requests)
