"""The agent's own counters, and ``/metrics`` rendered from everything that keeps counts.

Counting happens in the components (each model version's ``ModelStats``: requests, answers per
code, latencies, batch sizes; the few agent-wide counters here) with plain thread-safe Python,
so nothing on the request path depends on the exposition library. ``prometheus_client`` is
imported only when ``/metrics`` is first scraped (``render``, on a worker thread): a device that
is never scraped does not carry it (~3 MB with the standard-library modules it pulls in):
``agent.health.exposition`` renders the text format and is imported by the API on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

#: Upper bounds (s) of the predict latency histogram, as before the counters moved to ModelStats.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Upper bounds of the rows-per-runtime-call histogram.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Counter:
    """A labelled, monotonic, thread-safe counter (exposed as ``NAME_total``)."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def samples(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            return dict(self._values)


FamilySource = Callable[[], Iterable["Metric"]]


class Metrics:
    """Agent-wide counters, plus the sources ``render`` asks for families at scrape time."""

    def __init__(self) -> None:
        self.model_load_failures = Counter("edge_agent_model_load_failures", "Model loads that failed", ("model",))
        self.delegate_fallbacks = Counter("edge_agent_delegate_fallbacks", "Delegates skipped at load or at run time",
                                          ("model", "runtime"))
        self.watchdog_recoveries = Counter("edge_agent_watchdog_recoveries", "Models healed by the watchdog",
                                           ("model", "action"))
        self.model_unloads = Counter("edge_agent_model_unloads", "Model versions unloaded while idle", ("model",))
        self.model_reloads = Counter("edge_agent_model_reloads", "Loads of versions unloaded while idle",
                                     ("model", "outcome"))
        self.sources: list[FamilySource] = []  # system health, models, streams, link: added by the daemon

    def counters(self) -> list[Counter]:
        return [self.model_load_failures, self.delegate_fallbacks, self.watchdog_recoveries, self.model_unloads,
                self.model_reloads]

    def value(self, name: str, **labels: str) -> float:
        """One counter's current value (for tests and status)."""
        counter = next(c for c in self.counters() if c.name == name)
        return counter.value(*(labels[k] for k in counter.labels))
