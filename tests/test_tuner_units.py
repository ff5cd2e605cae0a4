"""The fine-tuner's parts in-process: the encoding (assistant-only loss), LoRA targets per architecture,
the training loop's resume, the publish rule, the adapter store, and hot-loading an adapter into a running
engine (exact against one loaded at start)."""
from __future__ import annotations

import pytest

from kernos.abi.errors import StatusError
from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model
from kernos.kernel.llm.types import GenRequest, RequestHandle
from kernos.kernel.tuner.config import TrainConfig
from kernos.kernel.tuner.publish import beats_base
from kernos.kernel.tuner.train import IGNORE, DataError, add_lora, encode, load_base, lora_targets, train
from kernos.storage.adapters import AdapterStore


def test_loss_covers_assistant_turns_only(tiny_models):
    _, tok = load_base(tiny_models["llama"])
    ex = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": "one two"}, {"role": "user", "content": "and"},
                       {"role": "assistant", "content": "three"}]}
    ids, labels = encode(tok, ex, 512)
    learnt = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert learnt == "one two<|im_end|>\nthree<|im_end|>\n"
    assert all(l in (IGNORE, i) for i, l in zip(ids, labels))
    short_ids, short_labels = encode(tok, ex, 8)                  # too long: the end (the last reply) is kept
    assert short_ids == ids[-8:] and short_labels == labels[-8:]
    with pytest.raises(DataError, match="last message"):
        encode(tok, {"messages": ex["messages"][:-1]}, 512)
    with pytest.raises(DataError):
        encode(tok, {"messages": "hi"}, 512)


def test_tool_use_traces_become_examples_in_the_serving_format(tiny_models):
    """A traced tool-using generation (tools in the request, a tool result in the conversation, tool calls in
    the reply) becomes an SFT example that the trainer writes exactly as the kernel prompts it: the tools in
    the system block, the learnt reply the <tool_call> block."""
    from kernos.abi.trace import TraceRecord
    from kernos.kernel.llm.tool_calls import chat_template_input, tool_defs
    from kernos.kernel.tuner.datasets import build_sft, episodes_from_traces

    tools = [{"name": "calculator", "description": "arithmetic",
              "parameters_json": '{"type": "object", "properties": {"expression": {"type": "string"}}}'}]
    first = {"messages": [{"role": "user", "content": "what is 6*7"}], "tools": tools}
    second = {"messages": [{"role": "user", "content": "what is 6*7"},
                           {"role": "assistant", "tool_calls": [{"id": "c1", "name": "calculator",
                                                                 "arguments": '{"expression": "6*7"}'}]},
                           {"role": "tool", "content": "42", "tool_call_id": "c1"}], "tools": tools}
    traces = [TraceRecord("a", "llm.generate", "OK", first,
                          {"request_id": "r1", "text": "", "tool_calls": [{"id": "c9", "name": "calculator",
                                                                           "arguments": '{"expression": "6*7"}'}]}, {}),
              TraceRecord("a", "llm.generate", "OK", second, {"request_id": "r2", "text": "It is 42."}, {})]
    train, evals, card = build_sft(episodes_from_traces(traces, {"r1": [{"success": True}],
                                                                  "r2": [{"success": True}]}), eval_fraction=0)
    assert card["tool_use"] == 2 and len(train) == 2
    _, tok = load_base(tiny_models["llama"])
    call_ex = next(ex for ex in train if ex["messages"][-1].get("tool_calls"))
    ids, labels = encode(tok, call_ex, 1024)
    learnt = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert learnt.startswith("<tool_call>\n") and '"expression": "6*7"' in learnt and "calculator" in learnt
    whole = tok.decode(ids)
    assert "<tools>" in whole and '"name": "calculator"' in whole
    served, kwargs = chat_template_input(tok, call_ex["messages"][:-1], tool_defs(tools))
    prompt = tok.apply_chat_template(served, add_generation_prompt=True, tokenize=True, **kwargs)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert ids[:len(prompt)] == prompt                         # the prompt the kernel would send, token for token
    answer_ex = next(ex for ex in train if ex["messages"][-1]["content"] == "It is 42.")
    whole = tok.decode(encode(tok, answer_ex, 1024)[0])
    assert "<tool_response>\n42\n</tool_response>" in whole and "<tool_call>" in whole


