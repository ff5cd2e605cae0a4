"""Hostile requests at every RPC through a real kernel: random field values built from each method's
protobuf descriptor (huge, negative, NaN, NUL bytes, path traversal, deep nesting) and raw garbage bytes,
with a valid token, a forged one or none. Every reply must be a success or a proper status (never
INTERNAL or UNKNOWN, never a stack trace), and the kernel must answer a health check afterwards."""
from __future__ import annotations

import math
import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.proto.v1 import access_pb2, kernel_pb2, llm_pb2, memory_pb2, storage_pb2, tools_pb2, tuner_pb2

BAD_STATUS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
              grpc.StatusCode.UNIMPLEMENTED}
SKIP = {"/kernos.v1.Kernel/Exit"}  # would end the fuzzing agent's own registration
HOSTILE_TEXT = st.one_of(
    st.text(max_size=64),
    st.sampled_from(["", " ", "../../etc/passwd", "/abs/path", "a\x00b", "x" * 5000, "group:team", "admin:config",
                     "ns-" + "f" * 40, "\ud7ff\ue000", "{{7*7}}", "'; DROP TABLE grants; --", "user", "system"]),
)
COUNT = {"requests": 0, "ok": 0, "status": {}}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))  # a longer hunt: FUZZ_EXAMPLES=5000


def methods():
    out = []
    for mod in (kernel_pb2, llm_pb2, memory_pb2, storage_pb2, access_pb2, tools_pb2, tuner_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                path = f"/{svc.full_name}/{m.name}"
                if path not in SKIP:
                    out.append((path, m.input_type, m.output_type, m.server_streaming))
    return out


METHODS = methods()


def value_for(field, draw, depth):
    t = field.type
    if t == F.TYPE_STRING:
        return draw(HOSTILE_TEXT)
    if t == F.TYPE_BYTES:
        return draw(st.binary(max_size=256))
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return draw(st.integers(-2**31, 2**31 - 1))
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return draw(st.integers(0, 2**32 - 1))
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return draw(st.integers(-2**63, 2**63 - 1))
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return draw(st.integers(0, 2**64 - 1))
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                              st.sampled_from([0.0, -1.0, 1e30, math.nan])))
    if t == F.TYPE_BOOL:
        return draw(st.booleans())
    if t == F.TYPE_ENUM:
        return draw(st.integers(0, 10))
    return None


def fill(msg, draw, depth=0):
    for field in msg.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                k = value_for(key_f, draw, depth)
                if val_f.message_type is None:
                    getattr(msg, field.name)[k] = value_for(val_f, draw, depth)
            continue
        if field.type == F.TYPE_MESSAGE:
            if depth >= 2:
                continue
            if field.is_repeated:
                for _ in range(draw(st.integers(0, 3))):
                    fill(getattr(msg, field.name).add(), draw, depth + 1)
            else:
                fill(getattr(msg, field.name), draw, depth + 1)
            continue
        if field.is_repeated:
            getattr(msg, field.name).extend(value_for(field, draw, depth) for _ in range(draw(st.integers(0, 3))))
        else:
            try:
                setattr(msg, field.name, value_for(field, draw, depth))
            except ValueError:  # e.g. an invalid enum value on a closed enum
                pass


@pytest.fixture(scope="module")
def fuzz_kernel(tiny_models, tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("fuzz")
    cfg = write_config(d / "k.toml", [{"name": "tiny", "path": str(tiny_models["llama"])},
                                      {"name": "echo", "path": "-", "kind": "echo"}],
                       limits={"max_tokens_cap": 16, "default_max_tokens": 8},
                       storage={"quota_bytes": 1_000_000})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    session = kernos.sdk.connect(address, agent="fuzzer")
    channel = grpc.insecure_channel(address)
    yield address, session, channel
    channel.close()
    assert stop_kernel(proc) == 0


def call(channel, path, payload: bytes, streaming: bool, metadata):
    if streaming:
        stub = channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return list(stub(payload, metadata=metadata, timeout=30))
    stub = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return stub(payload, metadata=metadata, timeout=30)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_requests_get_proper_statuses(fuzz_kernel, data):
    address, session, channel = fuzz_kernel
    path, in_type, _, streaming = data.draw(st.sampled_from(METHODS))
    from google.protobuf import message_factory
    cls = message_factory.GetMessageClass(in_type)
    msg = cls()
    fill(msg, data.draw)
    payload = data.draw(st.one_of(st.just(msg.SerializeToString()), st.binary(max_size=64)))
    token = data.draw(st.sampled_from([session.token, session.token, "kn_forged", None]))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    COUNT["requests"] += 1
    try:
        call(channel, path, payload, streaming, metadata)
        COUNT["ok"] += 1
    except grpc.RpcError as e:
        code = e.code()
        COUNT["status"][code.name] = COUNT["status"].get(code.name, 0) + 1
        assert code not in BAD_STATUS, f"{path}: {code.name}: {e.details()}"
        assert "Traceback" not in (e.details() or "") and 'File "' not in (e.details() or "")


HOSTILE_CODE = [
    "import os\nresult = os.listdir('/')", "result = open('/proc/1/environ', 'rb').read().decode('latin-1')",
    "import os\nos.kill(1, 9)", "import os\nwhile True: os.fork()", "import ctypes\nctypes.string_at(0)",
    "import sys\nsys.setrecursionlimit(10**6)\ndef f(): f()\nf()", "result = float('nan')", "result = object()",
    "raise SystemExit(0)", "import os\nos._exit(3)", "print('\\n__KERNOS_RESULT__' * 1000)",
    "import socket\nsocket.socket(socket.AF_UNIX).connect('/var/run/docker.sock')",
    "open('/work/big', 'wb').write(b'x' * (200 << 20))", "result = 'x' * (20 << 20)",
    "import os\nos.setuid(0)",
    "import subprocess\nresult = subprocess.run(['id'], capture_output=True).stdout.decode()",
]


@settings(max_examples=max(40, EXAMPLES // 10), deadline=None, suppress_health_check=list(HealthCheck))
@given(code=st.one_of(st.sampled_from(HOSTILE_CODE), st.text(max_size=200)),
       register=st.booleans())
def test_hostile_tool_code_gets_a_result_or_a_proper_status(fuzz_kernel, code, register):
    """Code run through the python tool, or registered as a tool, never gets INTERNAL and never escapes
    the jail: whatever it does, the call ends done, error or a proper status."""
    address, session, channel = fuzz_kernel
    COUNT["requests"] += 1
    try:
        if register:
            session.tools.register("fuzzed", code, {"type": "object"}, timeout_s=3, cpu_s=2)
            r = session.tools.call("fuzzed")
        else:
            r = session.tools.call("python", code=code)
        assert r.state in ("done", "error")
        COUNT["ok"] += 1
    except kernos.sdk.KernosError as e:
        COUNT["status"][e.code.name] = COUNT["status"].get(e.code.name, 0) + 1
        assert e.code not in BAD_STATUS, f"{e.code.name}: {e.message}"


def test_kernel_is_healthy_after_the_fuzzing(fuzz_kernel):
    address, session, channel = fuzz_kernel
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert session.llm.chat("still alive", model="echo").text == "still alive"
    print(f"fuzz: {COUNT['requests']} hostile requests, {COUNT['ok']} served, statuses {COUNT['status']}")
    assert COUNT["requests"] >= EXAMPLES
