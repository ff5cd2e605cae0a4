"""Reinforcement learning from a verifiable reward (GRPO): the reward specs, the group-relative advantages, the
GRPO objective on a tiny model (its loss falls, the held-out best reply gains on the worst), and through a
real kernel: groups sampled on the serving engine, scored by the agent's own reward tool in the jail (a
broken tool's errors reported in the card, not fatal), a grpo job trained and its adapter served."""
from __future__ import annotations

import json
import math
import statistics
import time

import pytest
import torch

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.kernel.tuner import judge, rewards
from kernos.kernel.tuner.config import TrainConfig
from kernos.kernel.tuner.datasets import Sample as S
from kernos.kernel.tuner.grpo import GRPO
from kernos.kernel.tuner.grpo_data import build_grpo
from kernos.kernel.tuner.train import DataError, load_base, train


def test_reward_specs():
    kind, arg = rewards.parse(r"regex:^\d+$")
    assert rewards.builtin(kind, arg, S("42"), None) == 1.0 and rewards.builtin(kind, arg, S("4 2"), None) == 0.0
    kind, arg = rewards.parse('json_schema:{"type": "object", "required": ["x"]}')
    assert rewards.builtin(kind, arg, S('{"x": 1}'), None) == 1.0
    assert rewards.builtin(kind, arg, S('{"y": 1}'), None) == 0.0 and rewards.builtin(kind, arg, S("{x"), None) == 0.0
    assert rewards.builtin(*rewards.parse("json"), S("[1, 2]"), None) == 1.0
    assert rewards.builtin(*rewards.parse("exact"), S(" The answer is One. "), "the answer is one") == 1.0
    assert rewards.builtin(*rewards.parse("contains"), S("so: the answer is one!"), "answer is one") == 1.0
    with pytest.raises(rewards.RewardError, match="reference"):
        rewards.builtin(*rewards.parse("exact"), S("x"), None)
    call = S.of("", [{"id": "c1", "name": "pick", "arguments": '{"colour": "red", "n": 2}'}])
    ref = [{"name": "pick", "arguments": '{"n": 2, "colour": "red"}'}]
    assert rewards.builtin(*rewards.parse("tool_call"), call, ref) == 1.0             # JSON values, any key order
    assert rewards.builtin(*rewards.parse("tool_call"), S.of("", [{"name": "pick", "arguments": '{"colour": "blue"'
                                                                   ', "n": 2}'}]), ref) == 0.0
    assert rewards.builtin(*rewards.parse("tool_call"), S("red"), ref) == 0.0          # text, no call
    with pytest.raises(rewards.RewardError, match="reference calls"):
        rewards.builtin(*rewards.parse("tool_call"), call, [])
    for bad, why in (("regex:(", "regex"), ("json_schema:{", "json_schema"), ("tool:", "name"), ("ppo", "one of")):
        with pytest.raises(rewards.RewardError, match=why):
            rewards.parse(bad)
    assert rewards.parse("tool:score") == ("tool", "score")
    assert rewards.parse("judge") == ("judge", ("", "")) and rewards.parse("judge:big:be brief") == \
        ("judge", ("big", "be brief"))
    assert [rewards.tool_result(v) for v in (1, 0.5, {"reward": 2}, "1", True, float("nan"), None)] == \
        [1.0, 0.5, 2.0, None, None, None, None]


def test_group_advantages_and_what_is_left_out():
    msgs = [{"role": "user", "content": "q"}]
    groups = [("a", msgs, [(S("r1"), 1.0), (S("r2"), 0.0), (S("r3"), 0.0), (S("r4"), None)]),
              ("b", msgs, [(S("s1"), 1.0), (S("s2"), 1.0)]),         # all the same: no signal
              ("c", msgs, [(S("t1"), 1.0), (S("t2"), None)]),        # one scored reply: nothing to compare
              ("d", msgs, [(S("u1"), 0.2), (S("u2"), 0.8)])]
    train_rows, evals, card = build_grpo(groups, eval_fraction=0.0)
    rows = train_rows + evals
    assert [r["messages"][-1]["content"] for r in rows] == ["r1", "r2", "r3", "u1", "u2"]
    for key in ("a", "d"):
        adv = [r["advantage"] for r in rows if r["episode"] == key]
        assert statistics.fmean(adv) == pytest.approx(0, abs=1e-9) and statistics.pstdev(adv) == pytest.approx(1)
    assert card["groups"] == 2 and card["dropped"] == {"unscored": 2, "too_few_scored": 1, "no_signal": 1}
    train_rows, evals, _ = build_grpo(groups, eval_fraction=0.5)
    assert {r["episode"] for r in train_rows}.isdisjoint({r["episode"] for r in evals}) and evals


