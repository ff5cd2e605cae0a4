"""The kernel's run state, shared by the transports and the use cases: when it started, whether it is
draining, and how many syscalls it has served and is serving (the drain waits for these)."""
from __future__ import annotations

import contextlib
import time


class Lifecycle:
    def __init__(self):
        self.started = time.time()
        self.stopping = False
        self.in_flight = 0
        self.syscalls = 0

    @contextlib.contextmanager
    def track(self):
        """Count one syscall while it runs."""
        self.in_flight += 1
        self.syscalls += 1
        try:
            yield
        finally:
            self.in_flight -= 1
