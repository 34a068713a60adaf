"""Loaded models by name and version: what is served, what failed to load and why.

Loading walks the device profile's delegate list (see ``agent.runtimes``); a model that
fails is recorded with its path and reason while the others keep serving.

The served set is an immutable snapshot, replaced whole on every change. Changes happen on
the event loop only (loading and closing sessions run in threads, then the loop swaps the
snapshot in), so the API, ``/metrics``, the streams and the watchdog can read from any
thread without locks and never see a half-made change. Implements ``ModelSwapper``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import structlog

from agent.config import ModelSection, RuntimeSection
from agent.core.metrics import Metrics
from agent.errors import AgentError, ModelNotFoundError, ModelNotReadyError
from agent.hardware import DelegateSpec
from agent.models.instances import Instances
from agent.models.served import AVAILABLE, LoadFailure, ServedModel
from agent.models.store import ModelVersion, active_version, scan
from agent.models.worker import Worker
from agent.runtimes import get_backend

log = structlog.get_logger(__name__)

_EMPTY: Mapping[Any, Any] = MappingProxyType({})
_DEFAULT_OPTIONS = ModelSection()  # frozen: shared; validating a new one per request costs ~10 µs


@dataclass(frozen=True)
class _Snapshot:
    models: Mapping[str, Mapping[int, ServedModel]] = field(default_factory=lambda: _EMPTY)
    failures: Mapping[tuple[str, int], LoadFailure] = field(default_factory=lambda: _EMPTY)
    active: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    served: tuple[ServedModel, ...] = ()


def _frozen(models: Mapping[str, Mapping[int, ServedModel]], failures: Mapping[tuple[str, int], LoadFailure],
            active: Mapping[str, int]) -> _Snapshot:
    models = MappingProxyType({n: MappingProxyType(dict(v)) for n, v in models.items() if v})
    served = tuple(m for versions in models.values() for m in versions.values())
    return _Snapshot(models, MappingProxyType(dict(failures)), MappingProxyType(dict(active)), served)


def stop_workers(workers: Sequence[Worker]) -> None:
    """Blocking: stop each worker (queued requests finish first), then close its session."""
    for worker in workers:
        worker.stop()
        worker.session.close()


class ModelRegistry:
    """The served models (``ModelCatalog`` for readers, ``ModelSwapper`` for the deployer and watchdog)."""

    def __init__(self, models_dir: Path, *, model_options: Mapping[str, ModelSection],
                 versions_policy: Literal["latest", "all"], runtime: RuntimeSection,
                 delegates: Mapping[str, Sequence[DelegateSpec]], threads: int | None, metrics: Metrics,
                 cache_dir: Path | None = None, elastic: bool = False) -> None:
        self.models_dir = models_dir
        self.elastic = elastic  # [scaling] enabled: each version gets an instance pool (agent.models.instances)
        self.model_options = model_options
        self.versions_policy = versions_policy
        self.runtime = runtime
        self.delegates = delegates
        self.threads = threads
        self.metrics = metrics
        self.cache_dir = cache_dir if runtime.optimized_cache else None  # runtimes' own caches (ONNX format)
        self._snap = _Snapshot()
        self._owner: int | None = None  # the event loop's thread, set by the first change

    def options(self, name: str) -> ModelSection:
        """``[model.NAME]``, or the defaults."""
        return self.model_options.get(name) or _DEFAULT_OPTIONS

    # -- reading (any thread) ------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._snap.models)

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """Raises ModelNotFoundError (404) or ModelNotReadyError (503, failed to load)."""
        snap = self._snap
        versions = snap.models.get(name)
        if version is None:
            if versions:
                return versions[self._default(snap, name, versions)]
            if any(f.name == name for f in snap.failures.values()):
                raise ModelNotReadyError(f"model '{name}' failed to load")
            raise ModelNotFoundError(f"model '{name}' not found")
        if versions and version in versions:
            return versions[version]
        if (name, version) in snap.failures:
            raise ModelNotReadyError(f"model '{name}' version {version} failed to load")
        raise ModelNotFoundError(f"model '{name}' version {version} not found")

    def find(self, name: str, version: int) -> ServedModel | None:
        return self._snap.models.get(name, _EMPTY).get(version)

    def versions(self, name: str) -> list[int]:
        return sorted(self._snap.models.get(name, _EMPTY))

    def default_version(self, name: str) -> int:
        """Configured default, else the installer's active version, else the highest loaded."""
        snap = self._snap
        return self._default(snap, name, snap.models[name])

    def _default(self, snap: _Snapshot, name: str, versions: Mapping[int, ServedModel]) -> int:
        wanted = self.options(name).default_version
        if wanted is not None and wanted in versions:
            return wanted
        active = snap.active.get(name)
        return active if active is not None and active in versions else max(versions)

    def served(self) -> tuple[ServedModel, ...]:
        return self._snap.served

    def failures(self) -> tuple[LoadFailure, ...]:
        return tuple(self._snap.failures.values())

    def known(self, name: str) -> bool:
        snap = self._snap
        return name in snap.models or any(f.name == name for f in snap.failures.values())

    def version_states(self, name: str) -> list[dict[str, Any]]:
        snap = self._snap
        states = [m.describe() for m in snap.models.get(name, _EMPTY).values()]
        states += [f.describe() for f in snap.failures.values() if f.name == name]
        return sorted(states, key=lambda s: -int(s["version"]))

    def delegates_for(self, runtime: str) -> Sequence[DelegateSpec]:
        return self.delegates.get(runtime, ())

    # -- changing (event loop only) ------------------------------------------------------
    def _change(self, models: Mapping[str, Mapping[int, ServedModel]] | None = None,
                failures: Mapping[tuple[str, int], LoadFailure] | None = None,
                active: Mapping[str, int] | None = None) -> None:
        """Swap in a new snapshot; refuses to run anywhere but the thread that made the first change."""
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif me != self._owner:
            raise RuntimeError("the model registry changes only on the event loop's thread")
        snap = self._snap
        self._snap = _frozen(snap.models if models is None else models,
                             snap.failures if failures is None else failures,
                             snap.active if active is None else active)

    def _models_copy(self) -> dict[str, dict[int, ServedModel]]:
        return {n: dict(v) for n, v in self._snap.models.items()}

    def register(self, served: ServedModel) -> None:
        """Start serving a prepared version (the default version does not change here)."""
        entry, session = served.source, served.session
        models = self._models_copy()
        replaced = models.setdefault(entry.name, {}).get(entry.version)
        models[entry.name][entry.version] = served
        failures = {k: v for k, v in self._snap.failures.items() if k != (entry.name, entry.version)}
        self._change(models, failures)
        if replaced is not None and replaced is not served:  # a reinstall of a loaded version: stop the old one
            threading.Thread(target=replaced.close, name=f"close-{replaced.key}", daemon=True).start()
        if session.report.fallbacks:
            self.metrics.delegate_fallbacks.inc(entry.name, entry.runtime, amount=len(session.report.fallbacks))

    def set_active(self, name: str, version: int | None) -> None:
        """Switch the default version; one snapshot swap, so each request sees old or new."""
        active = dict(self._snap.active)
        if version is None:
            active.pop(name, None)
        else:
            active[name] = version
        self._change(active=active)

    def replace(self, old: ServedModel, new: ServedModel, *, stuck: bool) -> bool:
        """Serve ``new`` in ``old``'s place (same name and version); ``old`` is stopped or abandoned.

        False (and nothing changes) if ``old`` is no longer served, e.g. a deployment unloaded it
        while ``new`` was loading: the caller closes ``new``.
        """
        if self.find(old.name, old.version) is not old:
            return False
        new.worker.stats = old.worker.stats  # statistics are per model version, across restarts
        new.mirror = old.mirror  # a shadow keeps mirroring the restarted version
        new.stats.restarted()
        models = self._models_copy()
        models.setdefault(old.name, {})[old.version] = new
        self._change(models)
        if stuck:
            old.worker.abandon(f"model {old.name}@{old.version} was restarted by the watchdog")
            extras = old.pool.workers[1:] if old.pool is not None else ()
            if extras:  # the restarted version starts again from one instance; the scaler grows it again
                threading.Thread(target=stop_workers, args=(extras,), name=f"close-{old.key}-instances",
                                 daemon=True).start()
        else:
            threading.Thread(target=old.close, name=f"close-{old.key}", daemon=True).start()
        return True

    async def unload(self, name: str, version: int) -> None:
        """Stop serving one version; requests already queued on it still finish (closed in a thread)."""
        served = self._snap.models.get(name, _EMPTY).get(version)
        if served is None:
            return
        models = self._models_copy()
        del models[name][version]
        self._change(models)
        await asyncio.to_thread(served.close)
        log.info("model.unloaded", model=name, version=version)

    def _failed(self, entry: ModelVersion, reason: str) -> None:
        failures = dict(self._snap.failures)
        failures[(entry.name, entry.version)] = LoadFailure(entry.name, entry.version, str(entry.file), reason)
        self._change(failures=failures)

    # -- loading -------------------------------------------------------------------------
    def _wanted(self, versions: list[ModelVersion], active: dict[str, int]) -> list[ModelVersion]:
        """The versions to serve of one model; records its installer-chosen active version in ``active``."""
        name = versions[0].name
        opts = self.options(name)
        policy = opts.versions if name in self.model_options else self.versions_policy
        current = active_version(self.models_dir / name)
        if current is not None and any(v.version == current for v in versions):
            active[name] = current
        if policy == "all":
            return versions
        if policy == "latest":
            newest = current if name in active else versions[-1].version
            keep = {newest} | ({opts.default_version} if opts.default_version else set())
            return [v for v in versions if v.version in keep]
        return [v for v in versions if v.version in set(policy)]

    def _scan(self) -> tuple[list[ModelVersion], dict[str, int]]:
        """Blocking: what the models directory holds and wants served (call from a thread)."""
        active: dict[str, int] = {}
        wanted = [e for versions in scan(self.models_dir).values() for e in self._wanted(versions, active)]
        return wanted, active

    async def load_all(self) -> None:
        """Load every wanted version under the models directory, one at a time (bounded memory)."""
        wanted, active = await asyncio.to_thread(self._scan)
        self._change(active={**self._snap.active, **active})
        for entry in wanted:
            await self.load(entry)

    def _load_session(self, entry: ModelVersion, delegates: Sequence[DelegateSpec] | None,
                      threads: int | None = None) -> ServedModel:
        """Blocking: the runtime session and its worker."""
        opts = self.options(entry.name)
        backend = get_backend(entry.runtime)
        specs = self.delegates_for(entry.runtime) if delegates is None else delegates
        session = backend.load(entry.file, specs, threads=threads or opts.threads or self.threads,
                               options={"inter_op_threads": self.runtime.inter_op_threads,
                                        "allow_spinning": self.runtime.allow_spinning,
                                        "memory_arena": self.runtime.memory_arena, "cache_dir": self.cache_dir})
        # Only the CPU runs inline: a hung accelerator call must stall one worker thread, never the event loop.
        inline_us = opts.inline_max_us if session.delegate == backend.cpu_delegate else 0
        worker = Worker(f"{entry.name}@{entry.version}", session, opts.batching, inline_max_us=inline_us,
                        inline_max_bytes=opts.inline_max_bytes)
        served = ServedModel(entry.name, entry.version, entry.runtime, entry, session, worker)
        if self.elastic:
            served.pool = Instances(worker)
        return served

    async def prepare(self, entry: ModelVersion, warm_up: bool = True,
                      delegates: Sequence[DelegateSpec] | None = None, threads: int | None = None) -> ServedModel:
        """Load one version and start its worker in a thread, without serving it yet.

        ``delegates`` overrides the profile's list (the watchdog falls back past a bad one);
        ``threads`` the runtime threads (a shadow version runs on fewer).

        Raises:
            AgentError: the runtime is missing or the model failed on every delegate.
        """

        def load() -> ServedModel:
            served = self._load_session(entry, delegates, threads)
            if warm_up:
                self.warm_up(served)
            return served

        return await asyncio.to_thread(load)

    async def load(self, entry: ModelVersion) -> ServedModel | None:
        """Load, warm up and register one version; a failure is recorded, never raised."""
        started = time.perf_counter()
        try:
            served = await self.prepare(entry)
        except AgentError as exc:
            self._failed(entry, str(exc))
            self.metrics.model_load_failures.inc(entry.name)
            log.error("model.load_failed", model=entry.name, version=entry.version, path=str(entry.file),
                      reason=str(exc))
            return None
        self.register(served)
        session, worker = served.session, served.worker
        log.info("model.loaded", model=entry.name, version=entry.version, runtime=entry.runtime,
                 delegate=session.delegate, fallbacks=session.report.fallbacks, batching=worker.batching_active,
                 seconds=round(time.perf_counter() - started, 3))
        return served

    def warm_up(self, served: ServedModel) -> None:
        """One call on zeros so the first client does not pay for lazy allocation (blocking)."""
        opts = self.options(served.name).warmup
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
            return
        served.worker.known_good.warmed_up(feeds)  # what tells a model fault from a bad request (agent.models.probe)

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the models directory: load what is new, unload what is gone or no longer wanted."""
        entries, active = await asyncio.to_thread(self._scan)
        wanted = {(e.name, e.version): e for e in entries}
        self._change(active={**self._snap.active, **active})
        loaded = {(m.name, m.version) for m in self.served()}
        added: list[str] = []
        removed: list[str] = []
        failed: list[str] = []
        for key in sorted(set(wanted) - loaded):
            served = await self.load(wanted[key])
            (added if served is not None else failed).append(f"{key[0]}@{key[1]}")
        for name, version in sorted(loaded - set(wanted)):
            await self.unload(name, version)
            removed.append(f"{name}@{version}")
        self._change(failures={k: v for k, v in self._snap.failures.items() if k in wanted})
        log.info("models.reloaded", added=added, removed=removed, failed=failed)
        return {"added": added, "removed": removed, "failed": failed}

    def load_again(self, served: ServedModel) -> ServedModel:
        """Blocking: a fresh session and worker of a version that was unloaded while idle, on the
        delegate it ran on, warmed up (``agent.models.residency`` adopts them into ``served``).

        Raises:
            AgentError: the model no longer loads (e.g. its file changed on disk).
        """
        same = [d for d in self.delegates_for(served.runtime) if d.name == served.session.delegate]
        fresh = self._load_session(served.source, same or None)
        self.warm_up(fresh)
        return fresh

    # -- instances (the scaler; event loop only) --------------------------------------------
    def instance_threads(self, served: ServedModel) -> int:
        return self.options(served.name).threads or self.threads or 1

    async def add_instance(self, served: ServedModel) -> None:
        """One more session of ``served`` on the delegate it runs on, sharing its statistics.

        Raises:
            AgentError: the session could not be loaded.
        """
        async with served.changing:  # not while it is unloaded or loaded again when idle
            pool = served.pool
            if pool is None:
                raise AgentError(f"{served.key} has no instance pool ([scaling] enabled is off)")
            if served.state != AVAILABLE:
                return
            same = [d for d in self.delegates_for(served.runtime) if d.name == served.session.delegate]
            extra = await asyncio.to_thread(self._load_session, served.source, same or None)
            worker = extra.worker
            worker.stats = served.stats
            worker.known_good = served.worker.known_good
            worker.name = f"{served.key}#{len(pool) + 1}"
            if self.find(served.name, served.version) is not served or served.closed:  # unloaded meanwhile
                await asyncio.to_thread(extra.close)
                return
            pool.add(worker)

    async def remove_instance(self, served: ServedModel) -> bool:
        """Take the newest extra instance out of rotation and stop it once nothing holds it."""
        async with served.changing:
            pool = served.pool
            worker = pool.pop() if pool is not None and served.state == AVAILABLE else None
            if pool is None or worker is None:
                return False
            deadline = time.monotonic() + 30
            while pool.holding(worker) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            pool.forget(worker)
            await asyncio.to_thread(stop_workers, [worker])
            return True

    async def close(self) -> None:
        """Stop every worker and release every session (in threads); nothing is served afterwards."""
        served = self.served()
        self._change({}, {}, {})
        await asyncio.gather(*(asyncio.to_thread(m.close) for m in served))
