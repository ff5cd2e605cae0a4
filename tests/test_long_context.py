"""Issue 34: long context. A model's window from its config and the entry's max_model_len and rope_scaling
(checked at start with clear errors), the limits that follow from it, context extension applied exactly by the
own engine (batched == alone == transformers' generate, prompts in chunks == whole), and a prompt at the embedded
model's full window through the kernel."""
from __future__ import annotations

import pytest
import torch

from kernos.kernel.config import EngineConfig, LimitsConfig, ModelConfig
from kernos.kernel.llm import window
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import ModelLoadError, load_model
from kernos.kernel.llm.types import GenRequest, RequestHandle

WORDS = "memory storage schedule batch cache tool file read write plan search list run stop the model".split()


def _hf(tiny):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny, local_files_only=True)


def _entry(tiny, **kw):
    return ModelConfig(name="m", path=str(tiny), dtype="float32", **kw)


def test_the_window_follows_the_config_and_the_entry(tiny_models, tmp_path):
    llama = tiny_models["llama"]                                    # max_position_embeddings 2048
    assert window.apply(_entry(llama), _hf(llama)) == 2048
    assert window.apply(_entry(llama, max_model_len=1000), _hf(llama)) == 1000
    for kind, extra in (("linear", {}), ("dynamic", {}), ("yarn", {}),
                        ("llama3", {"low_freq_factor": 1.0, "high_freq_factor": 4.0})):
        hf = _hf(llama)
        entry = _entry(llama, rope_scaling={"rope_type": kind, "factor": 4.0, **extra})
        assert window.apply(entry, hf) == 8192, kind
        assert hf.rope_parameters["rope_type"] == kind and hf.rope_parameters["factor"] == 4.0
        # vLLM's rule on the same fields: yarn and llama3 carry the extended window, linear and dynamic the
        # trained one times the factor
        assert hf.max_position_embeddings == (8192 if kind in ("yarn", "llama3") else 2048), kind
    # clear errors at start, naming the entry and the field
    with pytest.raises(ModelLoadError, match="max_model_len 3000 is over the 2048 positions.*rope_scaling can"):
        load_model(_entry(llama, max_model_len=3000), EngineConfig(), tmp_path)
    with pytest.raises(ModelLoadError, match="'llama3' needs low_freq_factor"):
        load_model(_entry(llama, rope_scaling={"rope_type": "llama3", "factor": 2.0}), EngineConfig(), tmp_path)
    with pytest.raises(ModelLoadError, match="jamba has no rotary positions"):
        load_model(_entry(tiny_models["jamba"], rope_scaling={"rope_type": "yarn", "factor": 2.0}), EngineConfig(),
                   tmp_path)
    hf = _hf(llama)
    hf.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert window.window(hf) == 4096
    with pytest.raises(window.WindowError, match="already scales its positions"):
        window.overrides(_entry(llama, rope_scaling={"rope_type": "yarn", "factor": 2.0}), hf)
    from pydantic import ValidationError
    for bad in ({"rope_type": "yarn", "factor": 0.5}, {"rope_type": "ntk", "factor": 2.0},
                {"rope_type": "yarn", "factor": 2.0, "beta": 1}):
        with pytest.raises(ValidationError):
            _entry(llama, rope_scaling=bad)
    with pytest.raises(ValidationError, match="differ"):
        ModelConfig(name="v", path="x", kind="vllm", max_model_len=10, vllm={"max_model_len": 20})
    assert ModelConfig(name="v", path="x", kind="vllm", vllm={"max_model_len": 20}).max_model_len == 20


def test_the_limits_follow_the_window():
    lim = LimitsConfig()
    assert lim.prompt_limit(8192, 256) == 7936 and lim.request_limit(8192) == 64 * 1024 + 32 * 8192
    capped = LimitsConfig(max_prompt_tokens=4096, max_request_bytes=1000)
    assert capped.prompt_limit(8192, 256) == 4096 and capped.request_limit(8192) == 1000
    assert capped.prompt_limit(1024, 256) == 768


def _prompt(lm, n_words: int, seed: int) -> list[int]:
    text = " ".join(WORDS[(i * 7 + seed * 5) % len(WORDS)] for i in range(n_words))
    out = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _run(lm, reqs, **engine_kw):
    eng = TransformersEngine(lm, **engine_kw)
    eng.start()
    try:
        handles = []
        for r in reqs:
            handles.append(RequestHandle(r))
            eng.submit(r, handles[-1])
        return [h.result(timeout=300).token_ids for h in handles]
    finally:
        eng.drain(5)


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0},
                                     {"rope_type": "linear", "factor": 2.0}], ids=lambda s: s["rope_type"])
