"""Prometheus metrics (`GET /metrics` on the HTTP server), named in vLLM's style. Gauges and counters are
read from the kernel at scrape time (engine stats, the agent registry, the run state); latency histograms
are observed by the generate use case as requests finish (`Metrics.observe`). One registry per kernel,
never the global one. The last finished requests are also kept whole (`recent`) for the console."""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("kernos:time_to_first_token_seconds", "Arrival to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("kernos:e2e_request_latency_seconds", "Arrival to the last token",
                             ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("kernos:request_queue_time_seconds", "Arrival to admission into the running batch",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.recent: deque[dict] = deque(maxlen=1000)     # the last finished generations, newest last

    def observe(self, model: str, final, request_id: str = "", agent_id: str = "") -> None:
        """A finished generation's latencies (called by the generate use case)."""
        self.ttft.labels(model).observe(final.ttft_ms / 1e3)
        self.e2e.labels(model).observe(final.total_ms / 1e3)
        self.queue.labels(model).observe(final.queue_wait_ms / 1e3)
        self.recent.append({"at": time.time(), "request_id": request_id, "agent_id": agent_id, "model": model,
                            "finish": getattr(final.finish, "value", str(final.finish)),
                            "prompt_tokens": final.prompt_tokens, "generated_tokens": final.completion_tokens,
                            "ttft_ms": final.ttft_ms, "queue_wait_ms": final.queue_wait_ms,
                            "total_ms": final.total_ms, "preemptions": final.preemptions})

    def percentiles(self, model: str, key: str, window_s: float, qs=(0.5, 0.95)) -> list[float | None]:
        """Percentiles of `key` (e.g. "ttft_ms") over the generations of `model` finished in the last
        `window_s` seconds; None where there were none."""
        since = time.time() - window_s
        xs = sorted(r[key] for r in list(self.recent) if r["model"] == model and r["at"] >= since)
        return [xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None for q in qs]

    def attach(self, kernel) -> None:
        self.registry.register(_KernelCollector(kernel))


class _KernelCollector:
    def __init__(self, kernel):
        self.kernel = kernel

    def collect(self):
        k = self.kernel
        g = {name: GaugeMetricFamily(f"kernos:{name}", text, labels=["model"]) for name, text in (
            ("num_requests_running", "Requests in the running batch"),
            ("num_requests_waiting", "Requests waiting for admission (preempted and suspended included)"),
            ("kv_cache_usage_perc", "Cache bytes (KV and Mamba states) over the model's budget, 0 to 1"),
            ("kv_cache_bytes", "Cache bytes the running batch holds"),
            ("resident_cache_bytes", "KV kept between calls (resident contexts and shared prefixes)"))}
        c = {name: CounterMetricFamily(f"kernos:{name}", text, labels=["model"]) for name, text in (
            ("prompt_tokens", "Prompt tokens prefilled"), ("generation_tokens", "Tokens generated"),
            ("request_success", "Requests finished"), ("num_preemptions", "Context switches (preemptions)"),
            ("prefix_cache_queries", "Prompt tokens prefilled or looked up in the resident cache"),
            ("prefix_cache_hits", "Prompt tokens served by the resident cache"),
            ("spec_decode_num_draft_tokens", "Tokens drafted by prompt lookup"),
            ("spec_decode_num_accepted_tokens", "Drafted tokens accepted"))}
        for m in k.llm.models.values():
            st = m.engine.stats
            budget = m.engine.cache_budget_bytes
            g["num_requests_running"].add_metric([m.name], st.running)
            g["num_requests_waiting"].add_metric([m.name], st.waiting)
            g["kv_cache_usage_perc"].add_metric([m.name], st.cache_bytes / budget if budget else 0.0)
            g["kv_cache_bytes"].add_metric([m.name], st.cache_bytes)
            c["prompt_tokens"].add_metric([m.name], st.prompt_tokens)
            c["generation_tokens"].add_metric([m.name], st.generated_tokens)
            c["request_success"].add_metric([m.name], st.completed - st.cancelled)
            c["num_preemptions"].add_metric([m.name], st.context_switches)
            g["resident_cache_bytes"].add_metric([m.name], st.resident_bytes)
            c["prefix_cache_queries"].add_metric([m.name], st.prompt_tokens)
            c["prefix_cache_hits"].add_metric([m.name], st.prefix_tokens_reused)
            c["spec_decode_num_draft_tokens"].add_metric([m.name], st.draft_tokens)
            c["spec_decode_num_accepted_tokens"].add_metric([m.name], st.draft_accepted)
        yield from g.values()
        yield from c.values()
        pauses = CounterMetricFamily("kernos:tool_pauses", "KV kept through tool pauses, by outcome",
                                     labels=["model", "outcome"])
        for m in k.llm.models.values():
            for outcome, n in sorted(m.engine.stats.pauses.items()):
                pauses.add_metric([m.name, outcome], n)
        yield pauses
        rounds = CounterMetricFamily("kernos:continual_rounds", "Continual tuning rounds ended, by outcome",
                                     labels=["outcome"])
        for outcome, n in sorted(k.continual.counts().items()):
            rounds.add_metric([outcome], n)
        yield rounds
        programs = GaugeMetricFamily("kernos:programs", "Agent programs seen lately, by state", labels=["state"])
        states = {"running": 0, "paused": 0, "idle": 0}
        for p in k.llm.programs.list():
            states[p.state] += 1
        for state, n in states.items():
            programs.add_metric([state], n)
        yield programs
        agents = k.registry.list(include_exited=True)
        active = GaugeMetricFamily("kernos:agents_active", "Agents with a live session")
        active.add_metric([], sum(1 for a in agents if a.state == "active"))
        yield active
        tokens = CounterMetricFamily("kernos:agent_generation_tokens", "Tokens generated per agent", labels=["agent"])
        syscalls = CounterMetricFamily("kernos:agent_syscalls", "Syscalls per agent", labels=["agent"])
        for a in agents:
            tokens.add_metric([a.agent_id], a.completion_tokens)
            syscalls.add_metric([a.agent_id], a.syscalls)
        yield tokens
        yield syscalls
        total = CounterMetricFamily("kernos:syscalls", "Syscalls served, every transport")
        total.add_metric([], k.lifecycle.syscalls)
        yield total
        in_flight = GaugeMetricFamily("kernos:syscalls_in_flight", "Syscalls being served")
        in_flight.add_metric([], k.lifecycle.in_flight)
        yield in_flight
        if k.cluster is not None:
            yield from _cluster(k.cluster)


def _cluster(c):
    """The cluster as this node last saw it at its heartbeat (no database round trip on a scrape)."""
    nodes = GaugeMetricFamily("kernos:cluster_nodes", "Nodes of the cluster with a current lease, by state",
                              labels=["state"])
    for state in ("up", "draining"):
        nodes.add_metric([state], sum(1 for n in c.view if n.state == state))
    yield nodes
    forwarded = CounterMetricFamily("kernos:cluster_forwarded_calls", "Agents' calls sent to their home node",
                                    labels=["node"])
    forwarded.add_metric([c.node_id], c.forwarded)
    yield forwarded
    stranded = CounterMetricFamily("kernos:cluster_unreachable_home_calls",
                                   "Calls served here because their home node could not be reached",
                                   labels=["node"])
    stranded.add_metric([c.node_id], c.served_for_dead)
    yield stranded
