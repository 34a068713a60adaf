"""The agent's Prometheus families, read at scrape time from the components that keep the counts:
system health (a fresh snapshot per scrape), each served model version (answers per protocol
and code, latency, batch sizes, runtime and delegate; from its ``ModelStats`` and the catalogue),
streams, and the cloud link with its outbox. Nothing is counted twice: the components count,
this module only reads (on the ``/metrics`` thread, from snapshots).

``prometheus_client`` is imported when the families are built, never at import: the daemon
imports this module at start, and a device that is never scraped does not load the library.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.ports import ModelCatalog
from agent.health.system import AUTO, Auto, CpuSampler, read_system

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

_STREAM_COUNTERS = (("inferred", "Inferences run by a stream"), ("dropped_frames", "Stale frames skipped"),
                    ("audio_overflow_samples", "Audio samples dropped on overflow"),
                    ("results", "Results published by a stream"), ("errors", "Stream item failures"),
                    ("reconnects", "Source reopen attempts"))
_STREAM_GAUGES = (("input_fps", "Items captured per second"), ("age_ms_p50", "Frame age at result, p50"),
                  ("age_ms_p99", "Frame age at result, p99"),
                  ("real_time_factor", "Audio processing time / audio duration"))


class SystemFamilies:
    """System health for ``/metrics``: a fresh snapshot per scrape, CPU percent since the previous one."""

    def __init__(self, root: str | os.PathLike[str], state_dir: str | os.PathLike[str],
                 nvidia_smi: str | Auto | None = AUTO) -> None:
        self.root, self.state_dir, self.nvidia_smi = Path(root), Path(state_dir), nvidia_smi
        self.sampler = CpuSampler()  # our own interval, apart from status and telemetry
        self.sampler.system_percent()  # prime, so the first scrape already has a figure
        self.sampler.process_percent(self.sampler.process())

    def __call__(self) -> list[Metric]:
        from agent.health.collector import families

        snapshot = read_system(root=self.root, state_dir=self.state_dir, nvidia_smi=self.nvidia_smi,
                               sampler=self.sampler)
        return list(families(snapshot))


class ModelFamilies:
    """Per model version: answers, latency and batch histograms, runtime/delegate, and how many are loaded."""

    def __init__(self, models: ModelCatalog) -> None:
        self.models = models

    def __call__(self) -> list[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        served = sorted(self.models.served(), key=lambda m: (m.name, m.version))
        requests = CounterMetricFamily("edge_agent_requests", "Predict requests answered",
                                       labels=["model", "version", "protocol", "code"])
        latency = HistogramMetricFamily("edge_agent_request_latency_seconds", "Predict latency in the agent",
                                        labels=["model", "version"])
        batch = HistogramMetricFamily("edge_agent_batch_size", "Rows per successful runtime call",
                                      labels=["model", "version"])
        info = GaugeMetricFamily("edge_agent_model_info", "Loaded model versions with runtime and delegate",
                                 labels=["model", "version", "runtime", "delegate"])
        loaded = GaugeMetricFamily("edge_agent_models_loaded", "Model versions loaded", value=len(served))
        instances = GaugeMetricFamily("edge_agent_model_instances", "Workers (runtime sessions) of a model version",
                                      labels=["model", "version"])
        unloaded = GaugeMetricFamily("edge_agent_model_unloaded", "1 while a version is unloaded for idleness",
                                     labels=["model", "version"])
        cold = GaugeMetricFamily("edge_agent_model_cold_start_seconds",
                                 "Last load of a version unloaded while idle, to serving again",
                                 labels=["model", "version"])
        for m in served:
            version = str(m.version)
            unloaded.add_metric([m.name, version], 0 if m.state == "AVAILABLE" else 1)
            if m.cold_start_ms is not None:
                cold.add_metric([m.name, version], m.cold_start_ms / 1e3)
            for (protocol, code), count in sorted(m.stats.answers().items()):
                requests.add_metric([m.name, version, protocol, code], count)
            buckets, total = m.stats.latency_histogram()
            latency.add_metric([m.name, version], buckets, total)
            buckets, total = m.stats.batch_histogram()
            batch.add_metric([m.name, version], buckets, total)
            info.add_metric([m.name, version, m.runtime, m.session.delegate], 1)
            instances.add_metric([m.name, version], 0 if m.state != "AVAILABLE" else len(m.pool) if m.pool else 1)
        return [requests, latency, batch, info, loaded, instances, unloaded, cold]


class AgentFamilies:
    """Streams and the cloud link with its outbox."""

    def __init__(self, streams: Callable[[], list[dict[str, Any]]],
                 link: Callable[[], dict[str, Any] | None]) -> None:
        self.streams = streams
        self.link = link

    def __call__(self) -> list[Metric]:
        return [*self._streams(), *self._link()]

    def _streams(self) -> list[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

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
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

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


class ShadowFamilies:
    """Shadow versions against their serving versions: samples compared and dropped, agreement and
    the kind's figures, both versions' runtime-call latency quantiles."""

    def __init__(self, shadows: Callable[[], list[dict[str, Any]]]) -> None:
        self.shadows = shadows

    def __call__(self) -> list[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        labels = ["model", "version", "serving_version"]
        compared = CounterMetricFamily("edge_agent_shadow_compared", "Mirrored samples compared", labels=labels)
        dropped = CounterMetricFamily("edge_agent_shadow_dropped", "Samples dropped: the shadow's queue was full",
                                      labels=labels)
        errors = CounterMetricFamily("edge_agent_shadow_errors", "Samples the shadow failed on", labels=labels)
        agreement = GaugeMetricFamily("edge_agent_shadow_agreement", "Agreement figures by kind",
                                      labels=[*labels, "kind", "metric"])
        latency = GaugeMetricFamily("edge_agent_shadow_latency_seconds", "Runtime-call latency quantiles",
                                    labels=[*labels, "role", "quantile"])
        for s in self.shadows():
            key = [s["model"], str(s["version"]), str(s["serving_version"])]
            compared.add_metric(key, s["compared"])
            dropped.add_metric(key, s["dropped"])
            errors.add_metric(key, s["errors"])
            figures = {"agreement": s["agreement"], **(s.get("metrics") or {})}
            for metric, value in figures.items():
                if value is not None:
                    agreement.add_metric([*key, s["kind"], metric], float(value))
            for role, quantiles in (s.get("latency_ms") or {}).items():
                for q, value in quantiles.items():
                    if value is not None:
                        latency.add_metric([*key, role, "0.5" if q == "p50" else "0.99"], value / 1e3)
        return [compared, dropped, errors, agreement, latency]