def test_rope_scaling_is_exact_batched_alone_and_in_chunks(tiny_models, tmp_path, scaling):
    """Prompts past the trained 2048 positions: each reply batched (in chunks, between other rows' decode steps)
    == alone (the prompt whole) == transformers' own greedy generate on the same scaled model; and the scaling
    is applied (the replies differ from the unscaled model's)."""
    lm = load_model(_entry(tiny_models["llama"], rope_scaling=scaling), EngineConfig(), tmp_path)
    plain = load_model(_entry(tiny_models["llama"]), EngineConfig(), tmp_path)
    assert lm.context_length == 2048 * scaling["factor"]
    prompts = [_prompt(lm, n, i) for i, n in enumerate((2300, 40, 700))]
    assert len(prompts[0]) > 2048
    reqs = lambda: [GenRequest(f"r{i}", "a", p, 12) for i, p in enumerate(prompts)]    # noqa: E731
    alone = [_run(lm, [r], max_batch_size=1, prefill_chunk=64, prefill_per_step=0)[0] for r in reqs()]
    batched = _run(lm, reqs(), max_batch_size=4, prefill_chunk=64, prefill_per_step=64)
    assert batched == alone
    for p, got in zip(prompts, alone):
        ref = lm.model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert got == ref[0, len(p):].tolist()
    with torch.inference_mode():      # applied: the scaled model's logits are not the plain model's
        ids = torch.tensor([prompts[1]])
        assert not torch.allclose(lm.model(ids).logits, plain.model(ids).logits, atol=1e-4)
    if scaling["rope_type"] == "dynamic":
        # fixed at the extended window L = trained * factor, as vLLM computes dynamic NTK:
        # base * (factor * L / trained - (factor - 1)) ** (d / (d - 2))
        rotary, d, f = lm.model.model.rotary_emb, lm.model.config.head_dim, scaling["factor"]
        base = 10000.0 * (f * f - (f - 1)) ** (d / (d - 2))
        expect = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        assert torch.allclose(rotary.inv_freq, expect) and rotary.rope_type != "dynamic"


@pytest.fixture(scope="module")
def long_kernel(tmp_path_factory):
    """A kernel on the embedded model with the default limits."""
    import openai
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel

    d = tmp_path_factory.mktemp("long")
    cfg = write_config(d / "k.toml", [{"name": "smol", "path": "embedded"}])
    proc, address = start_kernel(d / "data", str(cfg), timeout=300)
    session = kernos.sdk.connect(address, agent="long-agent")
    yield openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=session.token, max_retries=0,
                        timeout=600), session, d / "data"
    session.close()
    assert stop_kernel(proc) == 0


def test_a_prompt_at_the_embedded_models_full_window(long_kernel):
    """By default a prompt may fill the model's window (8192 tokens) less the reply's room: LongLLaMA's passkey
    prompt at ~8.1K tokens through /v1/completions finds its key; an unset max_tokens gets what the window leaves.
    Over the window: INVALID_ARGUMENT (400) naming the context length or max_tokens; a request over the size that
    follows from the window: 413 naming limits.max_request_bytes. Nothing is truncated."""
    import openai
    from transformers import AutoTokenizer

    from kernos.kernel.llm import embedded
    from kernos.kernel.llm.testing import passkey_prompt

    client, session, data = long_kernel
    tok = AutoTokenizer.from_pretrained(embedded.ensure_converted(data), local_files_only=True)
    assert {m.name: m for m in session.llm.models()}["smol"].context_length == 8192
    prompt = passkey_prompt(tok, 8100, 0.5, 71432)
    n = len(tok.encode(prompt))
    assert 8000 < n < 8192 - 16
    r = client.completions.create(model="smol", prompt=prompt)
    assert r.usage.prompt_tokens == n and 0 < r.usage.completion_tokens <= 8192 - n
    assert "71432" in r.choices[0].text
    over = passkey_prompt(tok, 8300, 0.5, 71432)
    with pytest.raises(openai.BadRequestError, match="exceeds the context length of 'smol' \\(8192"):
        client.completions.create(model="smol", prompt=over)
    with pytest.raises(openai.BadRequestError, match="max_tokens \\(200\\) exceeds the context length"):
        client.completions.create(model="smol", prompt=prompt, max_tokens=200)
    with pytest.raises(openai.APIStatusError, match="limits.max_request_bytes") as e:
        client.completions.create(model="smol", prompt="word " * 80_000, max_tokens=1)
    assert e.value.status_code == 413



