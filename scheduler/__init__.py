"""Scheduling: the policies (pure objects that see request state and decide who runs) and the run queue they
order. No torch here."""
from .policy import (
                     POLICIES,
                     Budget,
                     Decision,
                     FairSharePolicy,
                     FifoPolicy,
                     Policy,
                     PriorityPolicy,
                     RequestView,
                     RoundRobinPolicy,
                     make_policy,
)
from .queue import RunQueue

__all__ = ["POLICIES", "Budget", "Decision", "FairSharePolicy", "FifoPolicy", "Policy", "PriorityPolicy",
           "RequestView", "RoundRobinPolicy", "RunQueue", "make_policy"]
