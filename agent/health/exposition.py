"""``/metrics`` in the Prometheus text format, built by ``prometheus_client`` from the agent's
counters and family sources. Imported on the first scrape only (see ``agent.core.metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.core.metrics import Metrics

log = structlog.get_logger(__name__)


def families(metrics: Metrics) -> list[Metric]:
    """Every family: the agent's counters, then each source's; a broken source is logged and skipped."""
    out: list[Metric] = []
    for counter in metrics.counters():
        family = CounterMetricFamily(counter.name, counter.doc, labels=list(counter.labels))
        for labels, value in sorted(counter.samples().items()):
            family.add_metric(list(labels), value)
        out.append(family)
    for source in metrics.sources:
        try:
            out.extend(source())
        except Exception:  # one broken gauge must not take the others down with it
            log.exception("health.metrics_source_failed", source=type(source).__name__)
    return out


class _Scrape(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from families(self.metrics)


def render(metrics: Metrics) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(metrics))
    return generate_latest(registry)
