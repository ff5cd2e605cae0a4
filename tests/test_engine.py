"""The continuous-batching engine on real tiny models: exactness (batched == alone == HF generate),
join/leave mid-batch, seeded sampling, stop strings, streaming, cancellation, mixed LoRA batches."""
from __future__ import annotations

import time

import pytest
import torch

from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model
from kernos.kernel.llm.types import Final, Finish, GenRequest, RequestHandle, TextDelta

TEXTS = ["hello world", "what is the capital of france and the agent kernel memory", "one two",
         "memory storage schedule batch cache tool file read write plan search list run stop the model",
         "red", "the answer to the question of the small fast model is seven"]
MAX_TOKENS = [20, 7, 33, 12, 25, 16]


@pytest.fixture(scope="module", params=["llama", "mixtral", "jamba"])
def lm(request, tiny_models, tmp_path_factory):
    # float32: exact recompute (bf16 is tested in test_cpu_speed.py)
    return load_model(ModelConfig(name=request.param, path=str(tiny_models[request.param]), dtype="float32"),
                      EngineConfig(), tmp_path_factory.mktemp("data"))


def prompt_ids(lm, text):
    out = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def run(lm, reqs: list[GenRequest], batch: int, stagger: float = 0.0, engine=None):
    eng = engine or TransformersEngine(lm, max_batch_size=batch)
    if engine is None:
        eng.start()
    handles = []
    for r in reqs:
        h = RequestHandle(r)
        eng.submit(r, h)
        handles.append(h)
        if stagger:
            time.sleep(stagger)
    results = [h.result(timeout=120) for h in handles]
    if engine is None:
        assert eng.drain(5)
    return results, eng


def greedy_reqs(lm, **kw):
    return [GenRequest(f"r{i}", "a", prompt_ids(lm, t), m, **kw) for i, (t, m) in enumerate(zip(TEXTS, MAX_TOKENS))]


def test_batched_equals_unbatched_and_generate(lm):
    alone, _ = run(lm, greedy_reqs(lm), batch=1)
    batched, eng = run(lm, greedy_reqs(lm), batch=8)
    assert eng.stats.batch_rows / eng.stats.decode_steps > 2, "requests were not decoded together"
    for req, a, b in zip(greedy_reqs(lm), alone, batched):
        ref = lm.model.generate(torch.tensor([req.prompt_ids]), max_new_tokens=req.max_tokens, do_sample=False,
                                eos_token_id=None)
        expected_ids = ref[0, len(req.prompt_ids):].tolist()
        assert a.token_ids == expected_ids
        assert b.token_ids == expected_ids
        assert b.text == lm.tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert b.completion_tokens == req.max_tokens and b.finish == Finish.LENGTH


def test_requests_joining_and_leaving_mid_batch_stay_exact(lm):
    alone, _ = run(lm, greedy_reqs(lm), batch=1)
    staggered, eng = run(lm, greedy_reqs(lm), batch=3, stagger=0.01)
    assert [r.token_ids for r in staggered] == [r.token_ids for r in alone]
    assert eng.stats.completed == len(TEXTS)


def test_rows_join_and_leave_in_place_and_stay_exact(lm):
    """Issue 33: rows come and go every few steps on a batch of tool-using agents. A joining row (shorter or
    longer than the batch) is written into the batch's own buffers and a leaving row is replaced by the last one,
    out of order; each reply is still the one it gets alone. On the written-out Llama step (which appends in
    place) the whole cache is copied into new buffers only when they run out of room, not at every join/leave."""
    from conftest import drive_engine

    reqs = [GenRequest(f"r{i}", "a", prompt_ids(lm, TEXTS[(i * 5) % 6] + " more" * (i % 4 * 6)), 2 + (i * 7) % 13)
            for i in range(14)]
    alone = {r.request_id: drive_engine(TransformersEngine(lm, 1), [r])[r.request_id].token_ids for r in reqs}
    eng = TransformersEngine(lm, max_batch_size=4)
    got = drive_engine(eng, reqs)
    assert {rid: f.token_ids for rid, f in got.items()} == alone
    joins_and_leaves = 2 * len(reqs)
    if eng.runner._step is not None:
        assert eng.batch.copies <= 6, (eng.batch.copies, joins_and_leaves)