def colour_groups(n: int) -> list[dict]:
    """Groups of four replies to a colour question, two right (reward 1) and two wrong (reward 0)."""
    import random

    from test_preference import colour_rows
    rows = []
    for i, r in enumerate(colour_rows(n, "dpo", seed=5)):
        prompt, right, wrong = r["messages"][:-1], r["messages"][-1]["content"], r["rejected"]["content"]
        replies = [(right, 1.0), (wrong, 0.0), (right + ".", 1.0), (wrong + ".", 0.0)]
        random.Random(i).shuffle(replies)
        group = [(S(reply), reward) for reply, reward in replies]
        rows += build_grpo([(f"g{i}", prompt, group)], 0.0)[0]
    return rows


def test_grpo_objective_reduces_its_loss_and_prefers_rewarded_replies(tiny_models, tmp_path):
    rows = colour_groups(20)
    held = [r for r in rows if r["episode"] in {f"g{i}" for i in range(16, 20)}]
    rows = [r for r in rows if r not in held]
    events = []
    res = train(tiny_models["llama"], rows, held, TrainConfig(learning_rate=3e-3, epochs=4, batch_size=8), tmp_path,
                report=events.append, objective=GRPO(beta=0.05))
    assert res["method"] == "grpo" and res["step"] == 4 * math.ceil(len(rows) / 8)
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(1, res["step"] + 1))
    # The objective over the whole training set: 0 for the base (ratio 1, no KL, advantages of mean 0 in each
    # group), below it for the adapter.
    from peft import PeftModel

    base, tok = load_base(tiny_models["llama"])
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    objective = GRPO(beta=0.05)
    data = objective.prepare(tok, rows, TrainConfig())
    with torch.no_grad():
        tuned = objective.loss(model, data, tok.pad_token_id or 0).item()
        with model.disable_adapter():
            before = objective.loss(model, data, tok.pad_token_id or 0).item()
    assert before == pytest.approx(0, abs=1e-5) and tuned < -0.02, (before, tuned)
    assert res["base"]["loss"] == pytest.approx(math.log(2), abs=1e-6) and res["tuned"]["loss"] < res["base"]["loss"]
    assert res["tuned"]["accuracy"] >= res["base"]["accuracy"] and res["tuned"]["examples"] == 4
    with pytest.raises(DataError, match="advantage"):
        train(tiny_models["llama"], [{"messages": rows[0]["messages"]}], held, TrainConfig(), tmp_path / "x",
              objective=GRPO())


def test_a_judges_prompt_and_verdict():
    """The judge sees the task and every reply of the group, numbered; its verdict is read strictly."""
    chat = judge.prompt([{"role": "user", "content": "add 2 and 3"}], ["5", "six", "It is 5."], "exact sums win")
    assert "add 2 and 3" in chat[1]["content"] and "exact sums win" in chat[1]["content"]
    assert [chat[1]["content"].index(f"[{i}]") for i in (1, 2, 3)] == sorted(chat[1]["content"].index(f"[{i}]")
                                                                          for i in (1, 2, 3))
    assert judge.verdict('{"scores": [1, 0.25, 0]}', 3) == [1.0, 0.25, 0.0]
    for bad, why in (('{"scores": [1, 0]}', "2 scores for 3"), ('{"scores": [1, 2, 0]}', "between 0 and 1"),
                     ('{"scores": [1, true, 0]}', "between 0 and 1"), ('{"scores": [1, 0', "not"), ("[]", "not")):
        with pytest.raises(judge.JudgeError, match=why):
            judge.verdict(bad, 3)


