"""The fine-tuner's data side: outcomes on traced generations and the SFT data-set builder (filters,
dedup, a deterministic split by episode, the card), in-process and through a real kernel."""
from __future__ import annotations

import json

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.kernel.tuner.datasets import Episode, build_sft


def ep(i, reply="ok", rewards=(), successes=(), text=None):
    return Episode(f"{i:032x}", [{"role": "user", "content": text or f"question {i}"}], reply, "m",
                   list(rewards), list(successes))


def test_sft_builder_filters_dedups_and_splits_by_episode():
    eps = [ep(i, successes=[True]) for i in range(200)]
    eps += [ep(1000, successes=[False]), ep(1001, successes=[True, False]), ep(1002, rewards=[0.2]),
            ep(1003, rewards=[0.9]), ep(1004, reply="  ", successes=[True]), ep(1005),
            ep(1006, successes=[True], text="question 0")]  # same example as episode 0
    train, evals, card = build_sft(eps, min_reward=0.5, eval_fraction=0.2)
    assert len(train) + len(evals) == 201                    # 200 + the 0.9 reward; dup of episode 0 dropped
    assert card["dropped"] == {"unsuccessful": 4, "empty_reply": 1, "duplicate": 1}
    assert 20 <= len(evals) <= 65                            # about a fifth, by hash
    assert not {r["episode"] for r in train} & {r["episode"] for r in evals}
    again = build_sft(eps, min_reward=0.5, eval_fraction=0.2)
    assert [r["episode"] for r in again[1]] == [r["episode"] for r in evals]   # deterministic
    assert train[0]["messages"][-1] == {"role": "assistant", "content": "ok"}


def test_feedback_and_dataset_through_the_kernel(tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}])
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="learner") as s, kernos.sdk.connect(address, agent="other") as o:
            replies = [s.llm.chat(f"answer number {i}", max_tokens=2) for i in range(30)]
            for i, r in enumerate(replies):
                if i % 3 == 0:
                    assert s.tuner.feedback(r.request_id, success=True) == 1
                elif i % 3 == 1:
                    s.tuner.feedback(r.request_id, reward=0.9, note="good")
                else:
                    s.tuner.feedback(r.request_id, success=False)
            with pytest.raises(kernos.sdk.NotFound):
                o.tuner.feedback(replies[0].request_id, success=True)   # not its generation
            with pytest.raises(kernos.sdk.InvalidArgument):
                s.tuner.feedback("%%", success=True)
            with pytest.raises(kernos.sdk.InvalidArgument):
                s.tuner.feedback(replies[0].request_id)                  # no outcome given
            card = s.tuner.build_dataset("answers", min_reward=0.5, eval_fraction=0.2)
            assert card["train"] + card["eval"] == 20 and card["dropped"]["unsuccessful"] == 10
            train = [json.loads(x) for x in s.storage.read_text("datasets/answers.train.jsonl").splitlines()]
            evals = [json.loads(x) for x in s.storage.read_text("datasets/answers.eval.jsonl").splitlines()]
            assert len(train) == card["train"] and len(evals) == card["eval"]
            ex = train[0]["messages"]
            assert ex[0]["role"] == "user" and ex[-1]["role"] == "assistant"
            assert ex[-1]["content"] == " ".join(ex[0]["content"].split()[-2:])   # the echo model's reply
            assert json.loads(s.storage.read_text("datasets/answers.card.json"))["name"] == "answers"
            s.tuner.build_dataset("answers", min_reward=0.5)                       # rebuilt: a new version
            assert [v.version for v in s.storage.history("datasets/answers.train.jsonl")] == [1, 2]
            with pytest.raises(kernos.sdk.InvalidArgument, match="one of 'sft', 'raft', 'rag'"):
                s.tuner.build_dataset("x", kind="dpo")
    finally:
        assert stop_kernel(proc) == 0
