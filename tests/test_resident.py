"""Resident contexts: a prefilled prompt's KV is kept and reused by the next call whose prompt starts with the
same tokens, up to a prefill chunk boundary. A reply with reuse is the reply without, bit for bit, in float32
and bf16, on dense, MoE and hybrid models; never across adapters; within the cache budget."""
from __future__ import annotations

import time

import pytest
from conftest import drive_engine, load_with_threads

from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model
from kernos.kernel.llm.types import Finish, GenRequest, RequestHandle

SYSTEM = "you are the kernel agent: plan, search, read and write files, remember what matters, stop when done"


CHUNK = 8       # the tiny models' prompts are short: small chunks, so that they span several


@pytest.fixture(scope="module", params=[("llama", "float32"), ("mixtral", "float32"), ("jamba", "float32"),
                                        ("llama", "bfloat16")], ids=lambda p: "-".join(p))
def lm(request, tiny_models, tmp_path_factory):
    arch, dtype = request.param     # as a 2-core machine serves: bf16 on the own CPU kernels where they run
    return load_with_threads(tiny_models[arch], 1, tmp_path_factory.mktemp("data"), dtype, name=arch)


def engine_for(lm, resident: bool = True, **kw):
    return TransformersEngine(lm, 4, resident_bytes=(1 << 30) if resident else 0, prefill_chunk=CHUNK, **kw)


def chat(lm, turns: list[tuple[str, str]]) -> list[int]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for user, assistant in turns:
        msgs.append({"role": "user", "content": user})
        if assistant is not None:
            msgs.append({"role": "assistant", "content": assistant})
    out = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def one(engine, rid, prompt, max_tokens=12, **kw):
    return drive_engine(engine, [GenRequest(rid, "a", prompt, max_tokens, **kw)])[rid]


def test_next_turn_reuses_the_conversation_and_replies_the_same(lm):
    engine = engine_for(lm)
    p1 = chat(lm, [("hello there", None)])
    r1 = one(engine, "t1", p1)
    # the next call extends the first one's tokens (a kernel context's next turn, or a tool follow-up)
    p2 = p1 + r1.token_ids + chat(lm, [("and then", None)])[-6:]
    got = one(engine, "t2", p2)
    last_boundary = (len(p1) - 1) // CHUNK * CHUNK      # hybrid: the Mamba state kept at the last boundary
    expected = last_boundary if lm.architecture == "hybrid" else len(p1) // CHUNK * CHUNK
    if engine.runner.position_exact:    # the whole first call is resident: its prompt and the reply it fed
        expected = len(p1) + len(r1.token_ids) - (r1.finish == Finish.LENGTH)
    assert engine.stats.prefix_tokens_reused == expected > 0, "the first call's prompt was not reused"
    assert got.token_ids == one(engine_for(lm, resident=False), "t2", p2).token_ids


def test_agents_share_a_system_prompt_prefix(lm):
    engine = engine_for(lm)
    a, b = chat(lm, [("what is in my files", None)]), chat(lm, [("plan my week please", None)])
    one(engine, "a", a)
    before = engine.stats.prefix_tokens_reused
    got = one(engine, "b", b)
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    if lm.architecture == "hybrid":   # a Mamba state holds all its tokens: no partial prefix serves
        assert engine.stats.prefix_tokens_reused == before
    else:
        shared = common if engine.runner.position_exact else common // CHUNK * CHUNK
        assert engine.stats.prefix_tokens_reused - before == shared > 0
    assert got.token_ids == one(engine_for(lm, resident=False), "b", b).token_ids


def test_sampled_reply_with_reuse_equals_without(lm):
    engine = engine_for(lm)
    p1 = chat(lm, [("tell me a story", None)])
    r1 = one(engine, "s1", p1, temperature=0.9, seed=3)
    p2 = p1 + r1.token_ids + [p1[-1]] * 3
    got = one(engine, "s2", p2, temperature=0.9, seed=4)
    assert engine.stats.prefix_tokens_reused > 0
    assert got.token_ids == one(engine_for(lm, resident=False), "s2", p2, temperature=0.9, seed=4).token_ids


