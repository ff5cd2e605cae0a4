"""AIOS agents unchanged (issue 17, AIOS part): the JSON that Cerebrum's clients send (`send_request` posts
`{"query_type", "agent_name", "query_data": query.model_dump()}` to `/query` with `requests`) replayed against a
real kernel with `server.aios_compat`, for every query type, checking the replies' AIOS shape and their effect
in Kernos: each AIOS name is its own Kernos agent (isolated memory and files, its group's quota, traces, an
operator can shut it out), bad bodies get a 400 naming the field, and the optional shared token and the
loopback-only default hold."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import requests

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.storage.traces import TraceLog

ADMIN = "aios-admin-token-0123456789"
MODEL = "smollm2-135m-instruct"


def llm_query(messages, action_type="chat", tools=None, llms=None, response_format=None, max_new_tokens=48,
              message_return_type="text"):
    """What Cerebrum's LLMQuery(...).model_dump() sends."""
    return {"query_class": "llm", "llms": llms, "messages": messages, "tools": tools, "action_type": action_type,
            "temperature": 0.0, "max_new_tokens": max_new_tokens, "message_return_type": message_return_type,
            "response_format": response_format}


def memory_query(op, **params):
    return {"query_class": "memory", "operation_type": op, "params": params}


def storage_query(op, **params):
    return {"query_class": "storage", "operation_type": op, "params": params}


def send(base, agent, query_type, query_data, **kw):
    """Cerebrum's send_request: the body it posts; the caller raises for status like Cerebrum's `post`."""
    return requests.post(f"{base}/query", json={"query_type": query_type, "agent_name": agent,
                                                "query_data": query_data}, timeout=120, **kw)


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"response", "start_times", "end_times", "waiting_times", "turnaround_times"}
    assert body["turnaround_times"][0] >= body["waiting_times"][0] >= 0
    return body["response"]


@pytest.fixture(scope="module")
def ak(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("aios")
    # The embedded model: forced tool calls and JSON need a model that closes what it opens (a random tiny one
    # may run whitespace or a string to max_new_tokens).
    cfg = write_config(d / "k.toml", [{"name": MODEL, "path": "embedded"},
                                      {"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN, "aios_compat": True},
                       aios={"prefix": "aios_", "capabilities": ["llm", "memory", "storage", "tools"]},
                       quotas={"agents": {"aios_limited": {"requests_per_second": 1}}})
    proc, address = start_kernel(d / "data", str(cfg), timeout=300)
    yield f"http://{proc.http_address}", address, d / "data"
    assert stop_kernel(proc) == 0


def test_status_and_the_models_list(ak):
    base, *_ = ak
    assert requests.get(f"{base}/status", timeout=10).json()["status"] == "ok"
    llms = requests.get(f"{base}/core/llms/list", timeout=10).json()
    assert llms["status"] == "success" and {m["name"] for m in llms["llms"]} == {MODEL, "echo"}


def test_llm_chat_json_and_tool_call_outputs(ak):
    base, *_ = ak
    r = ok(send(base, "writer", "llm", llm_query([{"role": "user", "content": "Say hello."}])))
    assert r["response_class"] == "llm" and r["finished"] and r["status_code"] == 200 and r["error"] is None
    assert isinstance(r["response_message"], str) and r["response_message"]
    # A model AIOS agents name by default, which this kernel does not serve: the default model answers.
    r = ok(send(base, "writer", "llm", llm_query([{"role": "user", "content": "hi"}],
                                                 llms=[{"name": "gpt-4o-mini", "backend": "openai"}])))
    assert r["finished"]
    r = ok(send(base, "writer", "llm", llm_query([{"role": "user", "content": "one two three"}],
                                                 llms=[{"name": "echo", "provider": "kernos"}], max_new_tokens=2)))
    assert r["response_message"] == "two three"                 # the named model answered (echo: last words)
    # (enums: a random tiny model would run a free string to max_new_tokens)
    schema = {"type": "object", "properties": {"keywords": {"type": "array", "maxItems": 3,
                                                            "items": {"enum": ["launch", "rocket", "plan"]}},
                                               "context": {"enum": ["space", "food"]}},
              "required": ["keywords", "context"], "additionalProperties": False}
    r = ok(send(base, "writer", "llm", llm_query(
        [{"role": "user", "content": "Extract keywords."}], "chat_with_json_output", max_new_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "kw", "schema": schema, "strict": True}},
        message_return_type="json")))
    data = json.loads(r["response_message"])
    assert set(data) == {"keywords", "context"} and isinstance(data["keywords"], list)
    tools = [{"name": "demo_author/arxiv", "description": "Query articles in arxiv",
              "parameters": {"type": "object", "properties": {"query": {"type": "string", "enum": ["AIOS", "Kernos"]}},
                             "required": ["query"]}}]
    r = ok(send(base, "writer", "llm", llm_query([{"role": "user", "content": "search AIOS"}],
                                                 "chat_with_tool_call_output", tools=tools, max_new_tokens=300)))
    assert r["tool_calls"] and r["tool_calls"][0]["name"] == "demo_author/arxiv"
    assert r["tool_calls"][0]["parameters"]["query"] in ("AIOS", "Kernos")


def test_call_tool_and_tool_queries_run_kernos_tools(ak):
    base, *_ = ak
    tools = [{"type": "function", "function": {
        "name": "calculator", "description": "Evaluate arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "enum": ["6*7"]}},
                       "required": ["expression"], "additionalProperties": False}}}]
    r = ok(send(base, "mathy", "llm", llm_query([{"role": "user", "content": "What is six times seven?"}],
                                                "call_tool", tools=tools, max_new_tokens=48)))
    assert r["response_class"] == "tool" and r["finished"] and r["response_message"] == "42", r
    r = ok(send(base, "mathy", "tool", {"query_class": "tool",
                                        "tool_calls": [{"name": "calculator", "parameters": {"expression": "2+3"}}]}))
    assert r["response_message"] == "5" and r["finished"]
    r = ok(send(base, "mathy", "tool", {"query_class": "tool", "operation_type": "calculator",
                                        "params": {"expression": "10-4"}}))        # older servers' shape
    assert r["response_message"] == "6"
    r = ok(send(base, "mathy", "tool", {"query_class": "tool", "tool_calls": [
        {"name": "no_such_tool", "parameters": {}}]}))
    assert not r["finished"] and "no_such_tool" in r["error"]


