"""Prompt-lookup decoding (issue 33): drafts copied from a sequence's own tokens, verified in one forward on the
own CPU kernels. Output with drafts is identical to output without: greedy, seeded sampling, under a grammar,
preempted between drafts, and in a batch whose rows do not draft until one is left alone."""
from __future__ import annotations

import pytest
from conftest import drive_engine, load_with_threads

from kernos.kernel.llm import cpu_kernels
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.engine.lookup import PromptLookup
from kernos.kernel.llm.structured import OutputSpec, compile_matcher
from kernos.kernel.llm.types import GenRequest
from kernos.scheduler import RoundRobinPolicy

# copy-heavy prompts: a record to restate, a list to repeat, a sentence to quote
TEXTS = ["Repeat this record exactly: name=alice; role=admin; team=kernel; name=alice; role=admin; team=kernel;",
         "Copy the list: red green blue red green blue red green blue red green blue",
         "Quote: the kernel schedules agents, the kernel swaps caches, the kernel schedules agents again."]
RECORD = 'Fix this record: {"items": ["red", "green", "blue", "red", "green", "blue", "red"]}'
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                     "maxItems": 12}},
          "required": ["items"], "additionalProperties": False}


def test_drafts_continue_the_latest_occurrence_of_the_longest_suffix():
    lk = PromptLookup(k_max=8, n_max=3, n_min=2)
    lk.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [])
    lk.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [1, 2, 3])    # ends in 1 2 3: seen at 0..2, followed by 4 5 9 2
    assert lk.draft(room=100) == [4, 5, 9, 2]               # k starts at 4
    assert lk.draft(room=2) == [4, 5]                       # never past the reply's budget
    lk.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [1, 2, 3, 4, 5, 6, 2, 3])
    assert lk.draft(room=100) == [4, 5, 6, 2]               # "6 2 3" never seen; "2 3" last before "4 5 6 2"
    lk.observe(4, 4)
    assert lk.k == 8                                        # a draft taken whole: k doubles
    lk.observe(8, 1)
    assert lk.k == 4
    assert PromptLookup().draft(10) == []                   # nothing seen yet


def test_drafts_rest_after_failures_and_come_back():
    from kernos.kernel.llm.engine.lookup import REST_AFTER

    lk = PromptLookup(k_max=4, n_max=2, n_min=2)
    toks = [5, 6, 7] * 4
    lk.sync(toks, [])
    assert lk.draft(10)
    for _ in range(REST_AFTER - 1):
        lk.observe(lk.k, 0)
    assert lk.k == 1 and lk.draft(10) == [5]                 # halved to 1, still trying
    lk.observe(1, 0)                                        # one failure too many: a rest of 8 tokens
    assert lk.draft(10) == []
    lk.sync(toks + [5, 6, 7] * 3, [])                       # 9 tokens later it drafts again
    assert lk.draft(10) == [5]
    lk.observe(1, 1)
    assert lk.failures == 0 and lk.k == 2


@pytest.fixture(scope="module")
def lm(tiny_models, tmp_path_factory):
    if cpu_kernels.library() is None:
        pytest.skip("the own bf16 kernels do not run here (no AVX512-BF16 or no C compiler): no prompt lookup")
    return load_with_threads(tiny_models["llama"], 1, tmp_path_factory.mktemp("data"))


def _ids(lm, text):
    out = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _reqs(lm, **kw):
    return [GenRequest(f"r{i}", "a", _ids(lm, t), 40 + 8 * i, **kw) for i, t in enumerate(TEXTS)]


def _engine(lm, lookup: int, batch: int = 4, **kw) -> TransformersEngine:
    return TransformersEngine(lm, batch, prompt_lookup=lookup, **kw)


def _alone(lm, lookup: int, **kw) -> tuple[dict, int, int]:
    out, drafted, accepted = {}, 0, 0
    for r in _reqs(lm, **kw):
        e = _engine(lm, lookup)
        out.update(drive_engine(e, [r]))
        drafted, accepted = drafted + e.stats.draft_tokens, accepted + e.stats.draft_accepted
    return out, drafted, accepted


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.03, "top_k": 3, "seed": 5},
                                      {"logprobs": True, "top_logprobs": 3}])
def test_output_with_drafts_equals_output_without(lm, sampling):
    plain, drafted, _ = _alone(lm, 0, **sampling)
    assert drafted == 0
    fast, drafted, accepted = _alone(lm, 8, **sampling)
    assert drafted > 0 and accepted > 0, "the copy-heavy replies should take drafts"
    for rid, final in plain.items():
        assert fast[rid].token_ids == final.token_ids, rid
        assert fast[rid].text == final.text and fast[rid].finish == final.finish
        if sampling.get("logprobs"):
            assert fast[rid].logprobs == final.logprobs


def test_a_grammar_checks_drafted_tokens(lm):
    def reqs():
        spec = OutputSpec(response_format="json_schema", schema=SCHEMA)
        return [GenRequest(f"g{i}", "a", _ids(lm, RECORD), 60, output=spec, seed=i, temperature=0.03 * i, top_k=3,
                           matcher=compile_matcher(spec.grammar(), lm.tokenizer,
                                                   lm.model.get_output_embeddings().weight.shape[0]))
                for i in range(2)]
    for r_plain, r_fast in zip(reqs(), reqs()):
        plain = drive_engine(_engine(lm, 0), [r_plain])[r_plain.request_id]
        e = _engine(lm, 8)
        fast = drive_engine(e, [r_fast])[r_fast.request_id]
        assert fast.token_ids == plain.token_ids
        assert e.stats.draft_tokens > 0


def test_batched_rows_and_preempted_rows_stay_exact(lm):
    """Four rows side by side (no drafts while they share the batch, drafts once one is left), one of them
    preempted by swap and by recompute between its drafts: each row's tokens are those it makes alone without
    drafts."""
    plain, _, _ = _alone(lm, 0)
    e = _engine(lm, 8)
    together = drive_engine(e, _reqs(lm))
    for rid, final in plain.items():
        assert together[rid].token_ids == final.token_ids, rid
    assert e.stats.draft_tokens > 0, "the last row left alone drafts"
    for points in ({3: "swap", 9: "recompute"}, {2: "recompute", 5: "swap", 12: "swap"}):
        e = _engine(lm, 8, policy=RoundRobinPolicy(quantum=2))
        got = drive_engine(e, _reqs(lm), points, victim="r2")
        assert got["r2"].preemptions >= 1
        for rid, final in plain.items():
            assert got[rid].token_ids == final.token_ids, (rid, points)