SCORE = """
reply = args["reply"]
result = {"reward": 1.0 if len(reply) % 2 == 0 else 0.0}
"""
BROKEN = "raise RuntimeError('the grader is down')"


def test_grpo_on_a_kernel_with_a_jailed_reward_tool(tiny_models, tmp_path):
    from conftest import write_config

    from kernos.kernel.llm.embedded import ensure_converted

    judge_path = ensure_converted(tmp_path / "embedded")      # the judge: the pretrained model (a tiny one scores flat)
    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny-llama", "path": str(tiny_models["llama"])},
                                             {"name": "judge", "path": str(judge_path)}],
                       tuner={"threads": 1, "retention": {"min_agreement": 0.0, "max_kl": 1.0}})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="player") as s:
            for i in range(16):
                s.llm.chat(f"question number {i} about colours", max_tokens=4)
            s.tools.register("even", SCORE, {"type": "object"})
            s.tools.register("broken", BROKEN, {"type": "object"})
            with pytest.raises(kernos.sdk.InvalidArgument, match="reward"):
                s.tuner.build_dataset("g", kind="grpo")
            with pytest.raises(kernos.sdk.NotFound):
                s.tuner.build_dataset("g", kind="grpo", reward="tool:nope")
            card = s.tuner.build_dataset("down", kind="grpo", reward="tool:broken", samples=2, max_tokens=6)
            assert card["train"] == card["eval"] == 0 and card["reward_errors"] == 32
            assert "the grader is down" in card["reward_error_examples"][0]
            t0 = time.monotonic()
            card = s.tuner.build_dataset("even", kind="grpo", reward="tool:even", samples=4, max_tokens=8,
                                         eval_fraction=0.25)
            assert card["kind"] == "grpo" and card["prompts"] == 16 and card["samples_per_prompt"] == 4
            assert card["reward_errors"] == 0 and card["groups"] >= 8 and card["eval"] > 0, card
            assert 0 < card["mean_reward"] < 1
            # RAFT takes the same verifiable rewards: of each prompt's samples, the best one by the tool
            card = s.tuner.build_dataset("best", kind="raft", reward="tool:even", samples=4, max_tokens=8)
            assert card["reward"] == "tool:even" and card["reward_errors"] == 0 and card["train"] > 0, card
            kept = [json.loads(x) for x in s.storage.read_text("datasets/best.train.jsonl").splitlines()]
            assert all(r["reward"] == 1.0 and len(r["messages"][-1]["content"]) % 2 == 0 for r in kept)
            print(f"sampled and scored 64 replies in {time.monotonic() - t0:.1f} s")
            _judged_by_the_served_model(s, tmp_path / "data")
            _tool_calls_rewarded(s)
            job = s.tuner.wait(s.tuner.finetune("even", "even", config={"learning_rate": 3e-3, "epochs": 3,
                                                                         "batch_size": 8}).job_id, timeout=300)
            assert job.method == "grpo" and job.state in ("published", "rejected"), job.message
            assert job.base.loss == pytest.approx(math.log(2), abs=1e-6) and job.step == job.total_steps
            if job.state == "published":
                assert s.llm.chat("question number 3 about colours", max_tokens=4,
                                  adapter="player:even").adapter == "player:even"
    finally:
        assert stop_kernel(proc) == 0


