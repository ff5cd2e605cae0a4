"""The own engine: continuous batching over a transformers model, with preemption and exact resume."""
from .loop import TransformersEngine

__all__ = ["TransformersEngine"]
