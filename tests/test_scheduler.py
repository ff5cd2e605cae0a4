"""Scheduling policies on synthetic request streams (no model): order, quanta, aging, weights, budgets."""
from __future__ import annotations

import pytest

from kernos.scheduler import (
    Budget,
    FairSharePolicy,
    FifoPolicy,
    PriorityPolicy,
    ProgramPolicy,
    Programs,
    RequestView,
    RoundRobinPolicy,
    default_program_id,
    make_policy,
)


def v(rid, arrival=0.0, agent="a", priority=0, enqueued=None, quantum=0, cache=0, prompt=10, generated=0,
      program="", service=0):
    return RequestView(rid, agent, priority, arrival, prompt, 100, generated,
                       arrival if enqueued is None else enqueued, quantum, cache, program_id=program,
                       program_service=service)


def test_fifo_admits_in_arrival_order_and_never_preempts():
    waiting = [v("r1", 3.0), v("r2", 1.0), v("r3", 2.0)]
    assert FifoPolicy().schedule(waiting, [], Budget(2), now=10).admit == ["r2", "r3"]
    d = FifoPolicy().schedule(waiting, [v("old", 0.0, quantum=10**6)], Budget(1), now=10)
    assert d.admit == [] and d.preempt == []


def test_budgets_bound_admission_without_letting_later_requests_jump():
    waiting = [v("big", 1.0, cache=900), v("small", 2.0, cache=10)]
    d = FifoPolicy().schedule(waiting, [v("run", 0.0, cache=200)], Budget(8, cache_bytes=1000), now=5)
    assert d.admit == []  # "big" does not fit yet; "small" must not overtake it
    d = FifoPolicy().schedule(waiting, [], Budget(8, cache_bytes=1000), now=5)
    assert d.admit == ["big", "small"]
    d = FifoPolicy().schedule([v("x", 1, prompt=60), v("y", 2, prompt=60)], [], Budget(8, max_tokens_in_flight=100))
    assert d.admit == ["x"]


def test_memory_pressure_preempts_until_the_running_caches_fit():
    running = [v("a", 1.0, cache=600), v("b", 2.0, cache=600)]
    d = FifoPolicy().schedule([], running, Budget(8, cache_bytes=1000), now=5)
    assert d.preempt == [("b", "memory")]  # the latest arrival goes first


def test_round_robin_rotates_after_the_quantum():
    rr = RoundRobinPolicy(quantum=4)
    waiting = [v("w", 0.5)]
    assert rr.schedule(waiting, [v("r", 0.0, quantum=3)], Budget(1), now=1).preempt == []
    d = rr.schedule(waiting, [v("r", 0.0, quantum=4)], Budget(1), now=1)
    assert d.preempt == [("r", "quantum")] and d.admit == ["w"]
    # The preempted request re-enters at the back: a request enqueued earlier goes first.
    d = rr.schedule([v("r", 0.0, enqueued=5.0), v("n", 3.0)], [], Budget(1), now=6)
    assert d.admit == ["n"]


def test_round_robin_preempts_the_longest_running_first():
    rr = RoundRobinPolicy(quantum=2)
    d = rr.schedule([v("w", 1.0)], [v("a", 0, quantum=5), v("b", 0, quantum=9)], Budget(2), now=1)
    assert d.preempt == [("b", "quantum")]


def test_priority_orders_and_preempts_by_margin():
    p = PriorityPolicy(aging_per_s=0.0, preempt_margin=1.0)
    waiting = [v("lo", 0.0, priority=1), v("hi", 1.0, priority=5)]
    assert p.schedule(waiting, [], Budget(1), now=2).admit == ["hi"]
    d = p.schedule([v("hi", 1.0, priority=5)], [v("run", 0.0, priority=1)], Budget(1), now=2)
    assert d.preempt == [("run", "priority")] and d.admit == ["hi"]
    d = p.schedule([v("eq", 1.0, priority=2)], [v("run", 0.0, priority=1)], Budget(1), now=1)
    assert d.preempt == []  # within the margin: no thrashing
    # A request that has run for a long time does not age out of preemption.
    aging = PriorityPolicy(aging_per_s=1.0, preempt_margin=1.0)
    d = aging.schedule([v("hi", 99.0, priority=5)], [v("old", 0.0, priority=0)], Budget(1), now=100)
    assert d.preempt == [("old", "priority")]


def test_priority_aging_prevents_starvation():
    """A stream of high-priority requests (one new each tick, batch of one) cannot block a low one forever."""
    p = PriorityPolicy(aging_per_s=1.0, preempt_margin=1.0)
    low = v("low", 0.0, priority=0)
    waiting, running, admitted_at = [low], [], None
    for tick in range(1, 200):
        waiting.append(v(f"hi{tick}", float(tick), priority=20))
        running = []  # every request runs for one tick
        d = p.schedule(waiting, running, Budget(1), now=float(tick))
        assert len(d.admit) == 1
        if d.admit == ["low"]:
            admitted_at = tick
            break
        waiting = [w for w in waiting if w.request_id not in d.admit]
    assert admitted_at is not None and admitted_at <= 25


