"""Kernos as an MCP server (issue 17, MCP server part), tested with the `mcp` client library against a real
kernel: over streamable HTTP (`/mcp`, an agent's bearer token) and through `kernos mcp --stdio` (a local MCP
client launches it). An agent sees and calls the tools it may execute, its memory and its files (as tools and
as resources), never another agent's; irreversible tools still wait for an operator; calls are traced."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.storage.traces import TraceLog

ADMIN = "mcp-admin-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent
# langchain-mcp-adapters (its newest release, 0.3.2) pins mcp<2 and imports names mcp 2 removed, while the kernel
# serves with mcp 2.3: the adapters run as a client in an environment of their own, built once and cached.
LC_MCP_VENV = ROOT / ".cache" / "langchain-mcp-adapters"
LC_MCP_PINS = ["langchain-mcp-adapters==0.3.2", "mcp==1.30.0"]
LC_MCP_CLIENT = """
import asyncio, json, sys
from langchain_mcp_adapters.client import MultiServerMCPClient


async def main(url, token):
    client = MultiServerMCPClient({"kernos": {"transport": "streamable_http", "url": url,
                                              "headers": {"Authorization": f"Bearer {token}"}}})
    tools = {t.name: t for t in await client.get_tools()}
    calc = await tools["calculator"].ainvoke({"expression": "6*7"})
    await tools["kernos_storage_write"].ainvoke({"path": "lc.txt", "content": "from langchain"})
    read = await tools["kernos_storage_read"].ainvoke({"path": "lc.txt"})
    print(json.dumps({"names": sorted(tools), "calc": str(calc), "read": str(read)}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture(scope="module")
def mk(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("mcp")
    cfg = write_config(d / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}], server={"admin_token": ADMIN})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield f"http://{proc.http_address}", address, d / "data"
    assert stop_kernel(proc) == 0


async def _session(base: str, token: str, work):
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        async with streamable_http_client(f"{base}/mcp", http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as s:
                await s.initialize()
                return await work(s)


def run(base, token, work):
    return asyncio.run(_session(base, token, work))


def text(result) -> str:
    return "".join(c.text for c in result.content)


def test_an_agent_sees_and_calls_its_tools_memory_and_files(mk):
    base, address, data = mk
    with kernos.sdk.connect(address, agent="mcp-alice") as alice, kernos.sdk.connect(address, agent="mcp-bob") as bob:
        alice.tools.register("shout", "result = args['word'].upper()",
                             {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]})
        bob.tools.register("bobs_secret", "result = 'secret'", {"type": "object", "properties": {}})
        bob.storage.write("diary.txt", b"bob's private diary")

        async def work(s):
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert {"calculator", "memory_search", "shout", "kernos_memory_add", "kernos_storage_write",
                    "kernos_storage_read", "kernos_storage_list", "kernos_storage_history"} <= set(tools)
            assert "bobs_secret" not in tools and not any("bobs_secret" in n for n in tools)
            assert tools["shout"].input_schema["required"] == ["word"]
            assert text(await s.call_tool("calculator", {"expression": "6*7"})) == "42"
            assert text(await s.call_tool("shout", {"word": "kernel"})) == "KERNEL"
            w = json.loads(text(await s.call_tool("kernos_storage_write", {"path": "notes/a.txt", "content": "v1"})))
            assert w["version"] == 1
            await s.call_tool("kernos_storage_write", {"path": "notes/a.txt", "content": "v2"})
            assert text(await s.call_tool("kernos_storage_read", {"path": "notes/a.txt", "version": 1})) == "v1"
            history = json.loads(text(await s.call_tool("kernos_storage_history", {"path": "notes/a.txt"})))
            assert [h["version"] for h in history] == [1, 2]
            resources = (await s.list_resources()).resources
            assert [r.name for r in resources] == ["notes/a.txt"]
            contents = (await s.read_resource(resources[0].uri)).contents
            assert contents[0].text == "v2"
            await s.call_tool("kernos_memory_add", {"text": "The launch is on Tuesday.", "metadata": {"t": "x"}})
            hits = json.loads(text(await s.call_tool("memory_search", {"query": "when is the launch"})))
            assert "Tuesday" in json.dumps(hits)
            # Another agent's things answer as missing ones do.
            denied = await s.call_tool("bobs_secret", {})
            assert denied.is_error and "NOT_FOUND" in text(denied)
            assert (await s.call_tool("kernos_storage_read", {"path": "diary.txt"})).is_error
            bad = await s.call_tool("calculator", {"nope": 1})
            assert bad.is_error and "INVALID_ARGUMENT" in text(bad)
        run(base, alice.token, work)
        assert bob.storage.list() and [f.path for f in alice.storage.list()] == ["notes/a.txt"]
    traces = TraceLog(data / "traces.db")
    try:
        # MCP calls are traced as the syscalls they are, as over gRPC, noting the transport
        recs = traces.query("mcp-alice", limit=200)
        assert any(t.kind == "tools.call" and t.request.get("via") == "mcp" for t in recs)
        assert any(t.kind == "storage.write" and t.request.get("via") == "mcp" for t in recs)
    finally:
        traces.close()


def test_a_token_is_required_and_revocation_applies(mk):
    base, address, data = mk
    r = httpx.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with kernos.sdk.connect(address, agent="mcp-gone") as s:
        token = s.token
    run(base, token, lambda c: c.list_tools())                  # works while the token is valid
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "revoke", "--agent", "mcp-gone",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = httpx.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                   headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 401


def test_irreversible_tools_wait_for_an_operator(mk):
    base, address, _ = mk
    admin = kernos.sdk.connect(address, token=ADMIN)
    admin.tools.register("launch_rocket", "result = {'launched': args['name']}",
                         {"type": "object", "properties": {"name": {"type": "string"}}}, irreversible=True)
    with kernos.sdk.connect(address, agent="mcp-pilot") as s:
        async def work(c):
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert tools["launch_rocket"].annotations.destructive_hint is True
            call = asyncio.create_task(c.call_tool("launch_rocket", {"name": "K1"}))
            for _ in range(100):
                pending = await asyncio.to_thread(admin.tools.pending)
                if pending:
                    break
                await asyncio.sleep(0.1)
            assert [p.agent_id for p in pending] == ["mcp-pilot"]
            await asyncio.to_thread(admin.tools.confirm, pending[0].call_id)
            return await call
        result = run(base, s.token, work)
        assert not result.is_error and json.loads(text(result)) == {"launched": "K1"}


def test_kernos_mcp_stdio_relays_a_local_client(mk):
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    base, address, _ = mk
    with kernos.sdk.connect(address, agent="mcp-desktop") as s:
        s.storage.write("todo.txt", b"buy milk")
        params = StdioServerParameters(command=sys.executable, args=["-m", "kernos.kernel.cli", "mcp", "--stdio",
                                                                     "--url", base],
                                       env={**os.environ, "KERNOS_TOKEN": s.token})

        async def work():
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as c:
                    await c.initialize()
                    names = {t.name for t in (await c.list_tools()).tools}
                    calc = text(await c.call_tool("calculator", {"expression": "2+3"}))
                    resources = (await c.list_resources()).resources
                    todo = (await c.read_resource(resources[0].uri)).contents[0].text
                    return names, calc, todo
        names, calc, todo = asyncio.run(asyncio.wait_for(work(), 60))
        assert "kernos_storage_read" in names and calc == "5" and todo == "buy milk"
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "mcp", "--stdio", "--url", base],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "KERNOS_TOKEN"})
    assert out.returncode == 2 and "token is needed" in out.stderr