def test_seeded_sampling_is_independent_of_batching(lm):
    kw = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone, _ = run(lm, greedy_reqs(lm, **kw), batch=1)
    batched, _ = run(lm, greedy_reqs(lm, **kw), batch=8)
    assert [r.token_ids for r in alone] == [r.token_ids for r in batched]
    other, _ = run(lm, greedy_reqs(lm, temperature=0.9, top_p=0.9, top_k=50, seed=99), batch=8)
    assert [r.text for r in other] != [r.text for r in alone]


def test_stop_string_truncates_and_finishes(lm):
    [full], _ = run(lm, [GenRequest("r", "a", prompt_ids(lm, TEXTS[1]), 40)], batch=1)
    # A short ASCII piece from the middle of the output (random models emit some byte soup around it).
    import re
    pieces = [m for m in re.finditer(r"[a-z]{2}", full.text) if m.start() > 2]
    assert pieces, full.text
    stop = pieces[len(pieces) // 2].group()
    [cut], _ = run(lm, [GenRequest("r", "a", prompt_ids(lm, TEXTS[1]), 40, stop=[stop])], batch=1)
    assert cut.finish == Finish.STOP
    assert cut.text == full.text[:full.text.find(stop)]


def test_stream_deltas_add_up_to_the_final_text(lm):
    req = GenRequest("r", "a", prompt_ids(lm, TEXTS[0]), 30, stop=["zzzz"])
    eng = TransformersEngine(lm, 4)
    eng.start()
    h = RequestHandle(req)
    eng.submit(req, h)
    deltas, final = [], None
    while final is None:
        ev = h._q.get(timeout=60)
        if isinstance(ev, TextDelta):
            deltas.append(ev.text)
        elif isinstance(ev, Final):
            final = ev
    eng.drain(5)
    assert len(deltas) > 1
    assert "".join(deltas) == final.text


def test_cancel_frees_the_slot_and_others_continue(lm):
    eng = TransformersEngine(lm, max_batch_size=1)
    eng.start()
    long = GenRequest("long", "a", prompt_ids(lm, TEXTS[0]), 2000)
    h_long = RequestHandle(long)
    eng.submit(long, h_long)
    short = GenRequest("short", "b", prompt_ids(lm, TEXTS[2]), 5)
    h_short = RequestHandle(short)
    eng.submit(short, h_short)
    time.sleep(0.05)
    h_long.cancel()
    assert h_long.result(timeout=60).finish == Finish.CANCELLED
    assert h_short.result(timeout=60).completion_tokens == 5
    assert eng.drain(5)


def test_mixed_adapter_batch_matches_each_adapter_alone(tiny_models, lora_adapters, tmp_path):
    lm = load_model(ModelConfig(name="l", path=str(tiny_models["llama"]),
                                adapters={k: str(v) for k, v in lora_adapters.items()}), EngineConfig(), tmp_path)
    ids = prompt_ids(lm, TEXTS[1])

    def reqs():
        return [GenRequest(f"r{i}", "a", ids, 15, adapter=a) for i, a in enumerate(["alpha", "beta", None, "alpha"])]
    alone, _ = run(lm, reqs(), batch=1)
    mixed, _ = run(lm, reqs(), batch=8)
    assert [r.text for r in mixed] == [r.text for r in alone]
    assert alone[0].text == alone[3].text
    assert len({alone[0].text, alone[1].text, alone[2].text}) == 3, "adapters must change the output"


def test_drain_lets_running_generation_finish(lm):
    eng = TransformersEngine(lm, 4)
    eng.start()
    req = GenRequest("r", "a", prompt_ids(lm, TEXTS[0]), 60)
    h = RequestHandle(req)
    eng.submit(req, h)
    time.sleep(0.02)
    assert eng.drain(60)
    final = h.result(timeout=1)
    assert final.finish == Finish.LENGTH and final.completion_tokens == 60


def test_a_long_prompt_prefills_between_decode_steps_and_stays_exact(lm):
    """Issues 33/34: an admitted prompt runs a few chunks a step (`prefill_per_step` tokens) between the running
    batch's decode steps, so a row that is decoding keeps getting tokens while a long prompt prefills; both replies
    are the ones they get alone. A prefill suspended between chunks keeps what its chunks computed resident and
    continues from it when resumed, still exact; one cancelled between chunks ends at once."""
    from conftest import drive_engine

    short = GenRequest("short", "a", prompt_ids(lm, TEXTS[0]), 30)
    long_ids = prompt_ids(lm, " ".join(TEXTS) * 2)
    alone = {r.request_id: drive_engine(TransformersEngine(lm, 1, prefill_per_step=0), [r])[r.request_id].token_ids
             for r in (short, GenRequest("long", "a", long_ids, 5))}
    eng = TransformersEngine(lm, 4, prefill_chunk=8, prefill_per_step=8, resident_bytes=1 << 30)
    hs = RequestHandle(short)
    eng.submit(short, hs)
    while not eng.rows:
        eng.step()
    long = GenRequest("long", "a", long_ids, 5)
    hl = RequestHandle(long)
    eng.submit(long, hl)
    during = 0                                  # decode steps of the short row while the long prompt prefilled
    while eng.step():
        during += bool(eng.prefilling and eng.rows)
    assert during >= min(20, len(long_ids) // 8 - 1), "the short row waited for the whole long prompt"
    assert hs.result(timeout=1).token_ids == alone["short"] and hl.result(timeout=1).token_ids == alone["long"]

    eng = TransformersEngine(lm, 4, prefill_chunk=8, prefill_per_step=8, resident_bytes=1 << 30)
    again = GenRequest("long", "a", long_ids, 5)
    h = RequestHandle(again)
    eng.submit(again, h)
    for _ in range(3):
        eng.step()
    assert eng.prefilling and eng.prefilling[0].prompt.pos == 24
    eng.suspend("long")
    eng.step()
    assert not eng.prefilling and eng.waiting.items[0].parked and eng.resident.entries
    eng.resume("long")
    while eng.step():
        pass
    assert h.result(timeout=1).token_ids == alone["long"] and eng.stats.prefix_tokens_reused == 24
    gone = GenRequest("gone", "a", long_ids + [long_ids[-1]], 5)
    h = RequestHandle(gone)
    eng.submit(gone, h)
    eng.step()
    h.cancel()
    eng.step()
    assert h.result(timeout=1).finish == Finish.CANCELLED and not eng.prefilling


def test_a_prompt_of_several_chunks_prefilled_at_once_equals_generate(lm):
    """A prompt prefilled whole (prefill_tokens_per_step 0, as samples of one prompt and scored prompts are)
    runs all its chunks, the last one short included (it stopped one chunk early: a wrong first token)."""
    ids = prompt_ids(lm, " ".join(TEXTS) * 3)
    assert len(ids) % 16 and len(ids) > 3 * 16
    eng = TransformersEngine(lm, 1, prefill_chunk=16, prefill_per_step=0)
    eng.start()
    got, _ = run(lm, [GenRequest("w", "a", ids, 6)], batch=1, engine=eng)
    eng.drain(5)
    ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert got[0].token_ids == ref[0, len(ids):].tolist()


def test_the_policy_orders_the_prompts_being_prefilled(lm):
    """Admitted prompts get their chunks in the policy's order: under the program policy the prompt of the
    program with the least attained service first, though it arrived later."""
    from kernos.scheduler import ProgramPolicy, Programs

    table = Programs()
    old, new = table.begin("a", "old"), table.begin("a", "new")
    old.computed(100_000)                          # a long-running program ...
    eng = TransformersEngine(lm, 4, policy=ProgramPolicy(level_tokens=100), prefill_chunk=8, prefill_per_step=8)
    ids = prompt_ids(lm, " ".join(TEXTS))
    first = GenRequest("old-call", "a", ids, 3, program_id="old", program=old)
    eng.submit(first, RequestHandle(first))
    eng.step()
    later = GenRequest("new-call", "a", ids + ids[-3:], 3, program_id="new", program=new)   # ... and a new one
    eng.submit(later, RequestHandle(later))
    eng.step()
    progress = {s.req.request_id: s.prompt.pos for s in eng.prefilling}
    assert progress == {"old-call": 8, "new-call": 8}
    eng.step()
    assert {s.req.request_id: s.prompt.pos for s in eng.prefilling} == {"old-call": 8, "new-call": 16}
    assert new.service == 16 and old.service == 100_008        # counted chunk by chunk, as they run
    while eng.step():
        pass
    assert new.service >= len(later.prompt_ids) and old.service >= 100_000 + len(ids)