def test_memory_queries(ak):
    base, *_ = ak
    r = ok(send(base, "rememberer", "memory", memory_query("add_memory", content="The launch is on Tuesday.",
                                                           metadata={"topic": "launch", "priority": 2})))
    assert r["response_class"] == "memory" and r["success"] and r["memory_id"]
    mid = r["memory_id"]
    assert ok(send(base, "rememberer", "memory", memory_query("get_memory", memory_id=mid)))["content"] == \
        "The launch is on Tuesday."
    r = ok(send(base, "rememberer", "memory", memory_query("update_memory", memory_id=mid,
                                                           content="The launch moved to Friday.")))
    assert r["success"] and r["content"] == "The launch moved to Friday."
    ok(send(base, "rememberer", "memory", memory_query("add_memory", content="Lunch is pizza.")))
    hits = ok(send(base, "rememberer", "memory", memory_query("retrieve_memory", content="when is the launch",
                                                              k=2)))["search_results"]
    assert hits[0]["memory_id"] == mid and hits[0]["metadata"]["topic"] == "launch" and hits[0]["score"] > 0
    raw = ok(send(base, "rememberer", "memory", memory_query("retrieve_memory_raw", content="pizza", k=1)))
    assert raw["search_results"][0]["content"] == "Lunch is pizza."
    r = ok(send(base, "rememberer", "memory", memory_query("add_agentic_memory",
                                                           content="Kernos schedules agents on one GPU.")))
    assert r["success"] and {"keywords", "context", "tags"} <= set(r["metadata"])
    assert ok(send(base, "rememberer", "memory", memory_query("remove_memory", memory_id=mid)))["success"]
    r = ok(send(base, "rememberer", "memory", memory_query("get_memory", memory_id=mid)))
    assert not r["success"] and "no memory" in r["error"]
    # Another AIOS name has its own memory.
    assert ok(send(base, "stranger", "memory", memory_query("retrieve_memory", content="pizza",
                                                            k=1)))["search_results"] == []


