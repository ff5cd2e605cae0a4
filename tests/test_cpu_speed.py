"""The CPU fast path: the automatic dtype, linears packed for oneDNN, the decode attention, and the engine's
exactness in bf16 (batched == alone; a swapped-out sequence resumes exactly; auto preemption swaps)."""
from __future__ import annotations

import pytest
import torch
from conftest import drive_engine

from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm import cpu_speed
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model, resolve_dtype
from kernos.kernel.llm.types import GenRequest

TEXTS = ["hello world", "what is the capital of france and the agent kernel memory", "one two",
         "memory storage schedule batch cache tool file read write plan search list run stop the model"]


@pytest.fixture(scope="module")
def bf16(tiny_models, tmp_path_factory):
    return load_model(ModelConfig(name="llama", path=str(tiny_models["llama"]), dtype="bfloat16"), EngineConfig(),
                      tmp_path_factory.mktemp("data"))


def ids(lm, text):
    out = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def reqs(lm, **kw):
    return [GenRequest(f"r{i}", "a", ids(lm, t), 12 + 5 * i, **kw) for i, t in enumerate(TEXTS)]


def test_auto_dtype_follows_the_cpu_and_keeps_hybrid_models_in_float32():
    cpu = torch.device("cpu")
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_speed.cpu_flags())
    assert resolve_dtype("auto", cpu) == cpu_speed.fast_cpu_dtype()
    if not native:
        assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, "hybrid") == torch.float32
    assert resolve_dtype("bfloat16", cpu, "hybrid") == torch.bfloat16      # an explicit dtype wins


def test_packed_linears_give_the_same_bits_as_torch(bf16):
    packed = [m for m in bf16.model.modules() if hasattr(m, "_kernos_packed")]
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU: linears are not packed")
    assert packed, "no linear layer was packed"
    layer = packed[0]
    for shape in ((1, layer.in_features), (5, layer.in_features), (3, 7, layer.in_features)):
        x = torch.randn(*shape).bfloat16()
        with torch.inference_mode():
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    with torch.enable_grad():                          # training through the layer takes torch's own path
        x = torch.randn(2, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None


@pytest.mark.parametrize("queries", [1, 6])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_matches_sdpa(masked, queries):
    """Decode steps (one query) and prompt chunks (the last `queries` of the positions, causal)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = type("M", (), {"num_key_value_groups": 3, "is_causal": True})()
    b, h, kv, length, d = 4, 9, 3, 37, 16
    q, k, v = torch.randn(b, h, queries, d), torch.randn(b, kv, length, d), torch.randn(b, kv, length, d)
    causal = torch.ones(queries, length, dtype=torch.bool).tril(length - queries)
    mask = None
    if masked:
        mask = causal.expand(b, 1, queries, length).clone()
        mask[1, ..., :10] = False                      # left padding of a shorter row
        mask[3, ..., :30] = False
    got, _ = cpu_speed.cpu_attention(module, q, k, v, mask, scaling=d ** -0.5)
    ref_mask = mask if masked else causal.expand(b, 1, queries, length)
    ref, _ = sdpa_attention_forward(module, q, k, v, ref_mask, scaling=d ** -0.5)
    assert got.shape == ref.shape == (b, queries, h, d)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bf16_engine_batched_equals_alone_and_swaps_exactly(bf16):
    assert bf16.dtype == torch.bfloat16
    alone = {r.request_id: drive_engine(TransformersEngine(bf16, 1), [r])[r.request_id] for r in reqs(bf16)}
    batched = drive_engine(TransformersEngine(bf16, 8), reqs(bf16))
    for rid, final in alone.items():
        assert batched[rid].token_ids == final.token_ids, rid
    engine = TransformersEngine(bf16, 8)
    assert engine.choose_strategy(type("S", (), {"position": 5000})()) == "swap"   # recompute would drift
    got = drive_engine(engine, reqs(bf16), {2: "swap", 5: "swap"}, victim="r1")
    assert got["r1"].preemptions == 2
    for rid, final in alone.items():
        assert got[rid].token_ids == final.token_ids, rid