def test_fair_share_favours_the_agent_with_less_service_and_honours_weights():
    fs = FairSharePolicy(window_s=60, quantum=4)
    fs.record("heavy", 500, now=1.0)
    fs.record("light", 10, now=1.0)
    waiting = [v("h", 0.0, agent="heavy"), v("l", 1.0, agent="light")]
    assert fs.schedule(waiting, [], Budget(1), now=2).admit == ["l"]
    d = fs.schedule([v("l", 1.0, agent="light")], [v("h", 0.0, agent="heavy", quantum=4)], Budget(1), now=2)
    assert d.preempt == [("h", "fair_share")]
    weighted = FairSharePolicy(weights={"heavy": 100.0})
    weighted.record("heavy", 500, now=1.0)
    weighted.record("light", 10, now=1.0)
    assert weighted.schedule(waiting, [], Budget(1), now=2).admit == ["h"]  # 5 per weight unit < 10


def test_fair_share_forgets_outside_its_window():
    fs = FairSharePolicy(window_s=10)
    fs.record("a", 100, now=0.0)
    assert fs.usage("a", now=5.0) == 100
    assert fs.usage("a", now=11.0) == 0


def test_a_request_admitted_in_this_round_is_never_preempted_in_it():
    p = PriorityPolicy(aging_per_s=0.0, preempt_margin=0.0)
    d = p.schedule([v("lo", 0.0, priority=0), v("hi", 1.0, priority=9)], [], Budget(1), now=1)
    assert d.admit == ["hi"] and d.preempt == []
    d = p.schedule([v("lo", 0.0, priority=1), v("hi", 1.0, priority=9)], [], Budget(2), now=1)
    assert d.admit == ["hi", "lo"] and d.preempt == []


def test_make_policy_and_bad_options():
    assert isinstance(make_policy("round_robin", quantum=8), RoundRobinPolicy)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy("lottery")
    with pytest.raises(ValueError, match="quantum"):
        RoundRobinPolicy(quantum=0)


def test_admission_order_for_engines_that_order_only_at_admission():
    """What a vLLM model does with the policy: fifo keeps arrival order, priority places the higher first,
    fair share the agent with less recent service first (its usage counted from decoded tokens); round robin
    cannot be honoured without time slices."""
    now = 100.0
    hi, lo = v("hi", priority=5), v("lo", priority=0)
    assert FifoPolicy().admission == "fcfs" and RoundRobinPolicy().admission == ""
    p = PriorityPolicy()
    assert p.admission == "rank" and p.admission_priority(hi, now) < p.admission_priority(lo, now)
    f = FairSharePolicy()
    f.decoded(["heavy"] * 50 + ["light"] * 2, now)
    heavy, light = v("h1", agent="heavy"), v("l1", agent="light")
    assert f.admission_priority(light, now) == 2 < f.admission_priority(heavy, now) == 50


def test_program_policy_orders_by_the_programs_attained_service():
    """Autellix's PLAS: a tool follow-up of a short program goes before the next call of a long one, whatever
    the calls' own sizes and arrivals; programs of like service keep arrival order (levels)."""
    p = ProgramPolicy(level_tokens=100, max_wait_s=1000)
    waiting = [v("long-3", 1.0, program="long", service=5000, prompt=50),
               v("short-2", 2.0, program="short", service=150, prompt=900),    # its own prompt is the longest
               v("new-1", 3.0, program="new", service=0, prompt=400)]
    assert p.schedule(waiting, [], Budget(3), now=4).admit == ["new-1", "short-2", "long-3"]
    alike = [v("b", 2.0, program="b", service=120), v("a", 1.0, program="a", service=180)]   # one level: FCFS
    assert p.schedule(alike, [], Budget(2), now=4).admit == ["a", "b"]
    # a call of its own (no program) is ranked by its own tokens
    assert p.level(v("solo", prompt=10, generated=5)) == 0 and p.level(v("big", prompt=10_000)) > 0
    # preemption: a waiting call of a lower level displaces a running one of a higher level after its quantum
    d = p.schedule([v("new-1", 3.0, program="new")], [v("long-3", 1.0, program="long", service=5000, quantum=15)],
                   Budget(1), now=4)
    assert d.preempt == []                                       # its quantum (16 steps) is not used up yet
    d = p.schedule([v("new-1", 3.0, program="new")], [v("long-3", 1.0, program="long", service=5000, quantum=16)],
                   Budget(1), now=4)
    assert d.preempt == [("long-3", "program")] and d.admit == ["new-1"]
    d = p.schedule([v("x", 3.0, program="x", service=5000)], [v("y", 1.0, program="y", service=10, quantum=99)],
                   Budget(1), now=4)
    assert d.preempt == [] and d.admit == []                     # never for a program with more service