def test_storage_queries_and_operate_file(ak):
    base, address, _ = ak
    assert "mounted" in ok(send(base, "filer", "storage", storage_query("mount", root_dir="root")))["response_message"]
    ok(send(base, "filer", "storage", storage_query("create_dir", dir_path="notes")))
    ok(send(base, "filer", "storage", storage_query("create_file", file_path="notes/a.txt")))
    ok(send(base, "filer", "storage", storage_query("write", file_path="notes/a.txt", content="first draft")))
    r = ok(send(base, "filer", "storage", storage_query("write", file_path="notes/a.txt",
                                                        content="the rocket launch plan")))
    assert "version 3" in r["response_message"] and r["finished"]
    hits = json.loads(ok(send(base, "filer", "storage", storage_query("retrieve", query_text="rocket launch",
                                                                      n=1)))["response_message"])
    assert hits[0]["file_path"] == "notes/a.txt"
    assert "back to version 2" in ok(send(base, "filer", "storage", storage_query(
        "rollback", file_path="notes/a.txt", n=1)))["response_message"]
    assert "shared" in ok(send(base, "filer", "storage", storage_query("share", file_path="notes/a.txt")))[
        "response_message"]
    with kernos.sdk.connect(address, token=ADMIN) as admin:
        assert admin.storage.read("notes/a.txt", owner="aios_filer") == b"first draft"      # the rollback, in Kernos
        assert any(g.grantee == "group:aios" and g.resource == "notes/a.txt" for g in admin.access.grants())
    assert json.loads(ok(send(base, "stranger", "storage", storage_query(
        "retrieve", query_text="rocket launch", n=1)))["response_message"]) == []        # another name's files
    # operate_file: the model turns the request into file operations, the kernel runs them. (A short request:
    # the 135M model may run a free-text argument such as a file's content past its closing quote.)
    r = ok(send(base, "filer", "llm", llm_query([{"role": "user", "content": "Create a directory called notes."}],
                                                "operate_file", max_new_tokens=120)))
    assert r["response_class"] == "llm" and r["tool_calls"] and r["finished"], r
    assert r["tool_calls"][0]["name"] in {"write", "create_file", "create_dir", "rollback", "share", "retrieve"}
    assert "notes" in r["response_message"]


def test_each_name_is_its_own_kernos_agent_and_an_operator_can_shut_one_out(ak):
    base, address, data = ak
    ok(send(base, "example/academic_agent", "memory", memory_query("add_memory", content="x")))
    with kernos.sdk.connect(address, token=ADMIN) as admin:
        agents = {a.agent_id: a for a in admin.kernel.agents(include_exited=True)}
        bridged = [a for a in agents.values() if a.labels.get("name") == "example/academic_agent"]
        assert len(bridged) == 1 and bridged[0].agent_id.startswith("aios_example-academic_agent-")
        assert bridged[0].labels["bridge"] == "aios"
        assert "aios_filer" in admin.access.groups()["aios"]
        assert list(admin.access.capabilities("aios_filer")) == ["llm", "memory", "storage", "tools"]
    # AIOS names cannot be registered over gRPC (issue 30: that locked the AIOS name out); an agent an operator
    # created with such a name is never taken over.
    with pytest.raises(kernos.sdk.InvalidArgument, match="bridged"):
        kernos.sdk.connect(address, agent="aios_squatter")
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "create", "--agent", "aios_squatter",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = send(base, "squatter", "memory", memory_query("add_memory", content="x"))
    assert r.status_code == 409 and "belongs to someone else" in r.json()["detail"]
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "revoke", "--agent", "aios_rememberer",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = send(base, "rememberer", "memory", memory_query("retrieve_memory", content="x", k=1))
    assert r.status_code == 403 and r.json()["response"]["success"] is False
    # Traces: AIOS calls are accounted to their Kernos agent like any syscall.
    traces = TraceLog(data / "traces.db")
    try:
        kinds = {t.kind for t in traces.query("aios_writer", limit=100)}
    finally:
        traces.close()
    assert "llm.generate" in kinds


def test_bad_bodies_get_a_4xx_naming_the_field_and_quotas_apply(ak):
    base, *_ = ak
    cases = [({"query_type": "llm", "query_data": {}}, "agent_name"),
             ({"agent_name": "a", "query_type": "dance", "query_data": {}}, "query_type"),
             ({"agent_name": "a", "query_type": "llm", "query_data": {"messages": []}}, "query_data.messages"),
             ({"agent_name": "a", "query_type": "llm", "query_data": {"messages": [{"role": "user", "content": "x"}],
                                                                      "action_type": "fly"}}, "action_type"),
             ({"agent_name": "a", "query_type": "memory", "query_data": {"operation_type": "forget"}},
              "query_data.operation_type"),
             ({"agent_name": "a", "query_type": "memory", "query_data": {"operation_type": "add_memory",
                                                                         "params": {}}}, "params.content"),
             ({"agent_name": "a", "query_type": "storage", "query_data": {"operation_type": "rollback",
                                                                          "params": {"file_path": "x", "n": "z"}}},
              "params.n"),
             ({"agent_name": "a", "query_type": "llm", "query_data": {
                 "messages": [{"role": "user", "content": "x"}], "action_type": "call_tool"}}, "query_data.tools"),
             ({"agent_name": "a", "query_type": "tool", "query_data": {"tool_calls": [{"parameters": {}}]}},
              "tool_calls[0]")]
    for body, field in cases:
        r = requests.post(f"{base}/query", json=body, timeout=30)
        assert r.status_code == 400 and field in r.json()["detail"], (body, r.status_code, r.text)
    r = requests.post(f"{base}/query", data=b"{not json", timeout=30)
    assert r.status_code == 400
    assert requests.get(f"{base}/status", timeout=10).status_code == 200        # the kernel is fine
    replies = [send(base, "limited", "memory", memory_query("retrieve_memory", content="x", k=1)) for _ in range(4)]
    limited = [r for r in replies if r.status_code == 429]      # its quota: one request a second
    assert limited and int(limited[0].headers["Retry-After"]) >= 1 and "requests per second" in \
        limited[0].json()["detail"]


