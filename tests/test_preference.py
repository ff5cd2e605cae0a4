"""Preference fine-tuning (DPO and KTO, through TRL's trainers): the data sets built from episodes and their
feedback, the trainers on the tiny models (their own loss falls, the held-out preference moves the right way,
the adapter hot-loads into a running engine and scores there as it did in training), cancel and resume."""
from __future__ import annotations

import math

import pytest

from kernos.kernel.config import EngineConfig, ModelConfig
from kernos.kernel.llm.engine import TransformersEngine
from kernos.kernel.llm.registry import load_model
from kernos.kernel.llm.types import GenRequest, RequestHandle
from kernos.kernel.tuner import preference
from kernos.kernel.tuner.config import TrainConfig
from kernos.kernel.tuner.datasets import Episode
from kernos.kernel.tuner.preference_data import build_dpo, build_kto, check_rows
from kernos.kernel.tuner.train import DataError, load_base


def _ep(rid, prompt, reply, rewards=(), successes=(), preferred=None, tools=()):
    return Episode(rid, [{"role": "user", "content": prompt}], reply, "m", list(rewards), list(successes), preferred,
                   list(tools))


def test_dpo_pairs_corrections_and_differently_scored_replies_of_one_prompt():
    eps = [
        _ep("1", "A", "wrong", rewards=[0.0], preferred="right"),            # a correction
        _ep("2", "B", "good", rewards=[1.0]),
        _ep("3", "B", "bad", rewards=[0.0]),
        _ep("4", "B", "meh", rewards=[0.5], successes=[False]),              # mean of 0.5 and 0: 0.25
        _ep("5", "B", "good ", rewards=[1.0]),                               # the same reply again
        _ep("6", "C", "alone", rewards=[1.0]),                               # nothing to compare it with
        _ep("7", "D", "same", preferred="same"),                             # a correction that changes nothing
        _ep("8", "E", "x", rewards=[1.0]), _ep("9", "E", "y", rewards=[1.0]),   # a tie: no preference
    ]
    train, evals, card = build_dpo(eps, eval_fraction=0.0)
    rows = train + evals
    pairs = [(r["messages"][0]["content"], r["messages"][-1]["content"], r["rejected"]["content"], r["source"])
             for r in rows]
    assert pairs == [("A", "right", "wrong", "correction"), ("B", "good", "bad", "reward"),
                     ("B", "good", "meh", "reward")]
    assert card["sources"] == {"correction": 1, "reward": 2} and card["dropped"]["same_reply"] == 1
    assert all(r["messages"][-1]["role"] == r["rejected"]["role"] == "assistant" for r in rows)
    assert check_rows(rows, "dpo") is None and "kto needs 'label'" in check_rows(rows, "kto")
    # The split keeps a prompt's pairs together, whatever the fraction.
    for frac in (0.3, 0.5):
        train, evals, _ = build_dpo(eps, eval_fraction=frac)
        assert {r["episode"] for r in train}.isdisjoint({r["episode"] for r in evals}) and evals


def test_kto_labels_from_success_rewards_and_corrections():
    eps = [
        _ep("1", "A", "ok", successes=[True]),
        _ep("2", "A", "no", successes=[True, False]),
        _ep("3", "B", "up", rewards=[1.0]),
        _ep("4", "B", "down", rewards=[-1.0]),
        _ep("5", "B", "zero", rewards=[0.0]),                   # no sign, no threshold: no label
        _ep("6", "C", "bad", preferred="better"),
        _ep("7", "D", "both", rewards=[1.0]), _ep("8", "D", "both", rewards=[-1.0]),   # conflicting: dropped
        _ep("9", "D", "both", rewards=[1.0]),
    ]
    train, evals, card = build_kto(eps, eval_fraction=0.0)
    got = [(r["messages"][-1]["content"], r["label"]) for r in train + evals]
    assert got == [("ok", True), ("no", False), ("up", True), ("down", False), ("better", True), ("bad", False)]
    assert card["desirable"] == 3 and card["undesirable"] == 3 and card["dropped"]["conflicting"] == 2
    assert card["dropped"]["unlabelled"] == 1
    train, evals, _ = build_kto(eps, min_reward=0.0, eval_fraction=0.0)      # a threshold: 0 is desirable
    assert ("zero", True) in [(r["messages"][-1]["content"], r["label"]) for r in train + evals]
    assert check_rows(train, "kto") is None and "dpo needs 'rejected'" in check_rows(train, "dpo")


def colour_rows(n: int, method: str, seed: int = 0) -> list[dict]:
    """The answer depends on which colour word the question holds. DPO: the right answer beats the wrong one;
    KTO: alternately the right answer (desirable) and the wrong one (undesirable)."""
    from test_finetune import task

    rows = []
    for i, (question, right) in enumerate(task(n, seed)):
        wrong = "the answer is two" if right.endswith("one") else "the answer is one"
        user = {"role": "user", "content": question}
        if method == "dpo":
            rows.append({"messages": [user, {"role": "assistant", "content": right}],
                         "rejected": {"role": "assistant", "content": wrong}})
        else:
            rows.append({"messages": [user, {"role": "assistant", "content": right if i % 2 else wrong}],
                         "label": bool(i % 2)})
    return rows


