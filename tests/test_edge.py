"""One syscall vocabulary for every transport (issue 31): every RPC of every `kernos.v1` service and every HTTP
route is a syscall of `kernos.abi.syscalls` and passes the one edge; a call of the same syscall over gRPC, the
OpenAI routes, MCP and AIOS leaves the same trace kind and the same audit decision."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests

import kernos.sdk
from kernos.abi.syscalls import SYSCALLS
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.storage.traces import TraceLog

ADMIN = "edge-admin-token-0123456789"


def test_the_grpc_table_is_the_proto_files():
    import importlib
    import pkgutil

    import kernos.proto.v1 as v1
    from kernos.kernel.api.grpc.methods import METHODS, PACKAGE

    declared = {}
    for mod in pkgutil.iter_modules(v1.__path__):
        if mod.name.endswith("_pb2"):
            for svc in importlib.import_module(f"kernos.proto.v1.{mod.name}").DESCRIPTOR.services_by_name.values():
                assert svc.full_name == f"{PACKAGE}.{svc.name}"
                declared[svc.name] = {m.name for m in svc.methods}
    assert declared == {svc: set(rpcs) for svc, rpcs in METHODS.items()}
    for rpcs in METHODS.values():
        assert set(rpcs.values()) <= set(SYSCALLS), set(rpcs.values()) - set(SYSCALLS)


def test_every_syscall_is_reachable_and_every_route_is_a_syscall(tmp_path):
    """The HTTP tables against the routes an app really mounts (built in this process from a real kernel on
    the echo model, every surface on): each mounted route is in exactly one surface's table, each table's
    syscalls are in the vocabulary, and each syscall has a transport."""
    from conftest import write_config

    from kernos.kernel.api.edge import Edge
    from kernos.kernel.api.grpc.methods import METHODS
    from kernos.kernel.api.http.aios.routes import QUERIES
    from kernos.kernel.api.http.aios.routes import ROUTES as AIOS
    from kernos.kernel.api.http.app import build
    from kernos.kernel.api.http.console.routes import ROUTES as CONSOLE
    from kernos.kernel.api.http.mcp.server import METHODS as MCP_METHODS
    from kernos.kernel.api.http.mcp.server import ROUTES as MCP
    from kernos.kernel.api.http.openai.routes import ROUTES as OPENAI
    from kernos.kernel.app import Kernel
    from kernos.kernel.config import load_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"aios_compat": True})
    kernel = Kernel(load_config(str(cfg), data_dir=str(tmp_path / "data")))
    try:
        app = build(kernel, Edge(kernel.gate, kernel.traces, kernel.lifecycle))
        mounted = {(m, r.path) for r in app.routes for m in (getattr(r, "methods", None) or ())
                   if m != "HEAD"}
    finally:
        kernel.drain(0)
        kernel.close()
    tables = [OPENAI, AIOS, MCP, CONSOLE]
    listed = [key for table in tables for key in table]
    assert len(listed) == len(set(listed)) and set(listed) == mounted, set(listed) ^ mounted
    for table in tables + [QUERIES, MCP_METHODS]:
        for value in table.values():
            names = (value,) if isinstance(value, str) else value
            assert set(names) <= set(SYSCALLS), set(names) - set(SYSCALLS)
    carried = {n for rpcs in METHODS.values() for n in rpcs.values()} | set(OPENAI.values())
    assert carried == set(SYSCALLS), set(SYSCALLS) - carried


@pytest.fixture(scope="module")
def ek(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("edge")
    cfg = write_config(d / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN, "aios_compat": True}, aios={"prefix": "aios_"})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield f"http://{proc.http_address}", address, d / "data"
    assert stop_kernel(proc) == 0


def _records(data, agent: str, want: int, kind: str) -> list:
    log = TraceLog.__new__(TraceLog)
    log.path = data / "traces.db"
    deadline = time.time() + 10
    while True:
        recs = [r for r in log.query(agent_id=agent, limit=1000) if r.kind == kind]
        if len(recs) >= want or time.time() > deadline:
            return recs
        time.sleep(0.1)


def test_every_http_route_passes_the_edge(ek):
    """Without a token every route of the OpenAI table is 401; for an agent without the syscall's capability
    family it is 403, and the audit log names the syscall, as it does for the gRPC twin."""
    base, address, _ = ek
    from kernos.kernel.api.http.openai.routes import ROUTES

    admin = kernos.sdk.connect(address, token=ADMIN)
    mute = kernos.sdk.connect(address, agent="edge-mute")
    admin.access.set_capabilities("edge-mute", [])
    bodies = {"llm.generate": {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"},
              "memory.embed": {"input": "hi"}}
    for (method, path), name in ROUTES.items():
        url = base + path.replace("{model_id:path}", "echo")
        body = bodies.get(name)
        r = requests.request(method, url, json=body, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text)
        r = requests.request(method, url, json=body, timeout=30, headers={"Authorization": f"Bearer {mute.token}"})
        assert r.status_code == 403, (path, r.status_code, r.text)
    with pytest.raises(kernos.sdk.PermissionDenied):
        mute.llm.chat("hi", model="echo")
    denied = {e["method"] for e in admin.access.audit(principal="edge-mute", denied_only=True, limit=1000)}
    families = {n for n in ROUTES.values() if SYSCALLS[n].family not in ("kernel",)}
    assert families <= denied, families - denied
    # the refusals are the agent's trace records too, over HTTP as over gRPC (each generating route + gRPC)
    n = sum(name == "llm.generate" for name in ROUTES.values()) + 1
    refused = _records(ek[2], "edge-mute", n, "llm.generate")
    assert len(refused) == n and {r.status for r in refused} == {"PERMISSION_DENIED"}


def test_one_syscall_leaves_the_same_trace_and_audit_over_every_transport(ek):
    import openai

    base, address, data = ek
    admin = kernos.sdk.connect(address, token=ADMIN)
    twin = kernos.sdk.connect(address, agent="edge-twin")
    # gRPC
    twin.storage.write("grpc.txt", "over gRPC")
    twin.llm.chat("over gRPC", model="echo", max_tokens=4)
    # the OpenAI routes
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=twin.token, max_retries=0)
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "over HTTP"}], max_tokens=4)

    # MCP
    async def mcp_write():
        from mcp.client.session import ClientSession
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with create_mcp_http_client(headers={"Authorization": f"Bearer {twin.token}"}) as http, \
                streamable_http_client(f"{base}/mcp", http_client=http) as (read, write, *_), \
                ClientSession(read, write) as s:
            await s.initialize()
            result = await s.call_tool("kernos_storage_write", {"path": "mcp.txt", "content": "over MCP"})
            assert not result.is_error
    asyncio.run(mcp_write())
    # AIOS: its agent "twin" is the Kernos agent "aios_twin"
    r = requests.post(f"{base}/query", timeout=60, json={
        "agent_name": "twin", "query_type": "storage",
        "query_data": {"query_class": "storage", "operation_type": "write",
                       "params": {"file_path": "aios.txt", "content": "over AIOS"}}})
    assert r.status_code == 200, r.text
    r = requests.post(f"{base}/query", timeout=60, json={
        "agent_name": "twin", "query_type": "llm",
        "query_data": {"query_class": "llm", "messages": [{"role": "user", "content": "over AIOS"}],
                       "action_type": "chat", "max_new_tokens": 4, "llms": [{"name": "echo"}]}})
    assert r.status_code == 200, r.text

    writes = _records(data, "edge-twin", 2, "storage.write")
    assert sorted(w.request.get("via", "grpc") for w in writes) == ["grpc", "mcp"]
    assert all(w.status == "OK" for w in writes)
    gens = _records(data, "edge-twin", 2, "llm.generate")
    assert len(gens) == 2 and all(g.request["messages"][0]["role"] == "user" and g.response["request_id"]
                                  for g in gens)
    assert [w.request.get("via") for w in _records(data, "aios_twin", 1, "storage.write")] == ["aios"]
    assert len(_records(data, "aios_twin", 1, "llm.generate")) == 1

    audit = admin.access.audit(limit=1000)
    decisions = {(e["principal"], e["method"], e["decision"], e["capability"]) for e in audit}
    assert ("edge-twin", "storage.write", "allow", "storage:write on edge-twin/grpc.txt") in decisions
    assert ("edge-twin", "storage.write", "allow", "storage:write on edge-twin/mcp.txt") in decisions
    assert ("aios_twin", "storage.write", "allow", "storage:write on aios_twin/aios.txt") in decisions
    generate = [e for e in audit if e["method"] == "llm.generate" and e["principal"] in ("edge-twin", "aios_twin")]
    assert len(generate) == 3 and {(e["decision"], e["capability"]) for e in generate} == {("allow", "llm:execute")}
    assert not any(e["method"].startswith("/") for e in audit)          # no transport's method names
    json.dumps(audit)