def _lan_address() -> str | None:
    """An address of this machine other than loopback (for the loopback-only check), if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))              # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_shared_token_and_loopback_only(tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"aios_compat": True}, aios={"token": "shared-aios-secret-0123456789"})
    proc, _ = start_kernel(tmp_path / "data", str(cfg), timeout=120, http="0.0.0.0:0")
    try:
        port = proc.http_address.rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"
        body = llm_query([{"role": "user", "content": "a b"}], max_new_tokens=1)
        assert send(base, "x", "llm", body).status_code == 401
        assert send(base, "x", "llm", body, headers={"Authorization": "Bearer wrong-wrong-wrong-wrong"}).status_code \
            == 401
        r = send(base, "x", "llm", body, headers={"Authorization": "Bearer shared-aios-secret-0123456789"})
        assert ok(r)["response_message"] == "b"
        lan = _lan_address()
        if lan:
            r = send(f"http://{lan}:{port}", "x", "llm", body,
                     headers={"Authorization": "Bearer shared-aios-secret-0123456789"})
            assert r.status_code == 403 and "loopback" in r.json()["detail"]
    finally:
        assert stop_kernel(proc) == 0


def test_an_aios_style_agent_runs_end_to_end(ak):
    """The example agent in agents/ (written the way Cerebrum agents are) against the kernel, twice: it remembers
    its earlier task, the model runs the kernel's calculator, and the report lands in its own files."""
    base, address, _ = ak
    out = subprocess.run([sys.executable, "-m", "kernos.agents.aios_agent", "--url", base, "What is 17 * 23?"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first = json.loads(out.stdout)
    assert isinstance(first["answer"], (int, float)) and first["tool_error"] is None     # the calculator ran
    assert first["explanation"] and "wrote 'reports/latest.md'" in first["report"] and first["earlier_tasks"] == []
    out = subprocess.run([sys.executable, "-m", "kernos.agents.aios_agent", "--url", base, "What is 6 * 7?"],
                         capture_output=True, text=True, timeout=300)
    second = json.loads(out.stdout)
    assert "What is 17 * 23?" in second["earlier_tasks"]
    with kernos.sdk.connect(address, token=ADMIN) as admin:
        report = admin.storage.read("reports/latest.md", owner=admin_name(admin, "example/math_reporter")).decode()
    assert report.startswith("# What is 6 * 7?")


def admin_name(admin, aios_name: str) -> str:
    [a] = [a for a in admin.kernel.agents(include_exited=True) if a.labels.get("name") == aios_name]
    return a.agent_id


def test_kernels_sharing_a_database_act_for_the_same_names_with_the_same_tokens(tmp_path):
    """Two bridges on one store (two kernels of a cluster): a name the first created is the same agent on the
    second, whose calls leave the first's token working; a name both meet at once is created once; an older
    kernel's token file is taken in, not lost."""
    import threading

    from kernos.kernel.security.access import AccessControl
    from kernos.kernel.security.bridge import BridgedAgents
    from kernos.kernel.security.principals import AgentRegistry

    registry = AgentRegistry(tmp_path / "kernel.db", ttl_s=3600)
    access = AccessControl(tmp_path / "access.db", "", None, None)

    def bridge(**kw):
        return BridgedAgents(registry, access, tmp_path / "bridge.db", "aios", "aios.", "aios", ["llm"], 100, **kw)
    one, two = bridge(), bridge()
    first = one.principal("alice")
    assert two.principal("alice").agent_id == first.agent_id == "aios.alice"
    assert one.principal("alice").agent_id == "aios.alice"        # the first's token still works
    assert (tmp_path / "bridge.db").stat().st_mode & 0o077 == 0
    got = []
    threads = [threading.Thread(target=lambda b=b: got.append(b.principal("bob").agent_id)) for b in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["aios.bob", "aios.bob"]
    # a kernel from before kept the tokens in a JSON file: taken in once
    _, token = registry.create("aios.carol", "aios agent 'carol'", {"bridge": "aios", "name": "carol"})
    legacy = tmp_path / "aios_agents.json"
    legacy.write_text(json.dumps({"aios.carol": token}))
    three = bridge(legacy=legacy)
    assert not legacy.exists()
    assert three.principal("carol").agent_id == "aios.carol"
    assert registry.authenticate(token) is not None                # not rotated: the same token