# -- Kernos as an MCP client: an external server's tools mounted into the kernel ([[tools.mcp]]) ---------------
TEST_SERVER = '''
import os, time
from mcp.server.mcpserver import MCPServer

app = MCPServer("testsrv")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def transfer(amount: int) -> str:
    """Send money (irreversible)."""
    return f"sent {amount}"


@app.tool()
def slow(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "done"


@app.tool()
def crash() -> str:
    """Kill this server."""
    os._exit(3)


app.run()
'''


def test_an_external_mcp_server_is_mounted_supervised_and_called_by_agents(tmp_path):
    import time

    from conftest import write_config

    script = tmp_path / "testsrv.py"
    script.write_text(TEST_SERVER)
    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN},
                       tools={"mcp": [{"name": "testsrv", "command": [sys.executable, str(script)], "timeout_s": 3.0,
                                       "irreversible": ["transfer"]}]})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        admin = kernos.sdk.connect(address, token=ADMIN)
        with kernos.sdk.connect(address, agent="mcp-user") as s:
            deadline = time.monotonic() + 30
            while "testsrv__add" not in {t["name"] for t in s.tools.list()}:
                assert time.monotonic() < deadline, "the MCP server's tools were not mounted"
                time.sleep(0.2)
            add = next(t for t in s.tools.list() if t["name"] == "testsrv__add")
            assert add["schema"]["required"] == ["a", "b"] and "Add two integers" in add["description"]
            assert s.tools.call("testsrv__add", a=2, b=3).result == 5
            with pytest.raises(kernos.sdk.InvalidArgument):
                s.tools.call("testsrv__add", a="two", b=3)              # the server's schema, checked by the kernel
            t0 = time.monotonic()
            slow = s.tools.call("testsrv__slow", seconds=30)
            assert slow.state == "error" and time.monotonic() - t0 < 10, slow   # timeout_s, not 30 s
            pending = s.tools.call("testsrv__transfer", amount=7)
            assert pending.state == "pending"
            admin.tools.confirm(pending.call_id)
            assert s.tools.wait(pending.call_id).result == "sent 7"
            # The server dies: calls fail at once (never hang), and the kernel restarts it.
            t0 = time.monotonic()
            with pytest.raises((kernos.sdk.Unavailable, kernos.sdk.KernosError)):
                s.tools.call("testsrv__crash")
            assert time.monotonic() - t0 < 10
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert s.tools.call("testsrv__add", a=1, b=1).result == 2
                    break
                except kernos.sdk.Unavailable:
                    assert time.monotonic() < deadline, "the MCP server was not restarted"
                    time.sleep(0.2)
    finally:
        assert stop_kernel(proc) == 0


