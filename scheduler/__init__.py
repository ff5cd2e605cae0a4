"""Scheduling policies: pure objects that see request state and decide who runs. No torch here."""
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

__all__ = ["POLICIES", "Budget", "Decision", "FairSharePolicy", "FifoPolicy", "Policy", "PriorityPolicy",
           "RequestView", "RoundRobinPolicy", "make_policy"]
