"""Every sampling field on the own engine (issue 32): penalties, logit bias, min-p, stop token ids, a length floor
and ignoring EOS, each checked against a reference computation written here from the fields' definitions, on rows
batched side by side with rows that set other fields or none."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model
from kernos.kernel.llm.sampling import shape
from kernos.kernel.llm.types import Finish, GenRequest, RequestHandle, Shaping


@pytest.fixture(scope="module")
def lm(tiny_models, tmp_path_factory):
    return load_model(ModelConfig(name="llama", path=str(tiny_models["llama"]), dtype="float32"),
                      EngineConfig(), tmp_path_factory.mktemp("data"))


def reference(row: torch.Tensor, x: Shaping, prompt: list[int], out: list[int], ends: set[int]) -> torch.Tensor:
    """The fields' definitions, token by token (OpenAI's penalties, vLLM's repetition penalty and length floor)."""
    row = row.float().clone()
    for t in range(row.shape[0]):
        if len(out) < x.min_tokens and t in ends:
            row[t] = float("-inf")
            continue
        row[t] = row[t] + x.logit_bias.get(t, 0.0)
        if x.repetition_penalty != 1.0 and (t in prompt or t in out):
            row[t] = row[t] / x.repetition_penalty if row[t] > 0 else row[t] * x.repetition_penalty
        if t in out:
            row[t] = row[t] - (x.frequency_penalty * out.count(t) + x.presence_penalty)
    return row


def test_shaping_matches_the_definitions():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(300, generator=g) * 4
    prompt, out = [1, 5, 5, 9, 250], [5, 7, 7, 7, 299, 1]
    for x in (Shaping(frequency_penalty=0.7), Shaping(presence_penalty=-1.5), Shaping(repetition_penalty=1.8),
              Shaping(repetition_penalty=0.6, logit_bias={7: -3.0, 12: 100.0}),
              Shaping(frequency_penalty=2, presence_penalty=0.5, repetition_penalty=1.2, logit_bias={0: 1.5},
                      min_tokens=10), Shaping(min_tokens=3)):
        got = shape(row, x, prompt, out, {2, 299})
        assert torch.equal(got, reference(row, x, prompt, out, {2, 299})), x
    assert torch.equal(row, torch.randn(300, generator=torch.Generator().manual_seed(3)) * 4)   # a copy


class Ref(LogitsProcessor):
    def __init__(self, x: Shaping, prompt_len: int):
        self.x, self.n = x, prompt_len

    def __call__(self, input_ids, scores):
        ids = input_ids[0].tolist()
        scores[0] = reference(scores[0], self.x, ids[:self.n], ids[self.n:], set(self.x.stop_token_ids))
        return scores


def _ids(lm, text):
    out = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _run(lm, reqs, batch):
    engine = TransformersEngine(lm, max_batch_size=batch)
    engine.start()
    handles = []
    for r in reqs:
        handles.append(RequestHandle(r))
        engine.submit(r, handles[-1])
    out = [h.result(timeout=120) for h in handles]
    assert engine.drain(5)
    return out, engine


