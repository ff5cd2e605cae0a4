"""Fine-tuning end to end on a real kernel with the tiny Llama: an agent's traces and corrections become
a data set, a LoRA job trains in a worker process, the adapter is published only because it beats the
base on the held-out split, hot-loaded and used as the agent's default, and survives a restart. Jobs
show progress, can be cancelled, and resume from their checkpoint after a kernel restart."""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.kernel.llm.testing import _WORDS

FILLER = [w for w in _WORDS if w not in ("red", "blue", "one", "two")]


def task(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A small synthetic task: the answer depends on which colour word the question contains."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour = rng.choice(["red", "blue"])
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), colour)
        out.append((" ".join(words), "the answer is one" if colour == "red" else "the answer is two"))
    return out


# The tiny models have random weights: their next-token distributions are almost flat, so any trained adapter
# changes most of the base's greedy choices on generic prompts (top-1 agreement 0.0-0.5 measured). These
# tests loosen the retention gate's agreement bound; test_retention_gate_refuses_* keeps the default, and
# tests/test_retention.py checks the gate on the embedded pretrained model.
LOOSE_RETENTION = {"min_agreement": 0.0, "max_kl": 1.0}


@pytest.fixture
def tiny_kernel(tiny_models, tmp_path):
    from conftest import write_config

    def start(retention=LOOSE_RETENTION):
        cfg = write_config(tmp_path / "k.toml", [{"name": "tiny-llama", "path": str(tiny_models["llama"])}],
                           tuner={"threads": 1, "retention": retention})
        return start_kernel(tmp_path / "data", str(cfg), timeout=120)
    return start


