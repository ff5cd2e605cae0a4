"""What the console's overview charts: each served model sampled once a second, kept for the last ten
minutes (tokens/s, batch size, queue length, cache bytes against the budget, context switches, and TTFT and
queue-wait percentiles over the last minute). Sampling is a few attribute reads; it runs in the kernel's
event loop while the HTTP server is up."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

log = logging.getLogger("kernos.console")


class History:
    def __init__(self, models, metrics, period_s: float = 1.0, keep_s: float = 600.0):
        self.models = models
        self.metrics = metrics
        self.period_s = period_s
        self.points: dict[str, deque] = {}
        self._maxlen = int(keep_s / period_s)

    def sample(self) -> None:
        now = time.time()
        for m in self.models.served():
            st, live = m.engine.snapshot()
            budget = m.engine.cache_budget_bytes
            ttft = self.metrics.percentiles(m.name, "ttft_ms", 60.0)
            wait = self.metrics.percentiles(m.name, "queue_wait_ms", 60.0)
            self.points.setdefault(m.name, deque(maxlen=self._maxlen)).append({
                "t": round(now, 2), "tokens_per_s": round(st.tokens_per_s(5.0), 2), "batch": st.running,
                "waiting": st.waiting, "preempted": sum(1 for _, s in live if s == "preempted"),
                "cache_bytes": st.cache_bytes, "cache_budget_bytes": budget,
                "context_switches": st.context_switches, "ttft_p50_ms": ttft[0], "ttft_p95_ms": ttft[1],
                "queue_p50_ms": wait[0], "queue_p95_ms": wait[1]})

    def series(self, since: float = 0.0) -> dict[str, list[dict]]:
        return {name: [p for p in pts if p["t"] > since] for name, pts in self.points.items()}

    async def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:                      # noqa: BLE001 - a chart must never take the kernel down
                log.exception("console sampling")
            await asyncio.sleep(self.period_s)
