"""n > 1: the other samples of one prompt, prefilled once by the engine (a group), each with its own request id,
seed (seed + i) and grammar state."""
from __future__ import annotations

import uuid
from dataclasses import replace

from ...llm.core import ServedModel
from ...llm.types import GenRequest


async def siblings(model: ServedModel, req: GenRequest, n: int, compile) -> list[GenRequest]:
    """The samples 1..n-1 of `req` (which becomes the group's first); `compile` gives each its own matcher."""
    if n <= 1:
        return []
    req.group, req.group_size = req.request_id, n
    out = []
    for i in range(1, n):
        r = replace(req, request_id=uuid.uuid4().hex, matcher=None,
                    seed=None if req.seed is None else (req.seed + i) % (1 << 64))
        await compile(model, r)
        out.append(r)
    return out