def test_traces_to_published_default_adapter(tiny_kernel, tmp_path):
    proc, address = tiny_kernel()
    try:
        with kernos.sdk.connect(address, agent="learner", token_file=tmp_path / "learner.token") as s:
            questions = task(64)
            for q, right in questions:      # the agent works, a reviewer corrects every reply
                r = s.llm.chat(q, max_tokens=6)
                assert r.text.strip() != right
                s.tuner.feedback(r.request_id, reward=0.0, preferred=right)
            card = s.tuner.build_dataset("colours", eval_fraction=0.25)
            assert card["corrected"] == 64 and card["pairs"] == 64 and card["eval"] >= 8
            job = s.tuner.finetune("colours", "colours", config={"learning_rate": 3e-3, "epochs": 30, "batch_size": 8,
                                                                  "checkpoint_every": 50}, set_default=True)
            assert job.state in ("queued", "running") and job.owner == "learner"
            seen_progress = False
            while not (job := s.tuner.job(job.job_id)).done:
                seen_progress |= job.step > 0 and job.loss is not None and job.total_steps > job.step
                time.sleep(0.2)
            assert job.state == "published", job.message
            assert seen_progress
            # The held-out quarter is drawn by the hash of random request ids, so it differs from run to run: 14 of
            # 16 (0.875) has been seen on one draw, 15-16 on most.
            assert job.base.accuracy == 0.0 and job.tuned.accuracy >= 0.85, (job.base, job.tuned)
            assert job.tuned.loss < job.base.loss * 0.9
            assert job.adapter == "learner:colours" and job.version == 1
            # Hot-loaded and the default: no adapter named, the held-out questions are now answered right.
            held_out = [(q, a) for q, a in questions if q in
                        {json_q for json_q in _eval_questions(s, "colours")}]
            replies = [s.llm.chat(q, max_tokens=6) for q, _ in held_out]
            right = sum(r.text.strip() == a for r, (_, a) in zip(replies, held_out))
            assert right >= 0.85 * len(held_out), [(r.text, r.adapter, a) for r, (_, a) in zip(replies, held_out)]
            r = s.llm.chat(held_out[0][0], max_tokens=6)
            assert r.adapter == "learner:colours"
            assert "learner:colours" in next(m for m in s.llm.models() if m.name == "tiny-llama").adapters
            [a] = s.tuner.adapters()
            assert a.loaded and a.is_default and a.tuned.accuracy == job.tuned.accuracy
            stats = s.kernel.stats()
            assert any(j.job_id == job.job_id and j.state == "published" for j in stats.tuner_jobs)
            cli = [sys.executable, "-m", "kernos.kernel.cli", "finetune"]
            out = subprocess.run(cli + ["status", "--address", address, "--token", s.token], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0 and job.job_id in out.stdout and "published" in out.stdout, out
            assert f"acc {job.tuned.accuracy:.2f}" in out.stdout, out.stdout
            out = subprocess.run(cli + ["adapters", "--address", address, "--token", s.token], capture_output=True,
                                 text=True, timeout=60)
            assert "tiny-llama/learner:colours v1" in out.stdout and "loaded  default" in out.stdout, out
            out = subprocess.run(cli + ["status", "--address", address], capture_output=True, text=True, timeout=60,
                                 env={k: v for k, v in os.environ.items() if k != "KERNOS_TOKEN"})
            assert out.returncode == 2 and "token is needed" in out.stderr
            with kernos.sdk.connect(address, agent="other") as o:
                assert o.llm.chat(held_out[0][0], max_tokens=6).adapter is None     # not its default
                with pytest.raises(kernos.sdk.PermissionDenied):
                    o.llm.chat(held_out[0][0], max_tokens=6, adapter="learner:colours")   # private without a grant
                assert o.tuner.adapters() == []
                with pytest.raises(kernos.sdk.NotFound):
                    o.tuner.job(job.job_id)
                s.access.grant("other", "model", "execute", resource="tiny-llama/learner:colours")   # shared
                r = o.llm.chat(held_out[0][0], max_tokens=6, adapter="learner:colours")
                assert r.text.strip() == held_out[0][1]
                o.tuner.set_default_adapter("learner:colours", model="tiny-llama")
                assert o.llm.chat(held_out[0][0], max_tokens=6).adapter == "learner:colours"
                with pytest.raises(kernos.sdk.NotFound):
                    o.tuner.set_default_adapter("nope:none")
    finally:
        assert stop_kernel(proc) == 0
    proc, address = tiny_kernel()          # published adapters and defaults survive a restart
    try:
        with kernos.sdk.connect(address, agent="learner", token_file=tmp_path / "learner.token") as s:
            r = s.llm.chat(held_out[0][0], max_tokens=6)
            assert r.adapter == "learner:colours" and r.text.strip() == held_out[0][1]
            # on-policy samples: a round's data set sampled from the agent's current adapter, not the base
            sampled = {which: s.tuner.build_dataset(f"onpolicy-{which or 'base'}", kind="grpo", reward="exact",
                                                    samples=2, max_tokens=6, temperature=0.01, adapter=which)
                       for which in ("current", "")}   # (near greedy: a tiny model's sampled tails are noise)
            assert sampled["current"]["sampled_from"] == "learner:colours" and sampled[""]["sampled_from"] == "base"
            assert sampled["current"]["mean_reward"] > 0.5 > sampled[""]["mean_reward"], sampled
            with pytest.raises(kernos.sdk.NotFound):
                s.tuner.build_dataset("x", kind="grpo", reward="exact", adapter="no-such-adapter")
            # the next round continues from the agent's current adapter: that is its base to beat, and the result
            # is one adapter on the base model that still answers
            with pytest.raises(kernos.sdk.NotFound):
                s.tuner.finetune("again", "colours", start_from="no-such-adapter")
            again = s.tuner.wait(s.tuner.finetune("again", "colours", config={"learning_rate": 1e-3, "epochs": 2,
                                                                             "batch_size": 8, "rank": 4, "alpha": 4},
                                                  start_from="current").job_id, timeout=300)
            assert again.start_from == "learner:colours v1" and again.state in ("published", "rejected"), again
            assert again.base.loss == pytest.approx(job.tuned.loss, abs=1e-3)      # measured with the start merged
            print(f"continued from the current adapter: {again.state}: {again.message}")
            assert "the adapter it continued" in again.message
            if again.state == "published":
                r = s.llm.chat(held_out[0][0], max_tokens=6, adapter="learner:again")
                assert r.adapter == "learner:again" and r.text.strip() == held_out[0][1]
    finally:
        assert stop_kernel(proc) == 0


def _until(s, job_id, condition, timeout=60.0):
    """Poll a job until `condition(job)`; the job then."""
    deadline = time.monotonic() + timeout
    while not condition(j := s.tuner.job(job_id)):
        assert time.monotonic() < deadline, j
        time.sleep(0.1)
    return j


def _eval_questions(s, dataset):
    import json
    return [json.loads(line)["messages"][0]["content"]
            for line in s.storage.read_text(f"datasets/{dataset}.eval.jsonl").splitlines()]


def test_job_resumes_after_kernel_kill_and_cancels(tiny_kernel, tmp_path):
    import signal

    proc, address = tiny_kernel()
    try:
        with kernos.sdk.connect(address, agent="learner", token_file=tmp_path / "learner.token") as s:
            for q, right in task(24, seed=1):
                r = s.llm.chat(q, max_tokens=2)
                s.tuner.feedback(r.request_id, preferred=right)
            s.tuner.build_dataset("long", eval_fraction=0.25)
            with pytest.raises(kernos.sdk.InvalidArgument, match="learning_rate"):
                s.tuner.finetune("x", "long", config={"learning_rate": -1})
            with pytest.raises(kernos.sdk.InvalidArgument, match="extra|not permitted"):
                s.tuner.finetune("x", "long", config={"lr": 0.1})
            with pytest.raises(kernos.sdk.NotFound):
                s.tuner.finetune("x", "no-such-set")
            weak = s.tuner.wait(s.tuner.finetune("weak", "long", config={"max_steps": 2, "learning_rate": 1e-6},
                                                 min_improvement=0.2).job_id, timeout=120)
            assert weak.state == "rejected" and "not published" in weak.message and weak.adapter == ""
            assert s.tuner.adapters() == []       # a job that does not beat the base publishes nothing
            job = s.tuner.finetune("long", "long", config={"max_steps": 100000, "checkpoint_every": 10,
                                                            "learning_rate": 1e-3})
            while (j := s.tuner.job(job.job_id)).step < 35:
                assert j.state in ("queued", "running"), j.message
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)     # the kernel dies; its worker checkpoints (parent-death signal)
        proc.wait()
    proc, address = tiny_kernel()
    try:
        with kernos.sdk.connect(address, agent="learner", token_file=tmp_path / "learner.token") as s:
            j = _until(s, job.job_id, lambda j: j.resumed_from_step > 0)
            assert j.resumed_from_step >= 30           # not from scratch: from the last checkpoint
            assert j.state == "running" and j.base.loss is not None   # the base evaluation was kept
            while s.tuner.job(job.job_id).step <= j.resumed_from_step + 5:
                time.sleep(0.1)
            c = s.tuner.cancel(job.job_id)
            assert c.state in ("running", "cancelled")
            j = _until(s, job.job_id, lambda j: j.done)
            assert j.state == "cancelled" and j.step < j.total_steps
            assert s.tuner.adapters() == []
            second = s.tuner.finetune("long2", "long", config={"max_steps": 100000, "checkpoint_every": 10})
            while s.tuner.job(second.job_id).step < 12:
                time.sleep(0.1)
    finally:
        assert stop_kernel(proc) == 0           # SIGTERM: the worker checkpoints, the job waits for a restart
    proc, address = tiny_kernel()
    try:
        with kernos.sdk.connect(address, agent="learner", token_file=tmp_path / "learner.token") as s:
            j = _until(s, second.job_id, lambda j: j.resumed_from_step > 0)
            assert j.resumed_from_step >= 12 and j.state == "running"
            assert s.tuner.cancel(second.job_id).job_id == second.job_id
    finally:
        assert stop_kernel(proc) == 0


