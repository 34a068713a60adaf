"""Prometheus collector for system health: reads a fresh :class:`SystemSnapshot` at every scrape.

A custom collector, not Gauges set by a timer, so ``/metrics`` is never staler than the scrape and
nothing runs between scrapes. Absent facts (no thermal zone, no GPU, no throttle word) produce no
family at all rather than a zero that would read as "cool" or "idle". The daemon adds its own
gauges (link, outbox, streams) through ``extra``; this module knows nothing of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.health.system import AUTO, Auto, CpuSampler, SystemSnapshot, read_system, resolve_nvidia_smi

log = structlog.get_logger(__name__)

# name -> (help, label names); every family this collector can emit, in emission order.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "edge_agent_system_cpu_percent": ("Host CPU busy percent since the previous scrape", ()),
    "edge_agent_system_load": ("Load average", ("period",)),
    "edge_agent_system_memory_total_bytes": ("Physical memory (MemTotal)", ()),
    "edge_agent_system_memory_available_bytes": ("Memory available without swapping (MemAvailable)", ()),
    "edge_agent_system_memory_percent": ("Memory in use, percent of total", ()),
    "edge_agent_process_rss_bytes": ("Agent resident set size", ()),
    "edge_agent_process_cpu_percent": ("Agent CPU percent since the previous scrape (100 = one core)", ()),
    "edge_agent_process_threads": ("Agent threads", ()),
    "edge_agent_process_open_fds": ("Agent open file descriptors", ()),
    "edge_agent_disk_free_bytes": ("Free bytes on the state directory's file system", ()),
    "edge_agent_disk_used_percent": ("Used percent of the state directory's file system", ()),
    "edge_agent_temperature_celsius": ("Temperature per thermal zone (or hwmon sensor)", ("zone",)),
    "edge_agent_throttled": ("Raspberry Pi firmware throttle flags (1 = set)", ("flag",)),
    "edge_agent_gpu_utilization_percent": ("GPU utilisation percent", ("gpu",)),
    "edge_agent_gpu_memory_used_bytes": ("GPU memory used", ("gpu",)),
    "edge_agent_gpu_memory_total_bytes": ("GPU memory total", ("gpu",)),
    "edge_agent_gpu_temperature_celsius": ("GPU temperature", ("gpu",)),
}


class HealthCollector(Collector):
    """System health families, read at scrape time, plus whatever ``extra`` yields."""

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        state_dir: str | os.PathLike[str] = ".",
        extra: Callable[[], Iterable[Metric]] | None = None,
        nvidia_smi: str | Auto | None = AUTO,
        gpu_timeout_s: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.state_dir = Path(state_dir)
        self.extra = extra
        # Resolved once: a PATH scan per scrape buys nothing (a driver installed later needs a restart anyway).
        self.nvidia_smi = resolve_nvidia_smi(nvidia_smi)
        self.gpu_timeout_s = gpu_timeout_s
        self.sampler = CpuSampler()  # our own CPU interval, separate from telemetry's
        self.sampler.system_percent()  # prime, so the first scrape already has a figure
        self.sampler.process_percent(self.sampler.process())

    def register(self, registry: CollectorRegistry) -> HealthCollector:
        """Add to ``registry``. Raises ValueError if a family name is already registered there."""
        registry.register(self)
        return self

    def describe(self) -> Iterator[Metric]:
        """The fixed families, so the registry rejects a clash at ``register`` (``extra`` is not described)."""
        for name, (doc, labels) in FAMILIES.items():
            yield GaugeMetricFamily(name, doc, labels=list(labels))

    def snapshot(self) -> SystemSnapshot:
        return read_system(
            root=self.root,
            state_dir=self.state_dir,
            nvidia_smi=self.nvidia_smi,
            sampler=self.sampler,
            gpu_timeout_s=self.gpu_timeout_s,
        )

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())
        if self.extra is None:
            return
        try:
            extra = list(self.extra())
        except Exception:  # a broken daemon gauge must not take system health down with it
            log.exception("health.extra_failed")
            return
        yield from extra


def families(snap: SystemSnapshot) -> Iterator[Metric]:
    """Gauge families for one snapshot; a family with no sample (absent fact) is left out."""
    samples: dict[str, list[tuple[tuple[str, ...], float]]] = {name: [] for name in FAMILIES}

    def put(name: str, value: float | None, *labels: str) -> None:
        if value is not None:
            samples[name].append((labels, float(value)))

    put("edge_agent_system_cpu_percent", snap.cpu_percent)
    if snap.load:
        for period, value in zip(("1m", "5m", "15m"), snap.load, strict=True):
            put("edge_agent_system_load", value, period)
    if snap.memory:
        put("edge_agent_system_memory_total_bytes", snap.memory.total_bytes)
        put("edge_agent_system_memory_available_bytes", snap.memory.available_bytes)
        put("edge_agent_system_memory_percent", snap.memory.percent)
    if snap.process:
        put("edge_agent_process_rss_bytes", snap.process.rss_bytes)
        put("edge_agent_process_cpu_percent", snap.process.cpu_percent)
        put("edge_agent_process_threads", snap.process.threads)
        put("edge_agent_process_open_fds", snap.process.open_fds)
    if snap.disk:
        put("edge_agent_disk_free_bytes", snap.disk.free_bytes)
        put("edge_agent_disk_used_percent", snap.disk.used_percent)
    for zone, celsius in snap.temperatures.items():
        put("edge_agent_temperature_celsius", celsius, zone)
    if snap.throttling:
        for flag, on in snap.throttling.flags.items():
            put("edge_agent_throttled", 1.0 if on else 0.0, flag)
    for gpu in snap.gpus:
        put("edge_agent_gpu_utilization_percent", gpu.utilization_percent, gpu.index)
        put("edge_agent_gpu_memory_used_bytes", gpu.memory_used_bytes, gpu.index)
        put("edge_agent_gpu_memory_total_bytes", gpu.memory_total_bytes, gpu.index)
        put("edge_agent_gpu_temperature_celsius", gpu.temperature_celsius, gpu.index)

    for name, rows in samples.items():
        if not rows:
            continue
        doc, label_names = FAMILIES[name]
        family = GaugeMetricFamily(name, doc, labels=list(label_names))
        for labels, value in rows:
            family.add_metric(list(labels), value)
        yield family