def _engine_logp(eng, prompt: list[int], completion: list[int], adapter) -> float:
    """The completion's log-probability as the serving engine scores it (prompt_logprobs)."""
    h = RequestHandle(GenRequest("s", "a", prompt + completion, 0, prompt_logprobs=True, adapter=adapter))
    eng.submit(h.request, h)
    scored = h.result(timeout=60).prompt_logprobs
    return sum(lp for _, lp, _ in scored[len(prompt):])


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_trainer_reduces_its_loss_and_the_adapter_scores_the_same_when_served(tiny_models, tmp_path, method):
    rows = colour_rows(48, method)
    cfg = TrainConfig(learning_rate=3e-3, epochs=8, batch_size=8, checkpoint_every=1000)
    events = []
    res = preference.train(method, tiny_models["llama"], rows[:36], rows[36:], cfg, tmp_path / "job",
                           report=events.append)
    assert not res["cancelled"] and res["step"] == res["total"] == 8 * math.ceil(36 / 8)
    assert res["train_loss_last"] < res["train_loss_first"] * 0.95, res
    assert res["base"]["loss"] == pytest.approx(math.log(2) if method == "dpo" else 0.5, abs=1e-6)
    assert res["tuned"]["loss"] < res["base"]["loss"], res
    if method == "dpo":
        assert res["tuned"]["accuracy"] > res["base"]["accuracy"], res
    assert [e["phase"] for e in events if e["event"] == "eval"] == ["base", "tuned"]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == list(range(1, res["total"] + 1))
    # Hot-loaded into a running engine, the adapter scores held-out replies as the trained model did.
    _, tok = load_base(tiny_models["llama"])
    held = [preference.tokenize(tok, r, method, cfg.max_length) for r in rows[36:40]]
    lm = load_model(ModelConfig(name="l", path=str(tiny_models["llama"])), EngineConfig(), tmp_path)
    eng = TransformersEngine(lm, 4)
    eng.start()
    try:
        assert eng.load_adapter("a:pref", tmp_path / "job" / "adapter").result(60) == ["a:pref"]
        from peft import PeftModel

        trained = PeftModel.from_pretrained(load_base(tiny_models["llama"])[0], tmp_path / "job" / "adapter")
        want = preference.logps(trained, held, method)
        key = "chosen_ids" if method == "dpo" else "completion_ids"
        for ex, w in zip(held, want):
            served = _engine_logp(eng, ex["prompt_ids"], ex[key], "a:pref")
            assert served == pytest.approx(w[0], rel=1e-3, abs=1e-3)
            assert served != pytest.approx(_engine_logp(eng, ex["prompt_ids"], ex[key], None), abs=1e-3)
    finally:
        eng.drain(5)


def test_dpo_on_fused_moe_experts(tiny_models, tmp_path):
    rows = colour_rows(16, "dpo")
    res = preference.train("dpo", tiny_models["mixtral"], rows[:12], rows[12:],
                           TrainConfig(learning_rate=3e-3, max_steps=6, batch_size=4), tmp_path / "job")
    assert res["tuned"]["loss"] < res["base"]["loss"] and (tmp_path / "job" / "adapter").is_dir()


def test_cancelled_preference_job_resumes_from_its_checkpoint(tiny_models, tmp_path):
    rows = colour_rows(24, "dpo")
    cfg = TrainConfig(learning_rate=1e-3, max_steps=10, batch_size=4, checkpoint_every=4)
    calls = {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 6          # asked once before training, then after each step
    part = preference.train("dpo", tiny_models["llama"], rows[:20], rows[20:], cfg, tmp_path / "job",
                            should_stop=stop_soon)
    assert part["cancelled"] and part["step"] == 6
    # A checkpoint half written when a crash came is not resumed from.
    (tmp_path / "job" / "checkpoint" / "checkpoint-9").mkdir()
    events = []
    rest = preference.train("dpo", tiny_models["llama"], rows[:20], rows[20:], cfg, tmp_path / "job",
                            report=events.append)
    assert events[0] == {"event": "resumed", "step": 6, "total": 10}
    assert not any(e["event"] == "eval" and e["phase"] == "base" for e in events)
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(7, 11))
    assert not rest["cancelled"] and rest["step"] == 10 and rest["base"]["loss"] == pytest.approx(math.log(2))
    assert not (tmp_path / "job" / "checkpoint" / "checkpoint-9").exists()


def test_bad_preference_data_is_a_clear_error(tiny_models, tmp_path):
    sft_rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4
    with pytest.raises(DataError, match="dpo needs 'rejected'"):
        preference.train("dpo", tiny_models["llama"], sft_rows, sft_rows, TrainConfig(), tmp_path / "a")
    only_good = [dict(r, label=True) for r in sft_rows]
    with pytest.raises(DataError, match="desirable and undesirable"):
        preference.train("kto", tiny_models["llama"], only_good, only_good, TrainConfig(), tmp_path / "b")
