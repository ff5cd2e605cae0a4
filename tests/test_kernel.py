"""A real kernel process over gRPC: registration and tokens, generation (unary, streaming, asyncio),
adapters, bad input with proper statuses, tracing, stats, health and reflection, client cancellation."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import kernos.sdk
from kernos.storage.traces import TraceLog


@pytest.fixture(scope="module")
def session(kernel):
    s = kernos.sdk.connect(kernel.address, agent="tester")
    yield s
    s.exit()


def test_chat_returns_a_typed_completion(session):
    c = session.llm.chat("hello world", max_tokens=12)
    assert isinstance(c, kernos.sdk.Completion)
    assert c.model == "tiny-llama" and c.completion_tokens == 12 and c.finish_reason == "length"
    assert c.prompt_tokens > 0 and c.total_ms > 0 and c.time_to_first_token_ms <= c.total_ms
    assert c.text


def test_concurrent_agents_get_the_same_greedy_answers_as_sequential(kernel, session):
    prompts = [f"question {i} about the agent kernel" for i in range(6)]
    sequential = [session.llm.chat(p, max_tokens=24).text for p in prompts]
    results = [None] * len(prompts)

    def agent(i):
        with kernos.sdk.connect(kernel.address, agent=f"conc-{i}") as s:
            results[i] = s.llm.chat(prompts[i], max_tokens=24).text
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == sequential


def test_stream_chunks_add_up_to_the_reply(session):
    chunks = list(session.llm.stream("one two three", max_tokens=20))
    assert chunks[-1].done and chunks[-1].completion is not None
    assert "".join(c.text for c in chunks) == chunks[-1].completion.text
    assert sum(1 for c in chunks if c.text) > 1


def test_one_kernel_serves_dense_moe_and_hybrid_models_at_once(kernel, session):
    archs = {m.name: m.architecture for m in session.llm.models()}
    assert archs == {"tiny-llama": "dense", "tiny-mixtral": "moe", "tiny-jamba": "hybrid", "echo": "echo"}
    results = {}

    def call(model):
        results[model] = session.llm.chat("the agent kernel", model=model, max_tokens=9)
    threads = [threading.Thread(target=call, args=(m,)) for m in ("tiny-llama", "tiny-mixtral", "tiny-jamba")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {m: r.model for m, r in results.items()} == {m: m for m in results}
    assert all(r.completion_tokens == 9 for r in results.values())
    assert len({r.text for r in results.values()}) == 3


def test_raw_prompt_and_models(session):
    c = session.llm.complete("the agent kernel", max_tokens=5)
    assert c.completion_tokens == 5
    models = {m.name: m for m in session.llm.models()}
    assert models["tiny-llama"].is_default and models["tiny-llama"].adapters == ["alpha", "beta"]
    assert models["echo"].architecture == "echo"


def test_adapters_are_chosen_per_request(session):
    base = session.llm.chat("hello world", max_tokens=10).text
    alpha = session.llm.chat("hello world", max_tokens=10, adapter="alpha")
    assert alpha.adapter == "alpha" and alpha.text != base
    with pytest.raises(kernos.sdk.NotFound, match="no adapter 'gamma'"):
        session.llm.chat("hello", adapter="gamma")


def test_asyncio_twin(kernel):
    async def main():
        async with await kernos.sdk.aio.connect(kernel.address, agent="aio-agent") as s:
            c = await s.llm.chat("hello world", max_tokens=8)
            chunks = [ch async for ch in s.llm.stream("hello world", max_tokens=8)]
            with pytest.raises(kernos.sdk.InvalidArgument):
                await s.llm.chat("x", max_tokens=-1)
            return c, chunks
    c, chunks = asyncio.run(main())
    assert c.completion_tokens == 8
    assert "".join(ch.text for ch in chunks) == c.text


BAD = [
    ("empty messages", dict(messages=[]), kernos.sdk.InvalidArgument, "empty request"),
    ("blank message", dict(messages=[{"role": "user", "content": "  "}]), kernos.sdk.InvalidArgument, "empty"),
    ("messages and prompt", dict(messages=[{"role": "user", "content": "x"}], prompt="z"),
     kernos.sdk.InvalidArgument, "not both"),
    ("zero max_tokens", dict(messages="hi", max_tokens=0), kernos.sdk.InvalidArgument, "max_tokens must be > 0"),
    ("negative max_tokens", dict(messages="hi", max_tokens=-5), kernos.sdk.InvalidArgument, "max_tokens"),
    ("absurd max_tokens", dict(messages="hi", max_tokens=10**9), kernos.sdk.InvalidArgument, "cap"),
    ("unknown model", dict(messages="hi", model="gpt-9"), kernos.sdk.NotFound, "unknown model 'gpt-9'"),
    ("unknown adapter", dict(messages="hi", adapter="nope"), kernos.sdk.NotFound, "no adapter"),
    ("bad temperature", dict(messages="hi", temperature=-1.0), kernos.sdk.InvalidArgument, "temperature"),
    ("bad top_p", dict(messages="hi", top_p=1.5), kernos.sdk.InvalidArgument, "top_p"),
    ("too many stops", dict(messages="hi", stop=[str(i) for i in range(40)]), kernos.sdk.InvalidArgument, "stop"),
    ("oversized request", dict(messages="word " * 20000), kernos.sdk.ResourceExhausted, "max_request_bytes"),
    ("prompt too long", dict(messages="hello world " * 400), kernos.sdk.ResourceExhausted, "max_prompt_tokens"),
]


@pytest.mark.parametrize("name,kwargs,exc,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_status(session, name, kwargs, exc, text):
    kwargs = dict(kwargs)
    messages, prompt = kwargs.pop("messages", None), kwargs.pop("prompt", None)
    with pytest.raises(exc) as err:
        if prompt is not None:
            session.llm.stream(messages, prompt=prompt, **kwargs).__next__()
        else:
            session.llm.chat(messages, **kwargs)
    assert text in err.value.message
    assert "Traceback" not in err.value.message


def _raw_generate(address, payload: bytes, token: str):
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary("/kernos.v1.LLM/Generate", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        return call(payload, metadata=(("authorization", f"Bearer {token}"),), timeout=10)


def test_invalid_utf8_and_garbage_get_invalid_argument(kernel, session):
    bad_utf8 = b"\x12\x04\xff\xfe\xfd\xfc"          # field 2 (prompt), 4 bytes that are not UTF-8
    garbage = b"\x0a\xff\xff\xff\xff\x0f"            # a length that runs past the end
    for payload in (bad_utf8, garbage):
        with pytest.raises(grpc.RpcError) as err:
            _raw_generate(kernel.address, payload, session.token)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in err.value.details()


def test_message_over_the_transport_limit_is_resource_exhausted(kernel, session):
    with pytest.raises(kernos.sdk.ResourceExhausted):
        session.llm.chat("x" * (40 * 1024 * 1024))  # over server.max_message_bytes (32 MiB)


def test_kernel_keeps_serving_after_bad_input(kernel, session):
    with grpc.insecure_channel(kernel.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kernos.v1.LLM"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert session.llm.chat("still there?", max_tokens=3).completion_tokens == 3


def test_tokens_are_checked(kernel):
    with pytest.raises(kernos.sdk.Unauthenticated):
        kernos.sdk.connect(kernel.address, agent="x", token="kn_forged")
    with grpc.insecure_channel(kernel.address) as ch:  # no token at all
        from kernos.proto.v1 import kernel_pb2, kernel_pb2_grpc
        with pytest.raises(grpc.RpcError) as err:
            kernel_pb2_grpc.KernelStub(ch).Stats(kernel_pb2.StatsRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_registration_names_exit_and_resume(kernel):
    s = kernos.sdk.connect(kernel.address, agent="lifecycle")
    with pytest.raises(kernos.sdk.AlreadyExists):
        kernos.sdk.connect(kernel.address, agent="lifecycle")
    with pytest.raises(kernos.sdk.InvalidArgument):
        kernos.sdk.connect(kernel.address, agent="bad name/../x")
    resumed = kernos.sdk.connect(kernel.address, agent="lifecycle", token=s.token)
    assert resumed.llm.chat("hi", model="echo").text == "hi"
    resumed.close()
    token = s.token
    s.exit()
    with pytest.raises(kernos.sdk.AlreadyExists):    # exit ends a session, not the ownership of the name
        kernos.sdk.connect(kernel.address, agent="lifecycle")
    again = kernos.sdk.connect(kernel.address, agent="lifecycle", token=token)   # the token resumes it
    assert again.llm.chat("back", model="echo").text == "back"
    assert {a.agent_id: a.state for a in again.kernel.agents()}["lifecycle"] == "active"
    again.exit()


def test_syscalls_are_traced(kernel, session):
    marker = "trace marker 1234"
    session.llm.chat(marker, max_tokens=4)
    with pytest.raises(kernos.sdk.InvalidArgument):
        session.llm.chat(marker, max_tokens=0)
    log = TraceLog.__new__(TraceLog)
    log.path = kernel.data_dir / "traces.db"
    deadline = time.time() + 10
    while time.time() < deadline:
        recs = [r for r in log.query(agent_id="tester", kind="llm.generate", limit=10000)
                if marker in str(r.request)]
        if len(recs) >= 2:
            break
        time.sleep(0.1)
    ok = [r for r in recs if r.status == "OK"]
    bad = [r for r in recs if r.status == "INVALID_ARGUMENT"]
    assert ok and bad
    assert ok[0].response["usage"]["completion_tokens"] == 4 and ok[0].timings["syscall_ms"] > 0
    assert ok[0].request["messages"][0]["content"] == marker
    session.kernel.heartbeat()
    deadline = time.time() + 10
    while time.time() < deadline and not log.query(agent_id="tester", kind="kernel.heartbeat"):
        time.sleep(0.1)
    assert log.query(agent_id="tester", kind="kernel.heartbeat")


def test_stats_agents_and_cli(kernel, session):
    session.llm.chat("count me", max_tokens=2, program_id="cli-program")
    st = session.kernel.stats()
    m = {x.name: x for x in st.models}["tiny-llama"]
    assert m.completed >= 1 and m.generated_tokens >= 2 and m.parameters > 0 and st.syscalls > 0
    me = {a.agent_id: a for a in session.kernel.agents()}["tester"]
    assert me.completion_tokens >= 2 and me.state == "active"
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "status", "--address", kernel.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "tiny-llama" in out.stdout and "uptime" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "status", "--address", kernel.address,
                          "--token", session.token], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "cli-program" in out.stdout          # the agent's programs
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "top", "--once", "--address", kernel.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "fair_share" in out.stdout and "preempt" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "agents", "--address", kernel.address,
                          "--token", session.token], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "tester" in out.stdout


def test_reflection_lists_the_services(kernel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(kernel.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"kernos.v1.Kernel", "kernos.v1.LLM", "grpc.health.v1.Health"} <= names


def test_unknown_role_is_invalid(kernel, session):
    from kernos.proto.v1 import llm_pb2, llm_pb2_grpc

    with grpc.insecure_channel(kernel.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            llm_pb2_grpc.LLMStub(ch).Generate(
                llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="wizard", content="hi")]),
                metadata=session.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in err.value.details()


def _tiny(session):
    return {x.name: x for x in session.kernel.stats().models}["tiny-llama"]


def test_client_going_away_frees_its_batch_slot(kernel, session):
    before = _tiny(session).cancelled
    stream = session.llm.stream("a long story", max_tokens=256, stop=["never-appears-xyz"])
    next(stream)
    stream.close()  # cancels the RPC
    deadline = time.time() + 10
    while time.time() < deadline:
        m = _tiny(session)
        if m.cancelled > before and m.running == 0:
            break
        time.sleep(0.02)
    assert m.cancelled == before + 1 and m.running == 0 and m.waiting == 0


def test_agent_suspends_and_resumes_its_own_generation(kernel, session):
    reference = session.llm.chat("a story about tools", max_tokens=250, stop=["never-appears-xyz"])
    stream = session.llm.stream("a story about tools", max_tokens=250, stop=["never-appears-xyz"])
    first = next(stream)
    rid = first.request_id
    assert rid and first.text == ""
    assert session.llm.suspend(rid) == "preempted"
    m = _tiny(session)
    assert m.suspended == 1 and m.running == 0
    [live] = [r for r in m.requests if r.request_id == rid]
    assert live.state == "suspended" and live.preemptions >= 1
    with kernos.sdk.connect(kernel.address, agent="intruder") as other:
        with pytest.raises(kernos.sdk.PermissionDenied):
            other.llm.suspend(rid)
    with pytest.raises(kernos.sdk.NotFound):
        session.llm.resume("no-such-request")
    top = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "top", "--once", "--address", kernel.address,
                          "--token", session.token], capture_output=True, text=True, timeout=60)
    assert any(rid[:12] in line and "suspended" in line for line in top.stdout.splitlines()), top.stdout
    assert session.llm.resume(rid) == "preempted"
    chunks = list(stream)
    assert chunks[-1].done and chunks[-1].completion.text == reference.text
    assert _tiny(session).context_switches >= 1


def test_request_that_can_never_fit_the_cache_budget_is_resource_exhausted(session):
    with pytest.raises(kernos.sdk.ResourceExhausted, match="cache budget"):
        session.llm.chat("hello world " * 170, max_tokens=256)
    assert session.llm.chat("hello world " * 170, max_tokens=4).completion_tokens == 4


def test_every_service_is_traced_by_the_interceptor(kernel):
    """Access, Tools and Tuner calls were not traced before the one interceptor; now every service is, and
    tokens never reach the trace log."""
    s = kernos.sdk.connect(kernel.address, agent="traced-everywhere")
    s.access.grants()
    s.tools.list()
    s.tuner.jobs()
    s.storage.write("t.txt", "x" * 5000)
    s.memory.search("anything")
    with pytest.raises(kernos.sdk.NotFound):
        s.tools.call("no_such_tool")
    log = TraceLog.__new__(TraceLog)
    log.path = kernel.data_dir / "traces.db"
    want = {"access.list_grants", "tools.list", "tuner.list_jobs", "storage.write", "memory.search", "tools.call",
            "kernel.register"}
    deadline = time.time() + 10
    while time.time() < deadline:
        recs = log.query(agent_id="traced-everywhere", limit=1000)
        if want <= {r.kind for r in recs}:
            break
        time.sleep(0.1)
    kinds = {r.kind: r for r in recs}
    assert want <= set(kinds)
    assert kinds["tools.call"].status == "NOT_FOUND"
    assert kinds["storage.write"].request["data"] == {"bytes": 5000}      # sizes, not content
    assert kinds["kernel.register"].response["token"] == "<redacted>"
    assert all(r.timings["syscall_ms"] >= 0 for r in recs)
    s.exit()


def test_a_shared_system_prompt_is_resident_and_counted_in_stats(kernel, session):
    system = "The kernel keeps each agent's files, memory and tools private, and schedules them fairly. " * 6
    before = {x.name: x for x in session.kernel.stats().models}["tiny-llama"]
    replies = [session.llm.chat([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                max_tokens=6, model="tiny-llama") for q in ("first question", "second one")]
    other = kernos.sdk.connect(kernel.address, agent="resident-other")     # another agent, same system prompt
    replies.append(other.llm.chat([{"role": "system", "content": system}, {"role": "user", "content": "third"}],
                                  max_tokens=6, model="tiny-llama"))
    after = {x.name: x for x in session.kernel.stats().models}["tiny-llama"]
    assert after.prefix_hits - before.prefix_hits >= 2
    assert after.prefix_tokens_reused - before.prefix_tokens_reused >= 2 * 64     # whole chunks of the prompt
    assert after.resident_bytes > 0 and after.resident_entries >= 1
    assert all(r.completion_tokens == 6 for r in replies)