@pytest.mark.parametrize("arch, modules, params", [
    ("llama", {"q_proj", "v_proj", "gate_proj", "down_proj"}, set()),
    ("mixtral", {"q_proj", "o_proj"}, {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}),
    ("jamba", {"q_proj", "in_proj", "x_proj", "dt_proj", "out_proj", "gate_proj"},
     {"feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"}),
])
def test_lora_targets_cover_attention_mlp_mamba_and_fused_experts(tiny_models, arch, modules, params):
    model, _ = load_base(tiny_models[arch])
    found_modules, found_params = lora_targets(model, TrainConfig())
    assert modules <= set(found_modules) and set(found_params) == params
    peft_model = add_lora(model, TrainConfig(rank=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    if params:     # the fused expert weights themselves get a LoRA
        assert any("experts" in n for n in trainable)


def test_train_config_validation():
    assert TrainConfig().rank == 8
    for bad in ({"rank": 0}, {"learning_rate": -1}, {"nope": 1}, {"target_modules": []}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"what is {w}"}, {"role": "assistant", "content": f"{w} ok"}]}
            for w in ["red", "blue", "green", "fast", "slow", "small"] * (n // 6)]


def test_resumed_training_equals_an_uninterrupted_run(tiny_models, tmp_path):
    cfg = TrainConfig(max_steps=12, batch_size=4, checkpoint_every=4, learning_rate=1e-3, eval_limit=2,
                      eval_max_new_tokens=4)
    rows = _rows(24)
    whole = train(tiny_models["llama"], rows, rows[:2], cfg, tmp_path / "a")
    calls = {"n": 0}

    def stop_after_six():
        calls["n"] += 1
        return calls["n"] > 6      # asked before each step: stops before step 7, after the step-4 checkpoint
    part = train(tiny_models["llama"], rows, rows[:2], cfg, tmp_path / "b", should_stop=stop_after_six)
    assert part["cancelled"] and part["step"] == 6
    events = []
    rest = train(tiny_models["llama"], rows, rows[:2], cfg, tmp_path / "b", report=events.append)
    assert events[0] == {"event": "resumed", "step": 6, "total": 12}   # the cancel checkpointed step 6
    assert not any(e["event"] == "eval" and e["phase"] == "base" for e in events)
    assert rest["train_loss_last"] == pytest.approx(whole["train_loss_last"], rel=1e-4)
    assert rest["tuned"]["loss"] == pytest.approx(whole["tuned"]["loss"], rel=1e-4)


def test_publish_rule():
    assert beats_base({"loss": 2.0, "accuracy": 0.1}, {"loss": 1.0, "accuracy": 0.8})[0]
    ok, why = beats_base({"loss": 2.0, "accuracy": 0.5}, {"loss": 1.0, "accuracy": 0.4})
    assert not ok and "accuracy fell" in why
    assert not beats_base({"loss": 2.0}, {"loss": 1.9}, min_improvement=0.1)[0]
    assert beats_base({"loss": 2.0}, {"loss": 1.7}, min_improvement=0.1)[0]
    assert not beats_base({"loss": None}, {"loss": 1.0})[0]


def test_adapter_store_versions_defaults_and_survives_reopen(tmp_path, lora_adapters):
    store = AdapterStore(tmp_path / "adapters")
    v1 = store.publish("agent-a", "style", "m", lora_adapters["alpha"], {"tuned": {"loss": 1.0}}, "j1")
    v2 = store.publish("agent-a", "style", "m", lora_adapters["beta"], {"tuned": {"loss": 0.9}}, "j2")
    store.publish("agent-b", "style", "m", lora_adapters["alpha"], {}, "j3")
    assert (v1.version, v2.version, v2.served_name) == (1, 2, "agent-a:style")
    assert (v2.path / "adapter_config.json").exists() and not list(v2.path.parent.glob(".*tmp"))
    assert (v2.path / "adapter_model.safetensors").read_bytes() == \
        (lora_adapters["beta"] / "adapter_model.safetensors").read_bytes()
    with pytest.raises(StatusError):
        store.publish("agent-a", "Bad Name", "m", lora_adapters["alpha"], {})
    with pytest.raises(StatusError):
        store.publish("agent-a", "x", "m", tmp_path, {})        # not an adapter folder
    store.set_default("agent-a", "m", "agent-a:style")
    store.close()
    store = AdapterStore(tmp_path / "adapters")
    assert [(v.owner, v.version) for v in store.latest()] == [("agent-a", 2), ("agent-b", 1)]
    assert [v.version for v in store.versions("agent-a")] == [1, 2]
    assert store.default("agent-a", "m") == "agent-a:style" and store.default("agent-b", "m") is None
    store.set_default("agent-a", "m", "")
    assert store.default("agent-a", "m") is None


def _generate(eng, ids, adapters, max_tokens):
    """Submit one request per adapter at once (they share batches); their texts."""
    handles = []
    for i, a in enumerate(adapters):
        h = RequestHandle(GenRequest(f"r{i}", "a", ids, max_tokens, adapter=a))
        eng.submit(h.request, h)
        handles.append(h)
    return [h.result(timeout=60).text for h in handles]


def test_hot_loaded_adapter_equals_one_loaded_at_start(tiny_models, lora_adapters, tmp_path):
    cold = load_model(ModelConfig(name="l", path=str(tiny_models["llama"]),
                                  adapters={"alpha": str(lora_adapters["alpha"])}), EngineConfig(), tmp_path)
    hot = load_model(ModelConfig(name="l", path=str(tiny_models["llama"])), EngineConfig(), tmp_path)
    ids = cold.tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                             tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def gen(lm, eng, adapters):
        return _generate(eng, ids, adapters, 12)
    e_cold, e_hot = TransformersEngine(cold, 4), TransformersEngine(hot, 4)
    e_cold.start(), e_hot.start()
    try:
        base_before = gen(hot, e_hot, [None])
        assert e_hot.load_adapter("agent.x:style", lora_adapters["alpha"]).result(60) == ["agent.x:style"]
        assert gen(hot, e_hot, ["agent.x:style", None]) == gen(cold, e_cold, ["alpha", None])
        assert gen(hot, e_hot, [None]) == base_before                    # rows without the adapter: unchanged
        e_hot.load_adapter("agent.x:style", lora_adapters["beta"]).result(60)   # a new version replaces it
        assert gen(hot, e_hot, ["agent.x:style"]) != gen(cold, e_cold, ["alpha"])
        assert hot.adapters == ["agent.x:style"]
    finally:
        e_cold.drain(5), e_hot.drain(5)


def test_moe_expert_adapter_is_served_apart_from_other_rows(tiny_models, tmp_path):
    """peft cannot route fused-expert LoRA per row; the engine keeps such an adapter's rows in batches of
    their own, and the results equal each request run alone."""
    rows = [{"messages": [{"role": "user", "content": f"what {w}"}, {"role": "assistant", "content": "one two"}]}
            for w in ["red", "blue", "fast", "slow"] * 2]
    train(tiny_models["mixtral"], rows, rows[:1], TrainConfig(max_steps=6, learning_rate=3e-3, eval_limit=1),
                tmp_path / "job")
    lm = load_model(ModelConfig(name="m", path=str(tiny_models["mixtral"])), EngineConfig(), tmp_path)
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "what red"}], add_generation_prompt=True,
                                           tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    eng = TransformersEngine(lm, 4)
    eng.start()
    try:
        eng.load_adapter("a:moe", tmp_path / "job" / "adapter").result(60)
        assert eng.runner.adapters.unbatchable == {"a:moe"}

        def gen(adapters):
            return _generate(eng, ids, adapters, 10)
        alone = [gen([a])[0] for a in ("a:moe", None)]
        assert alone[0] != alone[1]
        assert gen(["a:moe", None, "a:moe", None]) == [alone[0], alone[1], alone[0], alone[1]]
    finally:
        eng.drain(5)


