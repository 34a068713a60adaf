"""Small fakes of the agent's ports (``agent.core.ports``) for unit tests.

Fakes stand in for ports only: a recording ``EventSink`` (which is also a ``Link`` for the
``Uplink``), a ``ModelSwapper`` holding served models, and, under those, a session and worker
with no runtime behind them. Each served model is a real ``ServedModel`` with a real
``ModelStats``, so the deployer's health window and the watchdog read the counters they read
in production; the tests drive those counters directly.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError, ModelNotFoundError, ModelNotReadyError
from agent.hardware import DelegateSpec
from agent.models.served import LoadFailure, ServedModel
from agent.models.stats import ModelStats
from agent.models.store import ModelVersion
from agent.runtimes import LoadReport, Session, TensorSpec
from cloud_sync.errors import TargetNotFoundError
from cloud_sync.updater.client import BundleInfo

CPU = "CPUExecutionProvider"


# -- event sink --------------------------------------------------------------------------------------------------


class RecordingSink:
    """``EventSink`` (and ``agent.core.uplink.Link``) that remembers everything it is given."""

    def __init__(self, seq: int | None = 1) -> None:
        self.events: list[dict[str, Any]] = []
        self.results: list[tuple[str, dict[str, Any]]] = []
        self.inventory_changes = 0
        self.seq = seq  # what ``result`` answers: a seq, -1 (dropped) or None (no link)

    def event(self, payload: Mapping[str, Any]) -> None:
        self.events.append(dict(payload))

    def result(self, stream: str, payload: Mapping[str, Any]) -> int | None:
        self.results.append((stream, dict(payload)))
        return self.seq

    def inventory_changed(self) -> None:
        self.inventory_changes += 1

    def status(self) -> dict[str, Any]:
        return {"link": {"connected": True}, "outbox": {"pending": 0}}

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    def types(self) -> list[str]:
        return [str(e.get("type")) for e in self.events]


# -- a served model with no runtime behind it ----------------------------------------------------------------


class FakeSession(Session):
    """A session on ``delegate`` that answers zeros (or raises ``error``)."""

    backend = "fake"

    def __init__(self, delegate: str = CPU, fallbacks: Sequence[str] = ()) -> None:
        super().__init__(Path("fake.onnx"), [TensorSpec("x", np.dtype(np.float32), (1, 4))],
                         [TensorSpec("y", np.dtype(np.float32), (1, 1))], LoadReport(delegate, list(fallbacks)))
        self.closed = False
        self.error: Exception | None = None

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.error is not None:
            raise self.error
        return [np.zeros((1, 1), np.float32)]

    def close(self) -> None:
        self.closed = True


class FakeWorker:
    """What the watchdog and the registry read of a worker: its stats and whether a call is running."""

    def __init__(self, session: Session, stats: ModelStats | None = None) -> None:
        self.name = "fake"
        self.session = session
        self.stats = stats or ModelStats()
        self.busy_since: float | None = None
        self.batching_active = False
        self.inline = False
        self.stopped = False
        self.abandoned: str | None = None

    def run_sync(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(feeds)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True

    def abandon(self, reason: str) -> None:
        self.abandoned = reason


def make_served(name: str = "vad", version: int = 1, *, delegate: str = CPU, runtime: str = "onnx",
                stats: ModelStats | None = None, directory: Path | None = None) -> ServedModel:
    """A real ``ServedModel`` (real ``ModelStats``) over a fake session and worker."""
    directory = directory or Path("/nonexistent") / name / str(version)
    session = FakeSession(delegate)
    worker = FakeWorker(session, stats)
    entry = ModelVersion(name, version, directory, directory / "model.onnx", runtime)
    return ServedModel(name, version, runtime, entry, session, worker)  # type: ignore[arg-type]


def fake_session(served: ServedModel) -> FakeSession:
    assert isinstance(served.session, FakeSession)
    return served.session


def fake_worker(served: ServedModel) -> FakeWorker:
    assert isinstance(served.worker, FakeWorker)
    return served.worker


def drive(stats: ModelStats, *, ok: int = 0, failed: int = 0, rejected: int = 0, latency_s: float = 0.001,
          runtime_failure: bool = True, queue_s: float = 0.0, nonfinite: int = 0) -> None:
    """Record calls on ``stats`` the way ``ServedModel.infer`` and its worker do: each success is a
    runtime call of ``latency_s`` after ``queue_s`` in the queue; ``nonfinite`` of them answered NaN."""
    for i in range(ok):
        stats.admitted()
        stats.executed(1, int(latency_s * 1e9))
        stats.call_ended(queue_s + latency_s)
        if i < nonfinite:
            stats.answered_nonfinite()
    for _ in range(failed):
        stats.admitted()
        stats.call_ended(None, runtime_failure=runtime_failure)
    for _ in range(rejected):
        stats.refused()


# -- model swapper -------------------------------------------------------------------------------------------------


@dataclass
class PrepareCall:
    entry: ModelVersion
    warm_up: bool
    delegates: list[str] | None


@dataclass
class FakeSwapper:
    """``ModelSwapper`` over a dict of served models; records every change in ``calls``.

    ``prepare`` makes a served model on the first delegate it is given (the profile's list when
    none is), like a backend whose first choice loads; ``prepare_error`` makes it fail instead,
    and ``on_prepare`` runs while it "loads" (to change the served set meanwhile).
    """

    profile: dict[str, list[DelegateSpec]] = field(default_factory=lambda: {"onnx": [DelegateSpec(CPU)]})
    configured_default: dict[str, int] = field(default_factory=dict)
    models: dict[str, dict[int, ServedModel]] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    load_failures: list[LoadFailure] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    prepared: list[PrepareCall] = field(default_factory=list)
    made: list[ServedModel] = field(default_factory=list)  # what ``prepare`` returned, in order
    prepare_error: AgentError | None = None
    on_prepare: Callable[[ModelVersion], None] | None = None
    reload_answer: dict[str, list[str]] = field(default_factory=lambda: {"added": [], "removed": [], "failed": []})

    def add(self, served: ServedModel, *, active: bool = False) -> ServedModel:
        self.models.setdefault(served.name, {})[served.version] = served
        if active:
            self.active[served.name] = served.version
        return served

    # -- ModelCatalog
    @property
    def ready(self) -> bool:
        return any(self.models.values())

    def get(self, name: str, version: int | None = None) -> ServedModel:
        versions = self.models.get(name) or {}
        if version is None and versions:
            return versions[self.default_version(name)]
        if version in versions:
            return versions[version]
        if any(f.name == name and version in (None, f.version) for f in self.load_failures):
            raise ModelNotReadyError(f"model '{name}' failed to load")
        raise ModelNotFoundError(f"model '{name}' not found")

    def find(self, name: str, version: int) -> ServedModel | None:
        return (self.models.get(name) or {}).get(version)

    def versions(self, name: str) -> list[int]:
        return sorted(self.models.get(name) or {})

    def default_version(self, name: str) -> int:
        versions = self.models.get(name)
        if not versions:
            raise KeyError(name)
        for wanted in (self.configured_default.get(name), self.active.get(name)):
            if wanted is not None and wanted in versions:
                return wanted
        return max(versions)

    def served(self) -> tuple[ServedModel, ...]:
        return tuple(m for versions in self.models.values() for m in versions.values())

    def failures(self) -> tuple[LoadFailure, ...]:
        return tuple(self.load_failures)

    def known(self, name: str) -> bool:
        return bool(self.models.get(name)) or any(f.name == name for f in self.load_failures)

    def version_states(self, name: str) -> list[dict[str, Any]]:
        states = [m.describe() for m in (self.models.get(name) or {}).values()]
        states += [f.describe() for f in self.load_failures if f.name == name]
        return sorted(states, key=lambda s: -int(s["version"]))

    # -- ModelSwapper
    def delegates_for(self, runtime: str) -> list[DelegateSpec]:
        return list(self.profile.get(runtime, ()))

    async def prepare(self, entry: ModelVersion, warm_up: bool = True,
                      delegates: Sequence[DelegateSpec] | None = None, threads: int | None = None) -> ServedModel:
        self.prepared.append(PrepareCall(entry, warm_up, None if delegates is None else [d.name for d in delegates]))
        self.calls.append(("prepare", entry.name, entry.version))
        await asyncio.sleep(0)  # loading happens in a thread: other tasks run meanwhile
        if self.on_prepare is not None:
            self.on_prepare(entry)
        if self.prepare_error is not None:
            raise self.prepare_error
        specs = self.delegates_for(entry.runtime) if delegates is None else delegates
        served = make_served(entry.name, entry.version, delegate=specs[0].name if specs else CPU,
                             runtime=entry.runtime, directory=entry.directory)
        served.source = entry
        self.made.append(served)
        return served

    def warm_up(self, served: ServedModel) -> None:
        self.calls.append(("warm_up", served.name, served.version))

    def register(self, served: ServedModel) -> None:
        self.calls.append(("register", served.name, served.version))
        self.models.setdefault(served.name, {})[served.version] = served

    def set_active(self, name: str, version: int | None) -> None:
        self.calls.append(("set_active", name, version))
        if version is None:
            self.active.pop(name, None)
        else:
            self.active[name] = version

    def replace(self, old: ServedModel, new: ServedModel, *, stuck: bool) -> bool:
        """As the registry does: the stats move to ``new``, failures in a row start over."""
        self.calls.append(("replace", old.name, old.version, stuck))
        if self.find(old.name, old.version) is not old:
            return False
        new.worker.stats = old.worker.stats
        new.stats.restarted()
        self.models[old.name][old.version] = new
        if stuck:
            old.worker.abandon("restarted by the watchdog")
        else:
            old.close()
        return True

    async def reload(self) -> dict[str, list[str]]:
        self.calls.append(("reload",))
        return self.reload_answer

    async def unload(self, name: str, version: int) -> None:
        self.calls.append(("unload", name, version))
        served = (self.models.get(name) or {}).pop(version, None)
        if served is not None:
            served.close()

    def changes(self, *kinds: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in kinds]


# -- bundle updater ------------------------------------------------------------------------------------------------


class FakeUpdater:
    """The deployer's ``BundleUpdater`` without TUF: serves bundle files already built (and trusted)."""

    def __init__(self, bundles: Mapping[tuple[str, int], Path], download_dir: Path) -> None:
        self.bundles = dict(bundles)
        self.download_dir = download_dir
        self.refreshes = 0
        self.downloads: list[tuple[str, int]] = []

    def refresh(self) -> None:
        self.refreshes += 1

    def find(self, name: str, version: int | None = None) -> BundleInfo:
        versions = [v for n, v in self.bundles if n == name and version in (None, v)]
        if not versions:
            raise TargetNotFoundError(name, version)
        bundle = self.bundles[(name, max(versions))]
        return BundleInfo(name, max(versions), bundle.stat().st_size, {}, f"{name}/{bundle.name}")

    def download(self, name: str, version: int | None = None) -> Path:
        info = self.find(name, version)
        self.downloads.append((name, info.version))
        self.download_dir.mkdir(parents=True, exist_ok=True)
        # A fresh copy, as a download is: the deployer deletes it once extracted.
        return Path(shutil.copyfile(self.bundles[(name, info.version)], self.download_dir / f"{name}-{info.version}"))


# -- clocks, monitors ----------------------------------------------------------------------------------------------


class FakeClock:
    """Stands in for a module's ``time``: ``monotonic`` moves only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @staticmethod
    def time() -> float:
        return time.time()


@dataclass
class FakeSnapshot:
    values: dict[str, Any] = field(default_factory=lambda: {"cpu_percent": 1.5, "memory": {"used": 1}})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


class FakeMonitor:
    """``SystemMonitor`` with a canned snapshot."""

    def __init__(self) -> None:
        self.snapshots = 0

    async def snapshot(self, max_age_s: float | None = None) -> FakeSnapshot:
        self.snapshots += 1
        return FakeSnapshot()