def test_each_field_batched_beside_others_equals_alone_and_the_reference(lm):
    eos = min(lm.eos_ids)
    prompts = ["the agent kernel memory tool"]
    greedy = [Shaping(), Shaping(frequency_penalty=1.5), Shaping(presence_penalty=2.0),
              Shaping(repetition_penalty=1.7), Shaping(logit_bias={100: 6.0, 101: 5.5}),
              Shaping(frequency_penalty=-0.5, repetition_penalty=0.8, logit_bias={300: -100.0}),
              Shaping(stop_token_ids=[73])]

    def reqs():
        out = [GenRequest(f"g{i}", "a", _ids(lm, prompts[0]), 14, shaping=x) for i, x in enumerate(greedy)]
        out += [GenRequest("eos", "a", _ids(lm, "stop"), 9, shaping=Shaping(logit_bias={eos: 100.0},
                                                                            ignore_eos=True)),
                GenRequest("floor", "a", _ids(lm, "stop"), 9, shaping=Shaping(logit_bias={eos: 100.0},
                                                                              min_tokens=4)),
                GenRequest("minp", "a", _ids(lm, "sample"), 12, temperature=1.3, seed=7,
                           shaping=Shaping(min_p=0.3, presence_penalty=0.4))]
        return out

    together, engine = _run(lm, reqs(), 16)
    assert engine.stats.batch_rows / engine.stats.decode_steps > 4, "the rows were not decoded together"
    alone = [_run(lm, [r], 1)[0][0] for r in reqs()]
    assert [f.token_ids for f in together] == [f.token_ids for f in alone]
    by_id = {r.request_id: f for r, f in zip(reqs(), together)}
    for i, x in enumerate(greedy):
        req = reqs()[i]
        ref = lm.model.generate(torch.tensor([req.prompt_ids]), max_new_tokens=req.max_tokens, do_sample=False,
                                eos_token_id=None, logits_processor=LogitsProcessorList([Ref(x, len(req.prompt_ids))]))
        expected = ref[0, len(req.prompt_ids):].tolist()
        if x.stop_token_ids and x.stop_token_ids[0] in expected:
            expected = expected[:expected.index(x.stop_token_ids[0])]      # a stop token ends it, unwritten
        assert by_id[f"g{i}"].token_ids == expected, x
    plain = by_id["g0"].token_ids
    assert all(by_id[f"g{i}"].token_ids != plain for i in range(1, 6))        # each field has its effect
    assert set(by_id["g4"].token_ids) <= {100, 101}
    assert 73 in plain and by_id["g6"].token_ids == plain[:plain.index(73)] and by_id["g6"].finish == Finish.STOP
    assert by_id["eos"].token_ids == [eos] * 9 and by_id["eos"].finish == Finish.LENGTH   # EOS is a token
    assert by_id["floor"].completion_tokens == 4 and by_id["floor"].finish == Finish.STOP
    assert eos not in by_id["floor"].token_ids
    # min-p: every sampled token was at least 0.3 times as likely as the best one (after the penalty)
    x, r = Shaping(presence_penalty=0.4), reqs()[-1]
    ids = list(r.prompt_ids)
    for tok in by_id["minp"].token_ids:
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(reference(logits, x, r.prompt_ids, ids[len(r.prompt_ids):], set()) / 1.3, -1)
        assert p[tok] >= 0.3 * p.max() - 1e-6
        ids.append(tok)


def test_a_snapshot_keeps_the_fields(lm, tmp_path):
    """A request's shaping survives a checkpoint: the restored one continues as the uninterrupted one."""
    from kernos.kernel.llm.engine import snapshot

    req = GenRequest("s", "a", _ids(lm, "one two three"), 10,
                     shaping=Shaping(frequency_penalty=1.0, logit_bias={5: 2.0}, stop_token_ids=[9], min_tokens=2))
    snapshot.write_folder(tmp_path / "snap", snapshot.request_state(req, "llama"))
    back = snapshot.request(tmp_path / "snap", "s2")
    assert back.shaping == req.shaping


def test_scoring_a_prompt_equals_the_models_forward(lm):
    """prompt_logprobs: each prompt token's log-probability given those before it, as a direct forward gives it,
    over several scoring chunks; max_tokens 0 scores without generating, beside a row that generates."""
    ids = _ids(lm, "the agent kernel schedules memory and tools " * 40)       # > one 256-token chunk
    assert len(ids) > 300
    score = GenRequest("score", "a", ids, 0, prompt_logprobs=True, top_logprobs=3)
    both = GenRequest("both", "a", ids[:50], 6, prompt_logprobs=True, logprobs=True)
    plain = GenRequest("plain", "a", ids[:50], 6)
    (s, b, p), _ = _run(lm, [score, both, plain], 4)
    assert s.completion_tokens == 0 and s.token_ids == [] and s.finish == Finish.LENGTH
    assert b.token_ids == p.token_ids and len(b.logprobs) == 6
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    assert len(s.prompt_logprobs) == len(ids) and s.prompt_logprobs[0] == (ids[0], None, [])
    for i, (t, lp, top) in enumerate(s.prompt_logprobs[1:], start=1):
        assert t == ids[i] and abs(lp - float(ref[i - 1, t])) < 1e-4
        assert [a for a, _ in top] == ref[i - 1].topk(3).indices.tolist()
    assert len(b.prompt_logprobs) == 50
    assert all(x[0] == y[0] and abs(x[1] - y[1]) < 1e-4 for x, y in zip(b.prompt_logprobs[1:], s.prompt_logprobs[1:]))