def test_preference_jobs_from_an_agents_feedback(tiny_kernel, tmp_path):
    """DPO and KTO from what an agent's reviewers said: corrections and differently rewarded replies become
    pairs, thumbs up and down become labels; each job trains by its data set's kind, is published because
    the held-out preference improved, and is served."""
    proc, address = tiny_kernel()
    try:
        with kernos.sdk.connect(address, agent="critic", token_file=tmp_path / "critic.token") as s:
            questions = task(48, seed=2)
            for i, (q, right) in enumerate(questions):
                r = s.llm.chat(q, max_tokens=6)
                if i % 2:
                    s.tuner.feedback(r.request_id, preferred=right)      # a correction: a pair, two labels
                else:
                    s.tuner.feedback(r.request_id, reward=-1.0)          # a thumbs down: a label
                    s.tuner.feedback(s.llm.chat(q, max_tokens=6, adapter=None, temperature=1.0, seed=i + 1)
                                     .request_id, reward=1.0)            # another try, a thumbs up
            for q in ("hello there", "what is the time", "tell me a story"):      # work without feedback
                s.llm.chat(q, max_tokens=4)
            dpo = s.tuner.build_dataset("pairs", kind="dpo", eval_fraction=0.25)
            assert dpo["kind"] == "dpo" and dpo["sources"]["correction"] == 24 and dpo["sources"]["reward"] > 0
            kto = s.tuner.build_dataset("votes", kind="kto", eval_fraction=0.25)
            assert kto["desirable"] >= 24 and kto["undesirable"] >= 24 and kto["eval"] > 0
            with pytest.raises(kernos.sdk.FailedPrecondition, match="dpo needs 'rejected'"):
                s.tuner.finetune("bad", "votes", method="dpo")
            with pytest.raises(kernos.sdk.InvalidArgument, match="method"):
                s.tuner.finetune("bad", "votes", method="ppo")
            cfg = {"learning_rate": 3e-3, "epochs": 6, "batch_size": 8}
            jobs = [s.tuner.finetune("pairs", "pairs", config=cfg, set_default=True),
                    s.tuner.finetune("votes", "votes", config=cfg)]
            assert [j.method for j in jobs] == ["dpo", "kto"]
            jobs = [s.tuner.wait(j.job_id, timeout=300) for j in jobs]
            for j, base_loss in zip(jobs, (math.log(2), 0.5)):
                assert j.state == "published", j.message
                assert j.base.loss == pytest.approx(base_loss, abs=1e-6) and j.tuned.loss < j.base.loss
                assert j.retention["generic"]["prompts"] == 24 and j.retention["replay"]["prompts"] == 3
            assert jobs[0].tuned.accuracy > jobs[0].base.accuracy
            r = s.llm.chat(questions[0][0], max_tokens=6)
            assert r.adapter == "critic:pairs"                      # hot-loaded, the agent's default
            assert s.llm.chat(questions[0][0], max_tokens=6, adapter="critic:votes").adapter == "critic:votes"
            cli = [sys.executable, "-m", "kernos.kernel.cli", "finetune", "status", "--address", address,
                   "--token", s.token]
            out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and " dpo " in out.stdout and " kto " in out.stdout, out
    finally:
        assert stop_kernel(proc) == 0