@pytest.fixture(scope="session")
def lc_mcp_python():
    """The interpreter of a venv with langchain-mcp-adapters (built on first use; skipped where it cannot be)."""
    python = LC_MCP_VENV / "bin" / "python"
    stamp = LC_MCP_VENV / ".pins"
    if not (python.exists() and stamp.exists() and stamp.read_text() == " ".join(LC_MCP_PINS)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LC_MCP_VENV)], check=True, timeout=120)
        out = subprocess.run([str(python), "-m", "pip", "install", "-q", *LC_MCP_PINS], capture_output=True,
                             text=True, timeout=600)
        if out.returncode != 0:
            pytest.skip(f"cannot install {LC_MCP_PINS} (no package index?): {out.stderr[-300:]}")
        stamp.write_text(" ".join(LC_MCP_PINS))
    return python


def test_langchain_mcp_adapters_use_the_kernels_tools(mk, lc_mcp_python, tmp_path):
    base, address, _ = mk
    script = tmp_path / "client.py"
    script.write_text(LC_MCP_CLIENT)
    with kernos.sdk.connect(address, agent="mcp-langchain") as s:
        out = subprocess.run([str(lc_mcp_python), str(script), f"{base}/mcp", s.token], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert {"calculator", "memory_search", "kernos_storage_read"} <= set(got["names"])
        assert "42" in got["calc"] and "from langchain" in got["read"]
        assert s.storage.read("lc.txt") == b"from langchain"       # the write went to this agent's files