def test_program_policy_bounds_starvation_and_keeps_priority_and_fair_share_on_top():
    p = ProgramPolicy(level_tokens=100, max_wait_s=10)
    old = v("old", 0.0, program="huge", service=10**6)
    young = v("young", 5.0, program="tiny", service=0)
    assert p.schedule([old, young], [], Budget(1), now=9).admit == ["young"]
    assert p.schedule([old, young], [], Budget(1), now=11).admit == ["old"]   # waited past max_wait_s: first
    d = p.schedule([old], [v("run", 0.0, program="tiny", service=0, quantum=16)], Budget(1), now=11)
    assert d.preempt == [("run", "program")]                     # a starved call may displace a running one
    urgent = v("urgent", 5.0, priority=3, program="big", service=10**5)
    assert p.schedule([young, urgent], [], Budget(1), now=6).admit == ["urgent"]      # priority first
    p.record("heavy", 500, now=1.0)
    p.record("light", 10, now=1.0)
    same_level = [v("h", 1.0, agent="heavy", program="ph", service=50), v("l", 2.0, agent="light", program="pl",
                                                                             service=60)]
    assert p.schedule(same_level, [], Budget(1), now=2).admit == ["l"]           # then the agents' fair share
    assert make_policy("program", level_tokens=64).level_tokens == 64
    with pytest.raises(ValueError, match="level_tokens"):
        ProgramPolicy(level_tokens=0)
    assert p.admission_priority(young, 6) < p.admission_priority(old, 6)    # vLLM: the lower level first


def test_programs_account_calls_and_predict_tool_pauses_from_what_they_observed():
    t = Programs(default_pause_s=4.0)
    assert t.begin("a", "") is None                               # a call of no program
    p = t.begin("a", "prog", now=0.0)
    p.computed(120)
    assert p.state == "running" and t.end(p, ["search"], now=1.0) == 4.0   # nothing seen yet: the default
    assert p.state == "paused" and p.paused_tools == ("search",)
    assert t.begin("a", "prog", now=3.5) is p                         # the follow-up closes the pause
    assert p.pauses == 1 and p.pause_s == 2.5 and p.calls == 2 and p.service == 120
    t.end(p, now=4.0)
    for i, gap in enumerate([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]):   # search: mostly 1 s, once 9 s
        q = t.begin("a", f"p{i}", now=10.0 * i)
        t.end(q, ["search"], now=10.0 * i)
        t.begin("a", f"p{i}", now=10.0 * i + gap)
    assert t.predict_pause(["search"]) == 9.0                         # the 90th percentile of 10 observations
    assert t.predict_pause(["search", "never-seen"]) == 9.0 and t.predict_pause(["never-seen"]) == 4.0
    assert t.get("b", "prog") is None and {x.program_id for x in t.list("a", now=100)} >= {"prog", "p0"}
    t.idle_s = 0.0
    assert [x.program_id for x in t.list(now=100)] == [f"p{i}" for i in range(9)]       # still running: kept


def test_a_conversation_is_one_program_by_default():
    sys_ = {"role": "system", "content": "you are helpful"}
    first = [sys_, {"role": "user", "content": "find the file"}]
    later = first + [{"role": "assistant", "content": "", "tool_calls": [{"id": "1", "name": "ls", "arguments": "{}"}]},
                     {"role": "tool", "content": "a.txt", "tool_call_id": "1"}]
    assert default_program_id(first) == default_program_id(later) != ""
    assert default_program_id([sys_, {"role": "user", "content": "another task"}]) != default_program_id(first)
    assert default_program_id(first, context_id="ctx1") == "context:ctx1"
    assert default_program_id([sys_]) == ""


def test_program_policy_by_arrival_serves_the_program_that_started_first():
    """Continuum's program-level FCFS: a follow-up of the oldest program goes first, whatever its service."""
    from dataclasses import replace

    p = ProgramPolicy(order="arrival", max_wait_s=1000)
    young = replace(v("young-1", 5.0, program="young", service=0), program_started=4.0)
    old = replace(v("old-3", 6.0, program="old", service=9000), program_started=1.0)
    assert p.schedule([young, old], [], Budget(1), now=7).admit == ["old-3"]
    assert ProgramPolicy(max_wait_s=1000).schedule([young, old], [], Budget(1), now=7).admit == ["young-1"]   # PLAS
    assert make_policy("program", order="arrival").order == "arrival"
    with pytest.raises(ValueError, match="order"):
        ProgramPolicy(order="random")