def test_resident_caches_yield_to_running_requests_and_expire(lm):
    probe = TransformersEngine(lm, 4)
    probe._ensure_measured()
    prompts = [chat(lm, [(f"question number {i} about the files", None)]) for i in range(4)]
    budget = probe.cache_bytes_for(2 * len(prompts[0]) + 40)        # one request and a bit more
    engine = engine_for(lm, cache_budget_bytes=budget)
    for i, p in enumerate(prompts[:3]):
        one(engine, f"q{i}", p)
        assert 0 < engine.resident.nbytes <= budget
    held = engine.resident.nbytes
    big = prompts[3] + [prompts[3][-1]] * 20
    r = one(engine, "big", big, max_tokens=16)
    assert r.completion_tokens == 16
    assert engine.resident.evictions > 0 and engine.resident.nbytes <= max(held, budget)
    engine.resident.ttl_s = 0.01
    time.sleep(0.02)
    engine.resident.shrink(engine.resident.max_bytes)
    assert engine.resident.nbytes == 0 and not engine.resident.entries


def test_never_shared_across_adapters(tiny_models, lora_adapters, tmp_path):
    lm = load_model(ModelConfig(name="l", path=str(tiny_models["llama"]), dtype="float32",
                                adapters={k: str(v) for k, v in lora_adapters.items()}), EngineConfig(), tmp_path)
    engine = engine_for(lm)
    p = chat(lm, [("same prompt for everyone", None)])
    one(engine, "base", p)
    reused = engine.stats.prefix_tokens_reused
    got = one(engine, "alpha", p + [p[-1]], adapter="alpha")
    assert engine.stats.prefix_tokens_reused == reused, "a base-model prefix served an adapter's request"
    assert got.token_ids == one(engine_for(lm, resident=False), "alpha", p + [p[-1]], adapter="alpha").token_ids
    one(engine, "alpha2", p + [p[-1]] * 2, adapter="alpha")
    assert engine.stats.prefix_tokens_reused > reused                 # its own adapter's prefix serves


def test_position_exact_engine_reuses_a_conversation_to_its_last_token(tiny_models, tmp_path):
    """On the own CPU kernels a position's keys and values are the same prefilled or decoded: the next turn
    reuses the previous call's prompt and reply to the last shared token, and still replies the same."""
    from kernos.kernel.llm import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("the own bf16 kernels do not run here (no AVX512-BF16 or no C compiler)")
    lm = load_with_threads(tiny_models["llama"], 1, tmp_path)
    engine = engine_for(lm)
    assert engine.runner.position_exact and engine.costs.exact_recompute
    p1 = chat(lm, [("hello there", None)])
    r1 = one(engine, "c1", p1, max_tokens=10)
    fed = len(p1) + len(r1.token_ids) - (r1.finish == Finish.LENGTH)
    p2 = p1 + r1.token_ids[:5] + chat(lm, [("and then", None)])[-7:]      # shares 5 reply tokens, then differs
    got = one(engine, "c2", p2)
    assert engine.stats.prefix_tokens_reused == min(fed, len(p1) + 5) > len(p1)
    assert got.token_ids == one(engine_for(lm, resident=False), "c2", p2).token_ids
    # recompute (a prefill of decoded tokens) resumes exactly in bf16 here
    alone = one(engine_for(lm, resident=False), "long", p2, max_tokens=16)
    resumed = drive_engine(engine_for(lm, resident=False), [GenRequest("long", "a", p2, 16)], {3: "recompute"},
                           victim="long")["long"]
    assert resumed.preemptions == 1 and resumed.token_ids == alone.token_ids


def pinned(engine, owner):
    return [e for e in engine.resident.entries if e.owner == owner and e.pinned(time.monotonic())]