def test_retention_gate_refuses_an_adapter_that_forgets(tiny_kernel, tmp_path):
    """With the default bounds, an adapter that learnt its task but no longer makes the base model's choices
    elsewhere (on a random-weight model every strongly trained adapter does) is not published; the job
    records the retention numbers and says why."""
    proc, address = tiny_kernel(retention={})
    try:
        with kernos.sdk.connect(address, agent="forgetful", token_file=tmp_path / "f.token") as s:
            for q, right in task(32, seed=3):
                s.tuner.feedback(s.llm.chat(q, max_tokens=4).request_id, preferred=right)
            s.llm.chat("an unrelated question", max_tokens=4)
            s.tuner.build_dataset("colours", eval_fraction=0.25)
            job = s.tuner.wait(s.tuner.finetune("colours", "colours", config={"learning_rate": 3e-3, "epochs": 20,
                                                                               "batch_size": 8}).job_id, timeout=300)
            assert job.tuned.loss < job.base.loss * 0.9                  # it learnt its task ...
            assert job.state == "rejected" and "forgets" in job.message, job.message   # ... and forgot the rest
            assert job.retention["generic"]["agreement"] < 0.8 and job.retention["replay"]["prompts"] == 1
            assert s.tuner.adapters() == []
    finally:
        assert stop_kernel(proc) == 0


