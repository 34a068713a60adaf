"""Elastic instances: a served model version answered by 1..N workers, each with its own runtime
session, sized to its load and to what the device can take.

``Instances`` is the set of workers of one served version (its own worker first) and how many
requests each holds; the served model sends a request to the least-held one and records how long
it waited in the queue. ``Scaler`` (one supervised task) reads those waits: a p95 over the
window above ``scale_up_wait_ms`` adds an instance, ``idle_s`` without queueing removes one, and
a hot or throttled device (thermal zones past a trip point, Raspberry Pi throttling flags under
``hardware_root``) or a process near its memory budget holds the count at the minimum or stops
it growing. Total runtime threads stay within the CPU budget. Each change is an event
(``instances.scaled``, with the reason) and a log line.

Loading and closing sessions run in threads (the registry's ``add_instance``/``remove_instance``);
the scaler only decides.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog

from agent.config import InstancesSection, ScalingSection
from agent.core.ports import EventSink

if TYPE_CHECKING:
    from agent.models.served import ServedModel
    from agent.models.worker import Worker

log = structlog.get_logger(__name__)


class Instances:
    """The workers of one served version; ``pick`` and ``done`` are called from any thread."""

    def __init__(self, primary: Worker) -> None:
        self._lock = threading.Lock()
        self.workers: tuple[Worker, ...] = (primary,)
        self.held: dict[int, int] = {id(primary): 0}
        self.waits: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)  # (monotonic, s)
        self.last_change = time.monotonic()

    def __len__(self) -> int:
        return len(self.workers)

    def pick(self) -> Worker:
        """The worker holding the fewest requests (the first on a tie); counts one more on it."""
        with self._lock:
            worker = min(self.workers, key=lambda w: self.held.get(id(w), 0))
            self.held[id(worker)] = self.held.get(id(worker), 0) + 1
            return worker

    def done(self, worker: Worker, wait_s: float | None) -> None:
        with self._lock:
            self.held[id(worker)] = max(0, self.held.get(id(worker), 1) - 1)
            if wait_s is not None:
                self.waits.append((time.monotonic(), wait_s))

    def add(self, worker: Worker) -> None:
        with self._lock:
            self.workers = (*self.workers, worker)
            self.held[id(worker)] = 0
            self.last_change = time.monotonic()

    def pop(self) -> Worker | None:
        """Take the newest extra worker out of rotation (never the version's own); the caller waits until
        ``holding`` it is 0 (a stream thread may have picked it just before), then stops it."""
        with self._lock:
            if len(self.workers) <= 1:
                return None
            worker = self.workers[-1]
            self.workers = self.workers[:-1]
            self.last_change = time.monotonic()
            return worker

    def holding(self, worker: Worker) -> int:
        with self._lock:
            return self.held.get(id(worker), 0)

    def forget(self, worker: Worker) -> None:
        with self._lock:
            self.held.pop(id(worker), None)

    def p95_wait(self, window_s: float) -> tuple[float | None, int]:
        """p95 queue wait (s) of the requests answered in the last ``window_s``, and how many there were."""
        since = time.monotonic() - window_s
        with self._lock:
            recent = [w for t, w in self.waits if t >= since]
        if not recent:
            return None, 0
        return float(np.percentile(recent, 95)), len(recent)


class InstanceHost(Protocol):
    """What the scaler changes (the registry): add or remove one instance of a served version."""

    def served(self) -> Sequence[ServedModel]: ...

    def instance_threads(self, served: ServedModel) -> int:
        """Runtime threads one instance of ``served`` uses."""

    async def add_instance(self, served: ServedModel) -> None:
        """Load one more session of ``served`` (in a thread) and put it in rotation.

        Raises:
            AgentError: the session could not be loaded.
        """

    async def remove_instance(self, served: ServedModel) -> bool:
        """Take the newest extra instance out of rotation and stop it (queued requests finish). False if none."""


def device_hot(root: Path, max_temp_c: float | None = None) -> str | None:
    """Why the device is too hot for more work, or None: a thermal zone at or past its lowest passive/hot
    trip point (or ``max_temp_c``), or the Raspberry Pi firmware reporting throttling now."""
    from agent.health.system import read_throttling

    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        temp = _milli(zone / "temp")
        if temp is None:
            continue
        trips = []
        for trip in zone.glob("trip_point_*_temp"):
            kind = _text(zone / trip.name.replace("_temp", "_type"))
            value = _milli(trip)
            if value is not None and value > 0 and kind in (None, "passive", "hot", "critical"):
                trips.append(value)
        limit = min([*trips, *([max_temp_c] if max_temp_c is not None else [])], default=None)
        if limit is not None and temp >= limit:
            return f"{_text(zone / 'type') or zone.name} at {temp:.1f} °C (limit {limit:.1f} °C)"
    throttling = read_throttling(root)
    if throttling is not None and throttling.now:
        active = [k for k, v in throttling.flags.items() if v and not k.endswith("_occurred")]
        return f"throttled ({', '.join(active)})"
    return None


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _milli(path: Path) -> float | None:
    text = _text(path)
    try:
        return int(text or "") / 1000.0
    except ValueError:
        return None


def process_rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - no figure: the budget cannot be judged, never a failure
        return None


class Scaler:
    """Sizes every served version's instances between its ``min`` and ``max`` (one supervised task)."""

    def __init__(self, settings: ScalingSection, host: InstanceHost, sink: EventSink, *,
                 options: Callable[[str], InstancesSection], hardware_root: Path, cpu_budget: int | None = None,
                 rss: Callable[[], int | None] = process_rss_bytes) -> None:
        self.cfg = settings
        self.host = host
        self.sink = sink
        self.options = options
        self.root = hardware_root
        # [scaling] cpu_threads, else the device profile's thread budget, else the CPU count.
        self.cpu_budget = settings.cpu_threads or cpu_budget or os.cpu_count() or 1
        self.rss = rss
        self.blocked: dict[str, str] = {}  # model key -> why it may not grow now

    def limits(self, served: ServedModel) -> tuple[int, int]:
        """(min, max) instances of ``served``; max defaults to what the CPU budget holds."""
        opts = self.options(served.name)
        per = max(1, self.host.instance_threads(served))
        most = opts.max if opts.max is not None else max(1, self.cpu_budget // per)
        return opts.min, max(opts.min, most)

    def threads_in_use(self) -> int:
        return sum((len(m.pool) if m.pool is not None else 1) * max(1, self.host.instance_threads(m))
                   for m in self.host.served() if m.state == "AVAILABLE")

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("instances.scaler_failed")
            await asyncio.sleep(self.cfg.interval_s)

    async def step(self) -> list[dict[str, Any]]:
        """One look at every served version; returns the changes made (also sent as events)."""
        hot = await asyncio.to_thread(device_hot, self.root, self.cfg.max_temp_c)
        rss = await asyncio.to_thread(self.rss) if self.cfg.memory_budget_mb is not None else None
        budget = self.cfg.memory_budget_mb * 2**20 if self.cfg.memory_budget_mb is not None else None
        changes = []
        for served in self.host.served():
            change = await self._size(served, hot, rss, budget)
            if change is not None:
                changes.append(change)
        return changes

    def _held_back(self, served: ServedModel, hot: str | None, rss: int | None, budget: int | None) -> str | None:
        """Why ``served`` may not grow now: heat, memory (RSS within 90 % of the budget), the CPU budget."""
        if hot:
            return f"hot: {hot}"
        if rss and budget and rss >= budget * 0.9:
            return f"memory: {rss / 2**20:.0f} MiB of {budget / 2**20:.0f} MiB"
        if self.threads_in_use() + self.host.instance_threads(served) > self.cpu_budget:
            return f"cpu budget: {self.threads_in_use()} of {self.cpu_budget} threads in use"
        return None

    async def _size(self, served: ServedModel, hot: str | None, rss: int | None,
                    budget: int | None) -> dict[str, Any] | None:
        if served.state != "AVAILABLE":
            return None  # unloaded while idle: it starts again from one instance (agent.models.residency)
        low, high = self.limits(served)
        now = len(served.pool) if served.pool is not None else 1
        if now > high or (hot and now > low):
            return await self._change(served, now, now - 1, f"hot: {hot}" if hot and now > low else "over max")
        if now < low:
            return await self._change(served, now, now + 1, "under min")
        pool = served.pool
        p95, n = pool.p95_wait(self.cfg.window_s) if pool is not None else (None, 0)
        wants_more = p95 is not None and n >= self.cfg.min_requests and p95 * 1e3 > self.cfg.scale_up_wait_ms
        if wants_more and p95 is not None and now < high:
            why = self._held_back(served, hot, rss, budget)
            if why is not None:
                if self.blocked.get(served.key) != why:
                    log.info("instances.blocked", model=served.name, version=served.version, instances=now, reason=why)
                self.blocked[served.key] = why
                return None
            self.blocked.pop(served.key, None)
            return await self._change(served, now, now + 1, f"p95 queue wait {p95 * 1e3:.1f} ms over "
                                                            f"{self.cfg.scale_up_wait_ms:g} ms ({n} requests)")
        self.blocked.pop(served.key, None)
        if now > low and pool is not None:
            last_busy = max((t for t, w in list(pool.waits) if w * 1e3 > self.cfg.scale_up_wait_ms / 2),
                            default=pool.last_change)
            idle = time.monotonic() - max(last_busy, pool.last_change)
            if idle >= self.cfg.idle_s:
                return await self._change(served, now, now - 1, f"idle {idle:.0f} s")
        return None

    async def _change(self, served: ServedModel, old: int, new: int, reason: str) -> dict[str, Any] | None:
        try:
            if new > old:
                await self.host.add_instance(served)
            elif not await self.host.remove_instance(served):
                return None
        except Exception as exc:  # noqa: BLE001 - a session that cannot load is reported, the model serves on
            log.warning("instances.scale_failed", model=served.name, version=served.version, reason=str(exc)[:300])
            return None
        event = {"type": "instances.scaled", "model": served.name, "version": served.version, "from": old,
                 "to": new, "reason": reason}
        log.info("instances.scaled", model=served.name, version=served.version, instances=new, previous=old,
                 reason=reason)
        self.sink.event(event)
        return event