def test_kv_is_kept_through_a_tool_pause_and_reused_by_the_follow_up(lm, tmp_path):
    """A reply that ends in tool calls pins what its call computed for its program: other agents' prompts
    that push the resident cache past its budget evict unpinned entries first; the follow-up carrying the
    tool's result reuses the pinned prefix (counted), and replies as it would without any reuse."""
    engine = engine_for(lm, swap_dir=tmp_path / "swap")
    p1 = chat(lm, [("list the files in my home folder", None)])
    r1 = one(engine, "call1", p1, program_id="prog")
    engine.pause("call1", "prog", 30.0)
    engine.step()                                   # applied between two steps, on the engine's thread
    assert pinned(engine, "call1") and engine.snapshot()[0].pauses["pinned"] >= 1
    engine.resident.max_bytes = engine.resident.nbytes * 2       # room for about one more prompt
    for i in range(3):                              # other agents' calls, each wanting its prompt resident
        one(engine, f"other{i}", chat(lm, [(f"unrelated question {i} about the weather", None)]))
    assert engine.resident.evictions > 0 and pinned(engine, "call1"), "the pinned KV was evicted first"
    before = engine.stats.prefix_tokens_reused
    p2 = p1 + r1.token_ids + chat(lm, [("a.txt b.txt notes.md", None)])[-8:]     # the tool's result appended
    got = one(engine, "call2", p2, program_id="prog")
    if engine.runner.position_exact:
        expected = len(p1) + len(r1.token_ids) - (r1.finish == Finish.LENGTH)
    else:
        expected = ((len(p1) - 1) if lm.architecture == "hybrid" else len(p1)) // CHUNK * CHUNK
    assert engine.stats.prefix_tokens_reused - before == expected > 0
    assert engine.snapshot()[0].pauses["reused"] == 1 and not pinned(engine, "call1")     # the pin ended
    assert got.token_ids == one(engine_for(lm, resident=False), "call2", p2).token_ids


def test_a_pin_expires_with_its_ttl_and_is_swapped_or_dropped_under_pressure(lm, tmp_path):
    """A pin lasts its time-to-live. Under memory pressure a pinned entry goes last, to a file where writing it
    and reading it back costs less than re-prefilling its tokens (the engine's cost model), else it is dropped;
    a swapped entry is loaded again by the follow-up, which still replies exactly."""
    engine = engine_for(lm, swap_dir=tmp_path / "swap")
    p1 = chat(lm, [("read the report and summarise it", None)])
    one(engine, "c1", p1, program_id="prog")
    engine.pause("c1", "prog", 0.05)
    engine.step()
    assert pinned(engine, "c1")
    time.sleep(0.1)
    engine.resident.shrink(engine.resident.max_bytes)
    assert not pinned(engine, "c1") and engine.resident.entries and engine.resident.pins_expired == 1
    # the program's next call arrives late: what was pinned for it is held until the call is admitted
    late = GenRequest("c1b", "a", p1 + [p1[-1]], 4, program_id="prog")
    handle = RequestHandle(late)
    engine.submit(late, handle)
    engine._take_new_work()
    assert pinned(engine, "c1")
    while engine.step():
        pass
    assert handle.result(timeout=1).completion_tokens and engine.resident.pin_hits == 1
    assert not pinned(engine, "c1") and not pinned(engine, "c1b")
    engine.pause("c1b", "prog", 30.0)
    engine.step()
    # What c1b computed: its prompt and reply, and also its prompt alone when the reply that c1 left resident
    # does not extend it (c1b's last prompt token differs from c1's first reply token: it depends on the
    # tiny model's numbers, so on the dtype and the CPU).
    n = len(pinned(engine, "c1b"))
    engine.costs.prefill_s_per_token = 1.0        # re-prefilling is priced far above a file's round trip
    engine.resident.shrink(0)                     # running rows need every byte
    assert engine.resident.nbytes == 0 and engine.resident.pins_swapped == n >= 1
    entries = list(engine.resident.entries)
    assert len(entries) == n and all(e.cache is None and e.path.exists() for e in entries)
    files = {id(e): e.path for e in entries}
    p2 = p1 + chat(lm, [("the report says 42", None)])[-8:]
    before = engine.stats.prefix_tokens_reused
    got = one(engine, "c2", p2, program_id="prog")
    [entry] = [e for e in entries if e.cache is not None]        # the one the follow-up loaded back
    assert engine.stats.prefix_tokens_reused > before and entry.path is None and not files[id(entry)].exists()
    assert got.token_ids == one(engine_for(lm, resident=False), "c2", p2).token_ids
    engine.pause("c2", "prog", 30.0)                 # what c2 computed, and the entry it used
    engine.step()
    held = len(pinned(engine, "c2"))
    engine.costs.prefill_s_per_token = 1e-12      # now recomputing is the cheaper
    engine.resident.shrink(0)
    left = engine.resident.entries          # only a swapped entry c2 did not use: it holds no memory
    assert engine.resident.nbytes == 0 and engine.resident.pins_dropped == held >= 1
    assert len(left) == n - 1 and all(e.cache is None for e in left)
    assert sorted((tmp_path / "swap").glob("resident-*")) == sorted(e.path for e in left)