def test_continual_tuning_trains_canaries_promotes_and_rolls_back(tiny_models, tmp_path):
    """An agent turns continual tuning on and only works and gives feedback: the kernel trains a round when
    enough feedback has arrived, serves the candidate to a share of the agent's calls, and promotes it (live
    rewards as good) or rolls it back (worse), by itself; every step in the state, the audit log and metrics."""
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny-llama", "path": str(tiny_models["llama"])}],
                       server={"admin_token": "adm-" + "x" * 28},
                       tuner={"threads": 1, "retention": LOOSE_RETENTION, "continual_tick_s": 0.2})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        with kernos.sdk.connect(address, agent="steady", token_file=tmp_path / "s.token") as s:
            assert s.tuner.continual() is None
            with pytest.raises(kernos.sdk.InvalidArgument, match="'grpo' needs reward"):
                s.tuner.continual(kind="grpo")
            with pytest.raises(kernos.sdk.InvalidArgument, match="canary_share"):
                s.tuner.continual(canary_share=1.5)
            spec = dict(min_feedback=24, canary_share=0.5, canary_calls=4, eval_fraction=0.25,
                        config={"learning_rate": 3e-3, "epochs": 20, "batch_size": 8})
            st = s.tuner.continual(**spec)
            assert st["phase"] == "idle" and st["round"] == 0
            for q, right in task(24, seed=4):
                s.tuner.feedback(s.llm.chat(q, max_tokens=6).request_id, preferred=right)

            def until(cond, timeout=240):
                deadline = time.monotonic() + timeout
                while not cond(st := s.tuner.continual()):
                    assert time.monotonic() < deadline, st
                    time.sleep(0.2)
                return st

            st = until(lambda st: st["phase"] == "canary")
            assert st["round"] == 1 and st["candidate"] == "steady:continual-1" and st["current"] == ""
            job = s.tuner.job(st["job_id"])
            assert job.state == "published" and job.dataset == "continual-1"

            def play(reward_of):
                """Calls naming no adapter, each rewarded by which arm served it, until the round ends."""
                served = set()
                while s.tuner.continual()["phase"] == "canary":
                    r = s.llm.chat("how are you today", max_tokens=3)
                    served.add(r.adapter)
                    s.tuner.feedback(r.request_id, reward=reward_of(r.adapter))
                    time.sleep(0.05)
                return served
            served = play(lambda adapter: 1.0 if adapter == "steady:continual-1" else 0.5)
            assert served == {"steady:continual-1", None}            # the canary split the calls
            st = s.tuner.continual()
            assert st["history"][-1]["outcome"] == "promoted", st
            assert s.llm.chat("how are you today", max_tokens=3).adapter == "steady:continual-1"   # the default
            # Round two starts when 24 more outcomes have come (the canary's count) and continues from the promoted
            # adapter (on-policy rounds); its candidate does worse live.
            s.tuner.continual(**spec, continue_from_current=True)
            for q, right in task(24, seed=6):
                s.tuner.feedback(s.llm.chat(q, max_tokens=6).request_id, preferred=right)
            st = until(lambda st: st["phase"] == "canary" and st["round"] == 2)
            assert st["current"] == "steady:continual-1" and st["candidate"] == "steady:continual-2"
            assert s.tuner.job(st["job_id"]).start_from == "steady:continual-1 v1"
            play(lambda adapter: 0.0 if adapter == "steady:continual-2" else 1.0)
            st = s.tuner.continual(enabled=False)
            assert [h["outcome"] for h in st["history"]] == ["promoted", "rolled_back"], st["history"]
            assert s.llm.chat("how are you today", max_tokens=3).adapter == "steady:continual-1"   # kept
            out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "finetune", "continual", "--address",
                                  address, "--token", s.token], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "round 1: promoted" in out.stdout and "round 2: rolled_back" in out.stdout
        with kernos.sdk.connect(address, token="adm-" + "x" * 28) as admin:
            steps = [e["reason"].split(":")[1].strip() for e in admin.access.audit(principal="steady", limit=1000)
                     if e["method"] == "tuner.continual.round"]
            assert {"train", "canary", "promoted", "rolled_back"} <= set(steps), steps
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://{proc.http_address}/metrics",
                         headers={"Authorization": "Bearer adm-" + "x" * 28}).text
        rounds = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
                  if f.name == "kernos:continual_rounds" for s in f.samples if s.name.endswith("_total")}
        assert rounds == {"promoted": 1.0, "rolled_back": 1.0}, rounds
    finally:
        assert stop_kernel(proc) == 0
