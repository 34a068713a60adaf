"""Loaded models by name and version: what is served, what failed to load and why.

Loading walks the device profile's delegate list (see ``agent.runtimes``); a model that
fails is recorded with its path and reason while the others keep serving.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from agent.config import Config
from agent.errors import AgentError, InferenceError, ModelNotFoundError, ModelNotReadyError, RequestError
from agent.hardware import DelegateSpec
from agent.health.metrics import Metrics
from agent.models.stats import ModelStats, Timing
from agent.models.store import ModelVersion, active_version, scan
from agent.models.tensors import check_feeds
from agent.models.worker import Outputs, Worker
from agent.runtimes import Session, get_backend

log = structlog.get_logger(__name__)


@dataclass
class ServedModel:
    """One model version that is loaded and answering requests."""

    name: str
    version: int
    runtime: str
    source: ModelVersion
    session: Session
    worker: Worker
    loaded_at: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0
    succeeded: int = 0
    rejected: int = 0  # requests refused before running: inputs that do not fit this version
    consecutive_failures: int = 0  # runtime failures in a row: the watchdog's signal of a failing delegate
    # Recent successful latencies (s), for the installer's health window against the previous version.
    latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=1024))

    @property
    def stats(self) -> ModelStats:
        return self.worker.stats

    @property
    def inputs(self) -> Sequence[Any]:
        return self.session.inputs

    @property
    def outputs(self) -> Sequence[Any]:
        return self.session.outputs

    def _admit(self, feeds: Mapping[str, np.ndarray]) -> float:
        """Check the feeds and count the request; returns its start time."""
        try:
            check_feeds(self.session.inputs, feeds)
        except RequestError:
            self.rejected += 1  # the installer's health window counts these: a new version may reject old clients
            raise
        self.requests += 1
        return time.perf_counter()

    def _account(self, started: float, error: BaseException | None) -> None:
        if error is None:
            self.consecutive_failures = 0
            self.succeeded += 1
            self.latencies.append(time.perf_counter() - started)
            return
        self.errors += 1
        if isinstance(error, InferenceError):
            self.consecutive_failures += 1

    async def infer(self, feeds: Mapping[str, np.ndarray], *, raw_outputs: bool = False,
                    timing: Timing | None = None) -> Outputs:
        """Raises RequestError for feeds that do not fit; InferenceError if the runtime fails.

        ``timing`` (for the statistics) gets the hand-over and the runtime call's start and end.
        """
        started = self._admit(feeds)
        if timing is not None:
            timing.submitted = time.perf_counter_ns()
        try:
            outputs = self.worker.run_inline(feeds, raw_outputs, timing)
            if outputs is None:
                outputs = await self.worker.submit(feeds, raw_outputs, timing)
        except AgentError as exc:
            self._account(started, exc)
            raise
        self._account(started, None)
        return outputs

    def infer_threadsafe(self, feeds: Mapping[str, np.ndarray]) -> concurrent.futures.Future[Outputs]:
        """``infer`` for a caller on its own thread (a stream): the result comes straight from the worker.

        Raises:
            RequestError: the feeds do not fit (counted as rejected, like ``infer``).
        """
        started = self._admit(feeds)
        future = self.worker.submit_threadsafe(feeds)
        future.add_done_callback(
            lambda done: None if done.cancelled() else self._account(started, done.exception()))
        return future

    def close(self) -> None:
        self.worker.stop()
        self.session.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "state": "AVAILABLE", "runtime": self.runtime,
            "delegate": self.session.delegate, "fallbacks": list(self.session.report.fallbacks),
            "path": str(self.source.file), "batching": self.worker.batching_active,
            "inline": self.worker.inline,
            "inputs": [s.to_dict() for s in self.session.inputs],
            "outputs": [s.to_dict() for s in self.session.outputs],
            "requests": self.requests, "errors": self.errors,
        }


@dataclass(frozen=True)
class LoadFailure:
    name: str
    version: int
    path: str
    reason: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": "FAILED", "path": self.path,
                "error": self.reason}


class ModelRegistry:
    def __init__(self, config: Config, delegates: Mapping[str, Sequence[DelegateSpec]],
                 threads: int | None, metrics: Metrics) -> None:
        self.config = config
        self.delegates = delegates
        self.threads = threads
        self.metrics = metrics
        self.models: dict[str, dict[int, ServedModel]] = {}
        self.failures: dict[tuple[str, int], LoadFailure] = {}
        self.active: dict[str, int] = {}

    # -- lookup --------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> ServedModel:
        """Raises ModelNotFoundError (404) or ModelNotReadyError (503, failed to load)."""
        versions = self.models.get(name)
        if version is None:
            if versions:
                return versions[self.default_version(name)]
            if any(f.name == name for f in self.failures.values()):
                raise ModelNotReadyError(f"model '{name}' failed to load")
            raise ModelNotFoundError(f"model '{name}' not found")
        if versions and version in versions:
            return versions[version]
        if (name, version) in self.failures:
            raise ModelNotReadyError(f"model '{name}' version {version} failed to load")
        raise ModelNotFoundError(f"model '{name}' version {version} not found")

    def default_version(self, name: str) -> int:
        """Configured default, else the installer's active version, else the highest loaded."""
        versions = self.models[name]
        wanted = self.config.model_options(name).default_version
        if wanted in versions:
            return wanted
        active = self.active.get(name)
        return active if active in versions else max(versions)

    def set_active(self, name: str, version: int | None) -> None:
        """Switch the default version; one dict assignment, so each request sees old or new."""
        if version is None:
            self.active.pop(name, None)
        else:
            self.active[name] = version

    def known(self, name: str) -> bool:
        return name in self.models or any(f.name == name for f in self.failures.values())

    def version_states(self, name: str) -> list[dict[str, Any]]:
        states = [m.describe() for m in self.models.get(name, {}).values()]
        states += [f.describe() for f in self.failures.values() if f.name == name]
        return sorted(states, key=lambda s: -int(s["version"]))

    def served(self) -> Iterable[ServedModel]:
        for versions in self.models.values():
            yield from versions.values()

    @property
    def ready(self) -> bool:
        return bool(self.models)

    # -- loading -------------------------------------------------------------------------
    def _wanted(self, versions: list[ModelVersion]) -> list[ModelVersion]:
        name = versions[0].name
        opts = self.config.model.get(name)
        policy = opts.versions if opts is not None else self.config.models.versions
        active = active_version(self.config.models_dir / name)
        if active is not None and any(v.version == active for v in versions):
            self.active[name] = active
        if policy == "all":
            return versions
        if policy == "latest":
            default = opts.default_version if opts else None
            newest = active if active is not None and name in self.active else versions[-1].version
            keep = {newest} | ({default} if default else set())
            return [v for v in versions if v.version in keep]
        return [v for v in versions if v.version in set(policy)]

    async def load_all(self) -> None:
        """Load every wanted version under the models directory, one at a time (bounded memory)."""
        for versions in scan(self.config.models_dir).values():
            for entry in self._wanted(versions):
                await asyncio.to_thread(self.load, entry)

    def prepare(self, entry: ModelVersion, warm_up: bool = True,
                delegates: Sequence[DelegateSpec] | None = None) -> ServedModel:
        """Load one version and start its worker, without serving it yet.

        ``delegates`` overrides the profile's list (the watchdog falls back past a bad one).

        Raises:
            AgentError: the runtime is missing or the model failed on every delegate.
        """
        opts = self.config.model_options(entry.name)
        backend = get_backend(entry.runtime)
        specs = self.delegates.get(entry.runtime, ()) if delegates is None else delegates
        session = backend.load(entry.file, specs,
                               threads=opts.threads or self.threads,
                               options={"inter_op_threads": self.config.runtime.inter_op_threads,
                                        "allow_spinning": self.config.runtime.allow_spinning,
                                        "memory_arena": self.config.runtime.memory_arena})
        labels = (entry.name, str(entry.version))
        # Only the CPU runs inline: a hung accelerator call must stall one worker thread, never the event loop.
        inline_us = opts.inline_max_us if session.delegate == backend.cpu_delegate else 0
        worker = Worker(f"{entry.name}@{entry.version}", session, opts.batching,
                        on_batch=self.metrics.batch_size.labels(*labels).observe, inline_max_us=inline_us)
        served = ServedModel(entry.name, entry.version, entry.runtime, entry, session, worker)
        if warm_up:
            self._warm_up(served)
        return served

    def load(self, entry: ModelVersion) -> ServedModel | None:
        """Load, warm up and register one version; a failure is recorded, never raised."""
        started = time.perf_counter()
        try:
            served = self.prepare(entry)
        except AgentError as exc:
            self.failures[(entry.name, entry.version)] = LoadFailure(entry.name, entry.version, str(entry.file),
                                                                      str(exc))
            self.metrics.model_load_failures.labels(entry.name).inc()
            log.error("model.load_failed", model=entry.name, version=entry.version, path=str(entry.file),
                      reason=str(exc))
            return None
        self.register(served)
        session, worker = served.session, served.worker
        log.info("model.loaded", model=entry.name, version=entry.version, runtime=entry.runtime,
                 delegate=session.delegate, fallbacks=session.report.fallbacks, batching=worker.batching_active,
                 seconds=round(time.perf_counter() - started, 3))
        return served

    def register(self, served: ServedModel) -> None:
        """Start serving a prepared version (the default version does not change here)."""
        entry, session = served.source, served.session
        labels = (entry.name, str(entry.version))
        self.failures.pop((entry.name, entry.version), None)
        self.models.setdefault(entry.name, {})[entry.version] = served
        self.metrics.models_loaded.set(sum(len(v) for v in self.models.values()))
        self.metrics.info.labels(*labels, entry.runtime, session.delegate).set(1)
        if session.report.fallbacks:
            self.metrics.delegate_fallbacks.labels(entry.name, entry.runtime).inc(len(session.report.fallbacks))

    def _warm_up(self, served: ServedModel) -> None:
        """One call on zeros so the first client does not pay for lazy allocation."""
        opts = self.config.model_options(served.name).warmup
        if not opts.enabled:
            return
        feeds: dict[str, np.ndarray] = {}
        for spec in served.session.inputs:
            # An unknown batch dimension warms up with one row; other unknown dims need config.
            guess = tuple(1 if d is None and i == 0 else d for i, d in enumerate(spec.shape))
            shape: tuple[int | None, ...] = opts.shapes.get(spec.name) or guess
            if any(d is None for d in shape):
                log.info("model.warmup_skipped", model=served.name, version=served.version,
                         reason=f"input '{spec.name}' has dynamic dimensions; set model.{served.name}.warmup.shapes")
                return
            fill = opts.values.get(spec.name, 0)
            feeds[spec.name] = np.full([int(d or 0) for d in shape], fill, dtype=spec.dtype)
        try:
            served.worker.run_sync(feeds)
        except AgentError as exc:
            log.warning("model.warmup_failed", model=served.name, version=served.version, reason=str(exc))

    def replace(self, old: ServedModel, new: ServedModel, *, stuck: bool) -> None:
        """Serve ``new`` in ``old``'s place (same name and version); ``old`` is stopped or abandoned."""
        new.worker.stats = old.worker.stats  # statistics are per model version, across restarts
        self.models[old.name][old.version] = new
        if stuck:
            old.worker.abandon(f"model {old.name}@{old.version} was restarted by the watchdog")
        else:
            old.close()
        self.metrics.info.remove(old.name, str(old.version), old.runtime, old.session.delegate)
        self.metrics.info.labels(new.name, str(new.version), new.runtime, new.session.delegate).set(1)

    def unload(self, name: str, version: int) -> None:
        """Stop serving one version; requests already queued on it still finish."""
        served = self.models.get(name, {}).pop(version, None)
        if not self.models.get(name):
            self.models.pop(name, None)
        if served is not None:
            served.close()
            self.metrics.info.remove(name, str(version), served.runtime, served.session.delegate)
            self.metrics.models_loaded.set(sum(len(v) for v in self.models.values()))
            log.info("model.unloaded", model=name, version=version)

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the models directory: load what is new, unload what is gone or no longer wanted."""
        wanted = {(e.name, e.version): e for versions in scan(self.config.models_dir).values()
                  for e in self._wanted(versions)}
        loaded = {(m.name, m.version) for m in self.served()}
        added: list[str] = []
        removed: list[str] = []
        failed: list[str] = []
        for key in sorted(set(wanted) - loaded):
            served = await asyncio.to_thread(self.load, wanted[key])
            (added if served is not None else failed).append(f"{key[0]}@{key[1]}")
        for name, version in sorted(loaded - set(wanted)):
            await asyncio.to_thread(self.unload, name, version)
            removed.append(f"{name}@{version}")
        for key in list(self.failures):
            if key not in wanted:
                del self.failures[key]
        log.info("models.reloaded", added=added, removed=removed, failed=failed)
        return {"added": added, "removed": removed, "failed": failed}

    def close(self) -> None:
        for served in list(self.served()):
            served.close()
        self.models.clear()
