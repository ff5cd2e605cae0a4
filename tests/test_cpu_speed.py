"""The CPU fast path: the automatic dtype, linears packed for oneDNN or for the own bf16 kernels, the decode
attention, the written-out Llama decode step, and the engine's exactness in bf16 (batched == alone; a
swapped-out sequence resumes exactly; auto preemption swaps)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import drive_engine, load_with_threads

from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm import cpu_kernels, cpu_speed
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model, resolve_dtype
from kernos.kernel.llm.types import GenRequest

TEXTS = ["hello world", "what is the capital of france and the agent kernel memory", "one two",
         "memory storage schedule batch cache tool file read write plan search list run stop the model"]


@pytest.fixture(scope="module")
def bf16(tiny_models, tmp_path_factory):
    """The tiny Llama in bf16 as a 2-core machine serves it: one compute thread, the own kernels if they run."""
    return load_with_threads(tiny_models["llama"], 1, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def bf16_onednn(tiny_models, tmp_path_factory):
    return load_with_threads(tiny_models["llama"], 2, tmp_path_factory.mktemp("data"))


def needs_kernels():
    if cpu_kernels.library() is None:
        pytest.skip("the own bf16 kernels do not run here (no AVX512-BF16 or no C compiler): oneDNN serves")


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


def test_packed_linears_give_the_same_bits_as_torch(bf16_onednn):
    packed = [m for m in bf16_onednn.model.modules() if hasattr(m, "_kernos_packed")]
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
    if masked:      # float32 with a padding mask: transformers' own result, without its per-head copies of the cache
        assert torch.equal(got, ref)


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


def _linear(n: int, k: int, bias: bool) -> torch.nn.Linear:
    layer = torch.nn.Linear(k, n, bias=bias).bfloat16()
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("n,k,bias", [(64, 64, False), (100, 64, True), (1536, 576, False), (192, 1536, True)])
def test_own_linear_kernel_is_float_accurate_and_a_row_does_not_depend_on_its_batch(n, k, bias):
    needs_kernels()
    layer = _linear(n, k, bias)
    packed = cpu_kernels.PackedWeight(layer.weight, layer.bias)
    x = torch.randn(13, k).bfloat16()
    got = packed(x)
    ref = x.float() @ layer.weight.float().t() + (layer.bias.float() if bias else 0)
    assert got.shape == (13, n) and got.dtype == torch.bfloat16
    # fp32 sums rounded once to bf16: within bf16's rounding of the exact result
    torch.testing.assert_close(got.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
    for rows in range(1, 13):                       # any batch size, any position in the batch
        assert torch.equal(packed(x[:rows]), got[:rows])
        assert torch.equal(packed(x[rows:rows + 1]), got[rows:rows + 1])
    assert torch.equal(packed(x.view(13, 1, k)).view(13, n), got)


@pytest.mark.parametrize("amx", [False, True])
def test_amx_and_avx512_linears_are_accurate_and_a_row_never_depends_on_its_batch(amx):
    """AMX multiplies 16 rows at a time: row counts across that edge (1 to 37) give each row the same bits."""
    needs_kernels()
    if amx and "amx_bf16" not in cpu_speed.cpu_flags():
        pytest.skip("no AMX on this CPU")
    state = cpu_kernels.amx_enabled()
    try:
        assert cpu_kernels.use_amx(amx) == amx
        layer = _linear(1536, 576, bias=True)
        packed = cpu_kernels.PackedWeight(layer.weight, layer.bias)
        x = torch.randn(37, 576).bfloat16()
        got = packed(x)
        ref = x.float() @ layer.weight.float().t() + layer.bias.float()
        torch.testing.assert_close(got.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)
        for rows in (1, 2, 15, 16, 17, 31, 32, 33):
            assert torch.equal(packed(x[:rows]), got[:rows]), rows
            assert torch.equal(packed(x[rows:rows + 1]), got[rows:rows + 1]), rows
        if amx:        # the other path: the same tiles, sums in another order (within a rounding)
            cpu_kernels.use_amx(False)
            other = packed(x)
            assert ((other.float() - got.float()).abs() <= 2 ** -6 * got.float().abs() + 1e-3).all()
    finally:
        cpu_kernels.use_amx(state)


def test_attention_rows_shared_with_helper_threads_are_computed_as_alone():
    """A prompt chunk's rows (and a batch's) split between the caller and the helper threads: each row's bits
    are those of the row computed by itself."""
    needs_kernels()
    assert cpu_kernels.start_helpers(1) >= 1
    kv, length, d = 3, 700, 64
    keys, values = torch.randn(1, kv, length, d).bfloat16(), torch.randn(1, kv, length, d).bfloat16()
    q = torch.randn(96, 9, d).bfloat16()
    start = torch.zeros(96, dtype=torch.int32)
    end = torch.arange(length - 95, length + 1, dtype=torch.int32)
    shared = cpu_kernels.attention(q, keys, values, start, end, 0.125, one_sequence=True)
    for m in (0, 1, 47, 95):
        alone = cpu_kernels.attention(q[m:m + 1], keys, values, start[m:m + 1], end[m:m + 1], 0.125, True)
        assert torch.equal(shared[m:m + 1], alone), m
    batch_k, batch_v = torch.randn(6, kv, length, d).bfloat16(), torch.randn(6, kv, length, d).bfloat16()
    starts = torch.tensor([0, 5, 300, 0, 699, 42], dtype=torch.int32)
    ends = torch.full((6,), length, dtype=torch.int32)
    rows = cpu_kernels.attention(q[:6], batch_k, batch_v, starts, ends, 0.125)
    for m in range(6):
        alone = cpu_kernels.attention(q[m:m + 1], batch_k[m:m + 1], batch_v[m:m + 1], starts[m:m + 1], ends[m:m + 1],
                                      0.125)
        assert torch.equal(rows[m:m + 1], alone), m


def test_fused_linears_compute_exactly_what_their_parts_do():
    needs_kernels()
    for sizes in ((128, 64, 64), (64, 32, 32)):        # whole tiles (views, no copy) and partial ones
        layers = [_linear(n, 64, bias=i == 1) for i, n in enumerate(sizes)]
        for layer in layers:
            layer._kernos_packed = cpu_kernels.PackedWeight(layer.weight, layer.bias)
        fused = cpu_kernels.PackedWeight.fuse(layers)
        x = torch.randn(5, 64).bfloat16()
        parts = fused(x).split(list(sizes), dim=-1)
        for layer, part in zip(layers, parts, strict=True):
            assert torch.equal(part, layer._kernos_packed(x))


@pytest.mark.parametrize("h,kv,d", [(6, 2, 32), (9, 3, 64), (8, 2, 64), (8, 4, 128), (5, 1, 48), (2, 2, 16)])
def test_decode_attention_reads_only_each_rows_own_columns(h, kv, d):
    needs_kernels()
    b, cap, length = 3, 40, 17
    q = torch.randn(b, h, d).bfloat16()
    keys, values = torch.randn(b, kv, cap, d).bfloat16(), torch.randn(b, kv, cap, d).bfloat16()
    start = torch.tensor([0, 5, 16], dtype=torch.int32)
    end = torch.full_like(start, length)
    got = cpu_kernels.attention(q, keys[:, :, :length], values[:, :, :length], start, end, d ** -0.5)
    for row in range(b):
        s = int(start[row])
        k = keys[row, :, s:length].float().repeat_interleave(h // kv, 0)
        v = values[row, :, s:length].float().repeat_interleave(h // kv, 0)
        p = torch.softmax(torch.einsum("hd,hld->hl", q[row].float(), k) * d ** -0.5, -1)
        torch.testing.assert_close(got[row].float(), torch.einsum("hl,hld->hd", p, v), atol=2e-2, rtol=2e-2)
    keys[1, :, :5] = float("nan")                      # padding holds anything: it is never read
    values[2, :, :16] = float("inf")
    again = cpu_kernels.attention(q, keys[:, :, :length], values[:, :, :length], start, end, d ** -0.5)
    assert torch.equal(again, got)


def test_elementwise_kernels_match_torch():
    needs_kernels()
    from kernos.kernel.llm.engine import llama_step

    h, delta = torch.randn(4, 96).bfloat16(), torch.randn(4, 96).bfloat16()
    norm = type("Norm", (), {"weight": torch.randn(96).bfloat16(), "variance_epsilon": 1e-5})()
    expected_h = h + delta
    out = cpu_kernels.add_rmsnorm(h, delta, norm.weight, 1e-5)
    assert torch.equal(h, expected_h)                  # the residual stream is updated in place
    torch.testing.assert_close(out.float(), llama_step._rms_norm(norm, expected_h).float(), atol=3e-2, rtol=1e-2)

    heads, kv, d = 3, 1, 16
    qkv = torch.randn(2, (heads + 2 * kv) * d).bfloat16()
    cos, sin = torch.randn(2, d).bfloat16(), torch.randn(2, d).bfloat16()
    keys, values = torch.zeros(2, kv, 8, d, dtype=torch.bfloat16), torch.zeros(2, kv, 8, d, dtype=torch.bfloat16)
    q = cpu_kernels.rope_append(qkv, heads, kv, cos, sin, keys, values, 5)
    tq, tk, tv = qkv.view(2, heads + 2 * kv, d).split([heads, kv, kv], dim=1)
    c, s = cos[:, None], sin[:, None]
    assert torch.equal(q, (tq * c) + (llama_step._rotate_half(tq) * s))          # rounded as torch rounds
    assert torch.equal(keys[:, :, 5], (tk * c) + (llama_step._rotate_half(tk) * s))
    assert torch.equal(values[:, :, 5], tv)
    assert not keys[:, :, :5].any() and not values[:, :, 6:].any()

    gate_up = torch.randn(3, 2 * 40).bfloat16() * 4
    gate, up = gate_up.split(40, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up).float(), (F.silu(gate) * up).float(),
                               atol=2e-2, rtol=1e-2)


def _prefilled_batch(runner, prompts):
    """The prompts prefilled one by one and joined as the engine's running batch joins them."""
    import copy
    import threading
    import types

    from kernos.kernel.llm.engine.batch import RunningBatch

    batch = RunningBatch(threading.Lock())
    for p in prompts:
        _, past, m, _ = runner.prefill(p, None)
        batch.join(types.SimpleNamespace(), past, m)
    return batch.cache, copy.deepcopy(batch.cache), batch.mask


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def _decode(runner, prompts, steps, first=30, with_transformers=False):
    """Greedy steps of the written-out decode step (and of transformers' forward beside it, on a copy)."""
    from kernos.kernel.llm.engine.runner import cache_of

    cache, ref_cache, mask = _prefilled_batch(runner, prompts)
    ids = torch.tensor([[first + i] for i in range(len(prompts))])
    pos = torch.tensor([[len(p)] for p in prompts])
    out = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        got = runner._step(ids, pos, mask, cache)
        ref = None
        if with_transformers:
            res = runner.forward(ids, mask, pos, ref_cache, [None] * len(prompts), last_only=True)
            ref, ref_cache = res.logits, cache_of(res)
        out.append((got, ref, cache, ref_cache))
        ids, pos = got[:, -1].argmax(-1, keepdim=True), pos + 1
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_step_equals_transformers_bit_for_bit(tiny_models, tmp_path, dtype):
    from kernos.kernel.llm.engine.runner import ModelRunner

    runner = ModelRunner(load_with_threads(tiny_models["llama"], 2, tmp_path, dtype))    # not on own kernels
    assert runner._step is not None and runner._step.kernels is None
    with torch.inference_mode():
        for got, ref, cache, ref_cache in _decode(runner, PROMPTS, 4, with_transformers=True):
            assert torch.equal(got, ref)
            for a, b in zip(cache.layers, ref_cache.layers, strict=True):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_llama_step_on_own_kernels_is_close_to_transformers_and_batched_equals_alone(bf16):
    needs_kernels()
    from kernos.kernel.llm.engine.runner import ModelRunner

    runner = ModelRunner(bf16)
    assert runner._step.kernels is not None
    with torch.inference_mode():
        batched = _decode(runner, PROMPTS, 4, with_transformers=True)
        for got, ref, _, _ in batched:
            torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
        for i, prompt in enumerate(PROMPTS):
            alone = _decode(runner, [prompt], 4, first=30 + i)
            assert all(torch.equal(a[0][0], b[0][i]) for a, b in zip(alone, batched, strict=True)), i


def test_adapters_and_other_architectures_keep_transformers_forward(tiny_models, lora_adapters, tmp_path):
    from kernos.kernel.llm.engine import llama_step

    for arch in ("mixtral", "jamba"):
        lm = load_model(ModelConfig(name=arch, path=str(tiny_models[arch])), EngineConfig(), tmp_path)
        assert not llama_step.supported(lm.model)
    lm = load_model(ModelConfig(name="llama", path=str(tiny_models["llama"]),
                                adapters={"alpha": str(lora_adapters["alpha"])}), EngineConfig(), tmp_path)
    assert not llama_step.supported(lm.model)
