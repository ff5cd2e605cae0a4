"""Per-agent quotas: the window arithmetic in-process, and RESOURCE_EXHAUSTED with a retry hint through a
real kernel."""
from __future__ import annotations

import time

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.kernel.security.quotas import Limits, QuotaExceeded, Quotas


def test_windows_and_retry_hints():
    q = Quotas(Limits(requests_per_second=2, tokens_per_minute=100, concurrent_generations=1),
               {"vip": Limits()})
    q.request("a", now=0.0)
    q.request("a", now=0.1)
    with pytest.raises(QuotaExceeded) as err:
        q.request("a", now=0.5)
    assert err.value.retry_after_s == pytest.approx(0.5)
    q.request("a", now=1.01)  # the window moved on
    lease = q.start_generation("a", 60, now=0.0)
    with pytest.raises(QuotaExceeded, match="generations"):
        q.start_generation("a", 10, now=1.0)
    q.end_generation(lease, 30, now=2.0)          # 60 + 30 tokens used in the minute
    with pytest.raises(QuotaExceeded) as err:
        q.start_generation("a", 20, now=3.0)
    assert err.value.retry_after_s == pytest.approx(57.0)  # when the first 60 tokens leave the window
    q.start_generation("a", 20, now=61.0)
    for _ in range(50):
        q.request("vip")                          # overrides: no limits for this agent


def test_quotas_through_the_kernel(tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       quotas={"requests_per_second": 5})
    with open(cfg, "a") as f:
        f.write("[quotas.agents.counted]\ntokens_per_minute = 12\n")
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        fast = kernos.sdk.connect(address, agent="fast")
        with pytest.raises(kernos.sdk.ResourceExhausted) as err:
            for _ in range(20):
                fast.kernel.heartbeat()
        assert err.value.retry_after_s is not None and 0 <= err.value.retry_after_s <= 1.0
        assert "requests per second" in err.value.message
        time.sleep(1.1)
        fast.kernel.heartbeat()  # served again after the hint
        counted = kernos.sdk.connect(address, agent="counted")
        counted.llm.chat("one two three four five six", max_tokens=5)  # 6 prompt + 5 generated tokens
        with pytest.raises(kernos.sdk.ResourceExhausted, match="tokens per minute") as err:
            counted.llm.chat("seven eight", max_tokens=2)
        assert 50 < err.value.retry_after_s <= 60
    finally:
        assert stop_kernel(proc) == 0