def _judged_by_the_served_model(s, data_dir):
    """GRPO with a judge instead of a verifier: one judge call per group, accounted and traced to the agent, whose
    constrained verdict is the groups' rewards; the verdict is the served model's own greedy reply to that prompt
    and schema (asked again directly: the same text)."""
    from kernos.storage.traces import TraceLog

    with pytest.raises(kernos.sdk.NotFound):
        s.tuner.build_dataset("j", kind="grpo", reward="judge:no-such-model")
    before = {a.agent_id: a for a in s.kernel.agents()}["player"].completion_tokens
    card = s.tuner.build_dataset("judged", kind="grpo", reward="judge:judge", samples=3, max_tokens=6)
    print(f"judge: {card['groups']} groups kept, {card['reward_errors']} verdicts unreadable, {card['dropped']}")
    assert card["reward"] == "judge:judge" and card["prompts"] == 16, card
    log = TraceLog.__new__(TraceLog)
    log.path = data_dir / "traces.db"
    calls = [r for r in log.query(agent_id="player", kind="llm.internal") if r.request.get("cause") == "tuner.judge"]
    assert len(calls) == 16 and all(r.status == "OK" for r in calls)
    assert {r.request["model"] for r in calls} == {"judge"}
    assert {a.agent_id: a for a in s.kernel.agents()}["player"].completion_tokens > before   # the agent's calls
    verdicts = {}
    for r in calls:
        shown = r.request["messages"][1]["content"]
        try:
            verdicts[shown] = judge.verdict(r.response["text"], 3)
        except judge.JudgeError:
            verdicts[shown] = None
    assert card["reward_errors"] == sum(1 for v in verdicts.values() if v is None)
    rows = [json.loads(x) for part in ("train", "eval") for x in
            s.storage.read_text(f"datasets/judged.{part}.jsonl").splitlines()]
    assert len(rows) == 3 * card["groups"]
    groups = {}
    for row in rows:
        groups.setdefault(row["episode"], []).append(row)
    for group in groups.values():       # each kept group's rewards are the verdict on it, reply by reply
        task = judge.render_task(group[0]["messages"][:-1])
        shown, scores = next((k, v) for k, v in verdicts.items() if f"Task:\n{task}\n\nReplies:" in k)
        assert [r["reward"] for r in group] == scores
        assert [f"[{i + 1}]\n{r['messages'][-1]['content']}" in shown for i, r in enumerate(group)] == [True] * 3
    first = calls[0]
    again = s.llm.chat(first.request["messages"], model="judge", temperature=0, max_tokens=first.request["max_tokens"],
                       response_format={"type": "json_schema", "json_schema": {"name": "verdict",
                                                                               "schema": judge.schema(3)}})
    assert again.text == first.response["text"]


PICK = {"type": "function", "function": {"name": "pick", "description": "Pick the colour of an item.",
                                         "parameters": {"type": "object", "properties": {
                                             "colour": {"enum": ["red", "blue"]}}, "required": ["colour"]}}}


def _tool_calls_rewarded(s):
    """A tool-using agent: its traced requests offered a tool and required a call; a call picking "red" was
    marked successful. GRPO with reward "tool_call" samples each prompt with the tools and tool choice its
    request had, and rewards a sample whose call equals the successful one."""
    asked = [[{"role": "user", "content": f"pick a colour for item {i}"}] for i in range(12)]
    for i, messages in enumerate(asked):
        r = s.llm.chat(messages, tools=[PICK], tool_choice="required", temperature=1.0, seed=i, max_tokens=128)
        assert [c.name for c in r.tool_calls] == ["pick"], r
        s.tuner.feedback(r.request_id, success=json.loads(r.tool_calls[0].arguments)["colour"] == "red")
    card = s.tuner.build_dataset("calls", kind="grpo", reward="tool_call", samples=6, max_tokens=128)
    print(f"tool-call grpo: {card['prompts']} prompts with a successful call, {card['groups']} groups kept")
    assert card["prompts"] >= 1 and card["no_reference"] >= 1, card    # only prompts whose call succeeded
    rows = [json.loads(x) for part in ("train", "eval")
            for x in s.storage.read_text(f"datasets/calls.{part}.jsonl").splitlines()]
    assert card["tool_use"] == len(rows) == 6 * card["groups"] and card["groups"] >= 1, card
    for row in rows:          # each sample made its call under the grammar; rewarded as the successful call
        assert row["tools"] and row["tools"][0]["name"] == "pick"
        [call] = row["messages"][-1]["tool_calls"]
        assert row["reward"] == (1.0 if json.loads(call["arguments"]) == {"colour": "red"} else 0.0)
