"""Prometheus metrics for the predict path. One registry per agent process, so tests that
start several agents in one interpreter do not collide. Request counts are not here: each
model's statistics keep them and ``agent.health.gauges`` reads them at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram("edge_agent_request_latency_seconds", "Predict latency in the agent",
                                         ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edge_agent_batch_size", "Rows per runtime call", ["model", "version"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.models_loaded = Gauge("edge_agent_models_loaded", "Model versions loaded", registry=r)
        self.model_load_failures = Counter("edge_agent_model_load_failures", "Model loads that failed",
                                           ["model"], registry=r)
        self.delegate_fallbacks = Counter("edge_agent_delegate_fallbacks", "Delegates skipped at load",
                                          ["model", "runtime"], registry=r)
        self.watchdog_recoveries = Counter("edge_agent_watchdog_recoveries", "Models healed by the watchdog",
                                           ["model", "action"], registry=r)
        self.info = Gauge("edge_agent_model_info", "Loaded model versions with runtime and delegate",
                          ["model", "version", "runtime", "delegate"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