def test_a_job_cannot_ask_for_more_threads_than_the_kernel_gives(tmp_path):
    """Issue 30, finding 10: a job's own `threads` overrode tuner.threads (28 threads instead of 6)."""
    import json

    from kernos.kernel.tuner.jobs import Job, JobManager

    jobs = JobManager(tmp_path, finish=lambda job, result: ("rejected", ""), max_jobs=0, threads=2)  # none start
    for asked, given in ((28, 2), (1, 1), (0, 2)):
        job = jobs.submit(Job("", "agent", "a", "ds", "m", str(tmp_path), {"threads": asked}), [], [])
        assert json.loads((jobs.dir(job) / "job.json").read_text())["threads"] == given


def test_training_continues_from_an_adapter_as_one_adapter_on_the_base(tiny_models, tmp_path):
    """A job that continues from an adapter trains on the base with it merged in: its "base" numbers are the
    starting adapter's, and the result, combined with the start, is one adapter on the base (rank r1 + r2) that
    computes what the merged model with the new LoRA computes."""
    import json

    import torch
    from peft import PeftModel

    from kernos.kernel.tuner.combine import CombineError, check_start, combine

    cfg = TrainConfig(max_steps=8, batch_size=4, learning_rate=3e-3, eval_limit=4, eval_max_new_tokens=4, rank=4,
                      alpha=8)
    rows = _rows(24)
    first = train(tiny_models["llama"], rows, rows[:4], cfg, tmp_path / "a")
    start = tmp_path / "a" / "adapter"
    second = train(tiny_models["llama"], rows, rows[:4], cfg.model_copy(update={"rank": 2, "alpha": 2}),
                   tmp_path / "b", start=start)
    assert second["base"]["loss"] == pytest.approx(first["tuned"]["loss"], abs=1e-4)   # the start is its base
    assert second["tuned"]["loss"] < second["base"]["loss"]
    new = tmp_path / "b" / "adapter"
    merged_then_new, tok = load_base(tiny_models["llama"], start=start)
    merged_then_new = PeftModel.from_pretrained(merged_then_new, new)
    combine(start, new)
    config = json.loads((new / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (6, 6)
    base, _ = load_base(tiny_models["llama"])
    one = PeftModel.from_pretrained(base, new)
    ids = torch.tensor([tok.encode("what is red and what is blue")])
    with torch.no_grad():
        want, got = merged_then_new(ids).logits, one(ids).logits
        with one.disable_adapter():
            plain = one(ids).logits
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    assert not torch.allclose(plain, got, atol=1e-3)          # (the two adapters do change the model)
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                         "target_parameters": ["experts.gate_up"]}))
    with pytest.raises(CombineError, match="fused MoE experts"):
        check_start(tmp_path / "experts")
