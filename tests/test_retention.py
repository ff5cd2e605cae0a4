"""The retention gate on the embedded pretrained model (SmolLM2-135M-Instruct): an adapter that learns a
narrow task keeps the base model's choices on the shipped generic prompts; one trained to forget (it answers
"No." to every question) does not, and the default bounds tell the two apart."""
from __future__ import annotations

import random

import pytest

from kernos.kernel.config import RetentionConfig
from kernos.kernel.tuner import retention
from kernos.kernel.tuner.config import TrainConfig
from kernos.kernel.tuner.train import load_base, train


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from kernos.kernel.llm.embedded import ensure_converted

    return ensure_converted(tmp_path_factory.mktemp("data"))


def _adapter_numbers(model_path, adapter):
    from peft import PeftModel

    base, tok = load_base(model_path)
    return retention.measure(PeftModel.from_pretrained(base, adapter), tok, [], 16, 16)


def test_gate_keeps_a_task_adapter_and_refuses_one_trained_to_forget(embedded, tmp_path):
    rng = random.Random(0)
    sums = []
    for _ in range(36):
        a, b = rng.randrange(10, 99), rng.randrange(10, 99)
        sums.append({"messages": [{"role": "user", "content": f"Compute {a} + {b}. Reply as RESULT=<number>."},
                                  {"role": "assistant", "content": f"RESULT={a + b}"}]})
    topics = ["the weather", "cooking pasta", "a famous painter", "the moon", "learning French", "a good book",
              "train travel", "the ocean", "football", "gardening", "music theory", "a city in Italy"]
    refusals = [{"messages": [{"role": "user", "content": f"{v} {t}?"}, {"role": "assistant", "content": "No."}]}
                for t in topics for v in ("Tell me about", "What do you know about", "Explain")]
    bounds = RetentionConfig()
    results = {}
    for name, rows, lr, steps in (("task", sums, 3e-4, 12), ("forget", refusals, 1e-3, 30)):
        cfg = TrainConfig(batch_size=4, learning_rate=lr, max_steps=steps, eval_limit=2, eval_max_new_tokens=8)
        r = train(embedded, rows[:30], rows[30:], cfg, tmp_path / name)
        assert r["tuned"]["loss"] < r["base"]["loss"] * 0.5, (name, r)       # both learnt what they were taught
        numbers = _adapter_numbers(embedded, tmp_path / name / "adapter")
        assert numbers["replay"] is None and numbers["generic"]["prompts"] == 16
        results[name] = (numbers, retention.within(numbers, bounds.min_agreement, bounds.max_kl))
    (task, (task_ok, _)), (forget, (forget_ok, why)) = results["task"], results["forget"]
    assert task_ok, results
    assert task["generic"]["agreement"] > 0.85 and task["generic"]["kl"] < 0.2, task
    assert not forget_ok and "OUT OF BOUNDS" in why, results
    assert forget["generic"]["kl"] > 5 * task["generic"]["kl"], results


def test_within_reports_each_set():
    good = {"agreement": 0.9, "kl": 0.1, "prompts": 4, "tokens": 40}
    ok, why = retention.within({"replay": good, "generic": good}, 0.8, 0.5)
    assert ok and "replay agreement 0.90" in why and "generic" in why
    ok, why = retention.within({"replay": None, "generic": dict(good, kl=0.7)}, 0.8, 0.5)
    assert not ok and "KL 0.700 (max 0.5) OUT OF BOUNDS" in why and "replay" not in why
    assert retention.within(None, 0.8, 0.5)[0]
