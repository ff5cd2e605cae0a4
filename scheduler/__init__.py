"""Scheduling policies: pure objects that see request state and decide who runs. No torch here."""
from .policy import FifoPolicy, Policy, RequestView, make_policy

__all__ = ["FifoPolicy", "Policy", "RequestView", "make_policy"]
