"""The agent's own Prometheus families, read at scrape time from the components that keep them:
answered requests per model version, protocol and status code (from each model's statistics),
streams, and the cloud link with its outbox. Nothing is counted twice: the components count,
this module only reads (on the ``/metrics`` thread, from snapshots)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.core.ports import ModelCatalog

_STREAM_COUNTERS = (("inferred", "Inferences run by a stream"), ("dropped_frames", "Stale frames skipped"),
                    ("audio_overflow_samples", "Audio samples dropped on overflow"),
                    ("results", "Results published by a stream"), ("errors", "Stream item failures"),
                    ("reconnects", "Source reopen attempts"))
_STREAM_GAUGES = (("input_fps", "Items captured per second"), ("age_ms_p50", "Frame age at result, p50"),
                  ("age_ms_p99", "Frame age at result, p99"),
                  ("real_time_factor", "Audio processing time / audio duration"))


class AgentGauges:
    """``extra`` for the health collector: call it to get the families."""

    def __init__(self, models: ModelCatalog, streams: Callable[[], list[dict[str, Any]]],
                 link: Callable[[], dict[str, Any] | None]) -> None:
        self.models = models
        self.streams = streams
        self.link = link

    def __call__(self) -> list[Metric]:
        return [self._requests(), *self._streams(), *self._link()]

    def _requests(self) -> Metric:
        family = CounterMetricFamily("edge_agent_requests", "Predict requests answered",
                                     labels=["model", "version", "protocol", "code"])
        for model in self.models.served():
            for (protocol, code), count in sorted(model.stats.answers().items()):
                family.add_metric([model.name, str(model.version), protocol, code], count)
        return family

    def _streams(self) -> list[Metric]:
        streams = self.streams()
        families: list[Metric] = []
        for key, help_text in _STREAM_COUNTERS:
            family = CounterMetricFamily(f"edge_agent_stream_{key}", help_text, labels=["stream"])
            for s in streams:
                family.add_metric([s["name"]], float(s.get(key) or 0))
            families.append(family)
        for key, help_text in _STREAM_GAUGES:
            gauge = GaugeMetricFamily(f"edge_agent_stream_{key}", help_text, labels=["stream"])
            for s in streams:
                if s.get(key) is not None:
                    gauge.add_metric([s["name"]], float(s[key]))
            families.append(gauge)
        return families

    def _link(self) -> list[Metric]:
        status = self.link()
        if status is None:
            return []
        s, o = status["link"], status["outbox"]
        up = GaugeMetricFamily("edge_agent_link_connected", "MQTT link up (1) or down (0)")
        up.add_metric([], float(s["connected"]))
        reconnects = CounterMetricFamily("edge_agent_link_reconnects", "MQTT reconnects")
        reconnects.add_metric([], s["reconnects"])
        depth = GaugeMetricFamily("edge_agent_outbox_depth", "Messages waiting in the outbox")
        depth.add_metric([], o["depth"])
        dropped = CounterMetricFamily("edge_agent_outbox_dropped", "Messages dropped by the outbox bound",
                                      labels=["kind"])
        for kind, n in o["dropped"].items():
            dropped.add_metric([kind], n)
        return [up, reconnects, depth, dropped]
