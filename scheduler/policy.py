"""The policy interface the LLM engines call between decode steps.

An engine keeps the running batch and a waiting list; before each step it asks its policy which
waiting requests to admit into the free slots. The policy sees only `RequestView`s (ids, agent,
priority, arrival, sizes), never tensors, so it is testable without a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class RequestView:
    request_id: str
    agent_id: str
    priority: int
    arrival: float          # monotonic seconds
    prompt_tokens: int
    max_tokens: int
    generated: int = 0


class Policy(Protocol):
    name: str

    def admit(self, waiting: Sequence[RequestView], running: Sequence[RequestView], free_slots: int) -> list[str]:
        """Return the ids of waiting requests to start now, at most `free_slots` of them."""


class FifoPolicy:
    """First come, first served: admit in arrival order while there are free slots."""

    name = "fifo"

    def admit(self, waiting: Sequence[RequestView], running: Sequence[RequestView], free_slots: int) -> list[str]:
        if free_slots <= 0:
            return []
        ordered = sorted(waiting, key=lambda r: r.arrival)
        return [r.request_id for r in ordered[:free_slots]]


_POLICIES = {"fifo": FifoPolicy}


def make_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy '{name}'; known: {sorted(_POLICIES)}") from None