@pytest.mark.parametrize("arch", ["llama", "jamba"])
def test_chunks_shrink_with_position_and_stay_exact(tiny_models, tmp_path, arch):
    """Chunks halve as the position grows fourfold (64 tokens to 128, then 32): a prompt prefilled a chunk or two
    a step beside a decoding row equals it prefilled in one go, and a resident prefix serves up to the last
    boundary of the smaller chunks (a hybrid model's Mamba state serves only whole: none). A step's time budget
    runs one chunk when the chunk takes longer; the running row gets a token every step meanwhile."""
    from kernos.kernel.llm.engine.runner import Chunking

    c = Chunking(64, 128)
    assert [c.end(p, 10_000) for p in (0, 64, 128, 160, 511, 512)] == [64, 128, 160, 192, 512, 544]
    assert c.floor_boundary(300) == 288 and c.floor_boundary(100) == 64 and Chunking(128).floor_boundary(300) == 256
    lm = load_model(_entry(tiny_models[arch]), EngineConfig(), tmp_path)
    lm.eos_ids = set()                           # the short row decodes its 200 tokens whatever it draws
    long_ids, short_ids = _prompt(lm, 700, 1), _prompt(lm, 5, 2)
    assert len(long_ids) > 600
    kw = dict(prefill_chunk=64, prefill_shrink_from=128, resident_bytes=1 << 30)
    alone = _run(lm, [GenRequest("l", "a", long_ids, 8)], max_batch_size=1, prefill_per_step=0, **kw)[0]
    eng = TransformersEngine(lm, 4, prefill_per_step=10_000, prefill_step_s=1e-6, **kw)
    short = GenRequest("s", "a", short_ids, 200)
    eng.submit(short, RequestHandle(short))
    while not eng.rows:
        eng.step()
    req = GenRequest("l", "a", long_ids, 8)
    hl = RequestHandle(req)
    eng.submit(req, hl)
    eng.step()                                   # admitted: a long prompt, one chunk a step from its start
    positions = [eng.prefilling[0].prompt.pos]
    while eng.prefilling:
        tokens = eng.stats.generated_tokens
        eng.step()
        # the short row's token every step; the last also the long one's first token, and its first decode
        assert eng.stats.generated_tokens == tokens + (1 if eng.prefilling else 3)
        if eng.prefilling:
            positions.append(eng.prefilling[0].prompt.pos)
    assert positions[:4] == [64, 128, 160, 192]      # one chunk a step: the time budget, not the tokens
    # a prompt no longer than where chunks shrink (an agent's tool follow-up) prefills by tokens only
    brief = GenRequest("b", "a", _prompt(lm, 90, 3)[:120], 4)
    eng.submit(brief, RequestHandle(brief))
    eng.step()
    assert not eng.prefilling and any(r.req.request_id == "b" for r in eng.rows), "two chunks in one step"
    while eng.step():
        pass
    assert hl.result(timeout=1).token_ids == alone
    again = GenRequest("again", "a", long_ids[:300] + short_ids, 4)
    eng.submit(again, RequestHandle(again))
    while eng.step():
        pass
    assert eng.stats.prefix_tokens_reused == (288 if arch == "llama" else 0)


def test_a_prompt_counts_toward_its_agents_fair_share_as_it_prefills(tiny_models, tmp_path):
    """Fair share charges prompt tokens as their chunks run, at what a prompt token costs against a decoded one
    as the engine measures it: an agent whose long prompt is prefilling has used its share before it decodes."""
    from kernos.scheduler import FairSharePolicy

    lm = load_model(_entry(tiny_models["llama"]), EngineConfig(), tmp_path)
    policy = FairSharePolicy()
    eng = TransformersEngine(lm, 4, policy=policy, prefill_chunk=64, prefill_per_step=64)
    long = GenRequest("l", "heavy", _prompt(lm, 700, 1), 4)
    eng.submit(long, RequestHandle(long))
    eng.step()
    eng.step()
    now = __import__("time").monotonic()
    assert eng.stats.generated_tokens == 0 and eng.prefilling
    weight = eng.costs.prefill_weight()
    assert 0.01 <= weight <= 1.0
    assert policy.usage("heavy", now) > 0 and policy.usage("light", now) == 0
    while eng.step():
        pass
    assert policy.usage("heavy", __import__("time").monotonic()) > 4       # its prompt's share and its 4 tokens
