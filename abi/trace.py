"""The trace record: one per syscall (agent, kind, status, request, response, timings), written by the edge for
every transport alike and read by the fine-tuner, the console and the audit log."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TraceRecord:
    agent_id: str
    kind: str  # the syscall's trace kind, e.g. "llm.generate", "kernel.register"
    status: str  # a status code name (`kernos.abi.errors.CODES`), "OK" on success
    request: dict
    response: dict
    timings: dict
    ts: float = 0.0
