"""The fine-tuner's data side: outcomes on traced generations and the SFT data-set builder (filters,
dedup, a deterministic split by episode, the card), in-process and through a real kernel."""
from __future__ import annotations

import asyncio
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
    assert len(evals) == round(0.2 * 201)                    # a fifth, the lowest hashes
    few = build_sft([ep(i, successes=[True]) for i in range(3)], eval_fraction=0.1)
    assert (len(few[0]), len(few[1])) == (2, 1)              # a small set still gets a held-out example
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
            with pytest.raises(kernos.sdk.InvalidArgument, match="one of 'sft', 'dpo', 'kto', 'grpo', 'raft', 'rag'"):
                s.tuner.build_dataset("x", kind="ppo")
    finally:
        assert stop_kernel(proc) == 0


def test_raft_builder_keeps_the_best_sample_per_prompt():
    from kernos.kernel.tuner.datasets import Sample, build_raft, feedback_reward, regex_reward

    msgs = lambda i: [{"role": "user", "content": f"q{i}"}]   # noqa: E731
    s = lambda *texts: [Sample(t) for t in texts]             # noqa: E731
    samples = {f"{i:064x}": (msgs(i), s("bad", f"good {i}", "  ", "good again")) for i in range(40)}
    samples["f" * 64] = (msgs(99), s("bad", "worse"))
    train, evals, card = build_raft(samples, regex_reward(r"^good"), eval_fraction=0.2)
    kept = train + evals
    assert len(kept) == 40 and card["dropped"]["below_min_reward"] == 1
    assert all(r["messages"][-1]["content"].startswith("good ") for r in kept)   # the first best on ties
    assert card["samples_per_prompt"] == 4 and card["mean_kept_reward"] == 1.0
    eps = [Episode("a" * 32, msgs(1), "fine", "m", [0.9]), Episode("b" * 32, msgs(1), "poor", "m", [0.1]),
           Episode("c" * 32, msgs(1), "fine", "m", [], [True])]
    reward = feedback_reward(eps)
    assert reward(msgs(1), Sample("fine")) == pytest.approx(0.95) and reward(msgs(1), Sample("poor")) == 0.1
    assert reward(msgs(2), Sample("fine")) == 0.0          # another prompt: unrated
    train, evals, _ = build_raft({"k": (msgs(1), s("poor", "fine", "new"))}, reward, min_reward=0.5, eval_fraction=0)
    assert train[0]["messages"][-1]["content"] == "fine"


def test_rag_builder_oracle_share_distractors_and_quotes():
    from kernos.kernel.tuner.datasets import RagItem, build_rag

    pool = [(f"d{i}", f"Document {i} says that city {i} has {i} bridges. It is old.") for i in range(200)]
    items = [RagItem(f"How many bridges has city {i}?", f"d{i}", pool[i][1], f"{i} bridges") for i in range(200)]
    items.append(items[0])                                  # a repeated question is used once
    train, evals, card = build_rag(items, pool, distractors=3, oracle_fraction=0.7, seed=1, eval_fraction=0.2)
    rows = train + evals
    assert len(rows) == 200 and card["with_oracle"] + card["distractors_only"] == 200
    assert 0.6 < card["with_oracle"] / 200 < 0.8
    for r, it in zip(sorted(rows, key=lambda r: r["answer"]), sorted(items[:200], key=lambda it: it.answer)):
        prompt, target = r["messages"][0]["content"], r["messages"][1]["content"]
        assert prompt.count("\n[") == 4 and it.question in prompt      # 3 distractors + oracle, or 4
        assert (it.oracle in prompt) == r["oracle"]
        assert "##begin_quote##Document" in target and target.endswith(f"<ANSWER>: {it.answer}")
        assert f"has {it.answer}" in target                   # the quoted sentence is the one with the answer
    assert not {r["episode"] for r in train} & {r["episode"] for r in evals}


def test_raft_and_rag_through_the_kernel(tiny_models, tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny-llama", "path": str(tiny_models["llama"])}])
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="learner") as s:
            for i in range(6):
                s.llm.chat(f"the agent plan number {i % 3}", max_tokens=4)   # 3 distinct prompts
            card = s.tuner.build_dataset("ranked", kind="raft", samples=4, reward_regex="e", temperature=1.0,
                                         max_tokens=8, eval_fraction=0)
            assert card["prompts"] == 3 and card["samples_per_prompt"] == 4
            rows = [json.loads(x) for x in s.storage.read_text("datasets/ranked.train.jsonl").splitlines()]
            assert len(rows) == card["train"] and all("e" in r["messages"][-1]["content"] for r in rows)
            with pytest.raises(kernos.sdk.InvalidArgument, match="reward_regex"):
                s.tuner.build_dataset("bad", kind="raft", reward_regex="(")
            ids = s.memory.add([f"Harbour {i} is in town {i}. Its lighthouse is {i} metres tall." for i in range(12)])
            items = [{"question": f"How tall is the lighthouse of harbour {i}?", "oracle_id": ids[i],
                      "answer": f"{i} metres"} for i in range(12)]
            card = s.tuner.build_dataset("docs", kind="rag", items=items, distractors=2, oracle_fraction=0.5,
                                         eval_fraction=0.25)
            assert card["train"] + card["eval"] == 12 and card["with_oracle"] + card["distractors_only"] == 12
            row = json.loads(s.storage.read_text("datasets/docs.train.jsonl").splitlines()[0])
            assert row["messages"][1]["content"].endswith(f"<ANSWER>: {row['answer']}")
            with pytest.raises(kernos.sdk.NotFound):
                s.tuner.build_dataset("docs", kind="rag", items=[dict(items[0], oracle_id="nope")])
            with pytest.raises(kernos.sdk.InvalidArgument):
                s.tuner.build_dataset("docs", kind="rag", items=[dict(items[0], answer="")])
        asyncio.run(_aio_twin(address))
    finally:
        assert stop_kernel(proc) == 0


async def _aio_twin(address):
    import kernos.sdk.aio

    async with await kernos.sdk.aio.connect(address, agent="async-learner") as s:
        r = await s.llm.chat("the agent plan", max_tokens=3)
        assert await s.tuner.feedback(r.request_id, preferred="a plan") == 1
        card = await s.tuner.build_dataset("fixed", eval_fraction=0)
        assert card["corrected"] == 1 and card["train"] == 1 and card["pairs"] == 1
        assert await s.tuner.jobs() == [] and await s.tuner.adapters() == []
        with pytest.raises(kernos.sdk.FailedPrecondition, match="no held-out"):
            await s.tuner.finetune("fixed", "fixed")
