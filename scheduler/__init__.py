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
                     ProgramPolicy,
                     RequestView,
                     RoundRobinPolicy,
                     make_policy,
)
from .programs import Program, Programs, default_program_id
from .queue import RunQueue

__all__ = ["POLICIES", "Budget", "Decision", "FairSharePolicy", "FifoPolicy", "Policy", "PriorityPolicy", "Program",
           "ProgramPolicy", "Programs", "RequestView", "RoundRobinPolicy", "RunQueue", "default_program_id",
           "make_policy"]
