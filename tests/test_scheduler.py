"""Scheduling policies on synthetic request views (no model)."""
from __future__ import annotations

import pytest

from kernos.scheduler import FifoPolicy, RequestView, make_policy


def view(i, arrival, agent="a"):
    return RequestView(f"r{i}", agent, 0, arrival, 10, 10)


def test_fifo_admits_in_arrival_order_up_to_free_slots():
    waiting = [view(1, 3.0), view(2, 1.0), view(3, 2.0)]
    assert FifoPolicy().admit(waiting, [], 2) == ["r2", "r3"]
    assert FifoPolicy().admit(waiting, [], 0) == []
    assert FifoPolicy().admit(waiting, [], 10) == ["r2", "r3", "r1"]


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy("lottery")
