"""The model registry (``agent.models.registry.ModelRegistry``) with real Silero VAD sessions.

Silero VAD loads in tens of milliseconds, so these use the real ONNX model (the ``samples``
fixture) and real workers; every registry built here is closed at the end of its test.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import http_status
from agent.config import ModelSection, RuntimeSection
from agent.core.metrics import Metrics
from agent.errors import ModelNotFoundError, ModelNotReadyError, RequestError
from agent.models.registry import ModelRegistry
from agent.models.served import ServedModel
from agent.models.store import ModelVersion
from tests.fakes import drive

Factory = Callable[..., ModelRegistry]


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


@pytest.fixture
def silero(samples: dict[str, Path]) -> Path:
    return samples["silero_vad"]


def entry(file: Path, version: int = 1, name: str = "vad") -> ModelVersion:
    return ModelVersion(name, version, file.parent, file, "onnx")


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[ModelRegistry] = []

    def factory(options: Mapping[str, ModelSection] | None = None, versions: str = "latest") -> ModelRegistry:
        registry = ModelRegistry(tmp_path / "models", model_options=options or {},
                                 versions_policy=versions,  # type: ignore[arg-type]
                                 runtime=RuntimeSection(), delegates={}, threads=1, metrics=Metrics())
        made.append(registry)
        return registry

    yield factory
    for registry in made:
        await asyncio.wait_for(registry.close(), 10)


async def serve(registry: ModelRegistry, file: Path, version: int = 1, name: str = "vad") -> ServedModel:
    served = await registry.prepare(entry(file, version, name), warm_up=False)
    registry.register(served)
    return served


def loaded_gauge(registry: ModelRegistry) -> float | None:
    """``edge_agent_models_loaded`` as /metrics would expose it (read from the catalogue at scrape time)."""
    from agent.health.gauges import ModelFamilies

    family = next(f for f in ModelFamilies(registry)() if f.name == "edge_agent_models_loaded")
    return family.samples[0].value


# -- snapshots ----------------------------------------------------------------------------------------------------


async def test_a_readers_snapshot_never_changes(make: Factory, silero: Path) -> None:
    registry = make()
    first = await serve(registry, silero, 1)
    before = registry.served()
    versions_before = registry.versions("vad")

    second = await serve(registry, silero, 2)
    assert before == (first,)
    assert registry.served() == (first, second)

    await registry.unload("vad", 1)
    assert before == (first,)  # the reader's tuple still holds what it saw
    assert versions_before == [1]
    assert registry.served() == (second,)
    assert registry.find("vad", 1) is None
    assert loaded_gauge(registry) == 1


async def test_changes_only_on_the_loop_thread(make: Factory, silero: Path) -> None:
    registry = make()
    served = await serve(registry, silero, 1)  # the first change: the loop's thread owns the registry
    other = await registry.prepare(entry(silero, 2), warm_up=False)

    with pytest.raises(RuntimeError, match="only on the event loop"):
        await asyncio.to_thread(registry.set_active, "vad", 1)
    with pytest.raises(RuntimeError, match="only on the event loop"):
        await asyncio.to_thread(registry.register, other)
    assert registry.served() == (served,)
    assert registry.default_version("vad") == 1

    # Reading from another thread is fine.
    assert await asyncio.to_thread(registry.get, "vad") is served
    registry.register(other)  # and the loop can still change it
    assert registry.versions("vad") == [1, 2]


# -- reading ------------------------------------------------------------------------------------------------------


async def test_get_unknown_is_404(make: Factory, silero: Path) -> None:
    registry = make()
    with pytest.raises(ModelNotFoundError) as empty:
        registry.get("vad")
    assert (empty.value.code, http_status(empty.value)) == ("not_found", 404)
    await serve(registry, silero, 1)
    with pytest.raises(ModelNotFoundError) as version:
        registry.get("vad", 9)
    assert http_status(version.value) == 404 and "version 9" in str(version.value)
    assert not registry.known("nope")


async def test_a_model_that_failed_to_load_is_503(make: Factory, tmp_path: Path) -> None:
    registry = make()
    bad = tmp_path / "models" / "bad" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not an onnx model")

    assert await registry.load(entry(bad, name="bad")) is None

    for version in (None, 1):
        with pytest.raises(ModelNotReadyError) as caught:
            registry.get("bad", version)
        assert (caught.value.code, http_status(caught.value)) == ("unavailable", 503)
    with pytest.raises(ModelNotFoundError):
        registry.get("bad", 2)
    assert registry.known("bad") and not registry.ready
    [failure] = registry.failures()
    assert (failure.name, failure.version, failure.path) == ("bad", 1, str(bad))
    assert [s["state"] for s in registry.version_states("bad")] == ["FAILED"]
    assert registry.metrics.value("edge_agent_model_load_failures", model="bad") == 1


async def test_default_version_configured_then_active_then_highest(make: Factory, silero: Path) -> None:
    registry = make({"vad": ModelSection(default_version=1)})
    for name in ("vad", "alt"):
        for version in (1, 2):
            await serve(registry, silero, version, name)

    # Nothing chosen: the highest.
    assert registry.default_version("alt") == 2
    # The installer's active version beats the highest...
    registry.set_active("alt", 1)
    assert registry.default_version("alt") == 1
    assert registry.get("alt").version == 1
    # ... unless it is not loaded.
    registry.set_active("alt", 7)
    assert registry.default_version("alt") == 2
    registry.set_active("alt", None)
    assert registry.default_version("alt") == 2

    # The configured default beats the active version...
    registry.set_active("vad", 2)
    assert registry.default_version("vad") == 1
    assert registry.get("vad").version == 1
    # ... unless it is not loaded.
    await registry.unload("vad", 1)
    assert registry.default_version("vad") == 2
    with pytest.raises(KeyError):
        registry.default_version("nope")


# -- replace ------------------------------------------------------------------------------------------------------


async def test_replace_keeps_the_stats_and_resets_failures_in_a_row(make: Factory, silero: Path) -> None:
    registry = make()
    old = await serve(registry, silero, 1)
    await old.infer(feeds(1))
    drive(old.stats, failed=4)
    stats = old.stats
    assert (stats.requests, stats.errors, stats.consecutive_failures) == (5, 4, 4)
    new = await registry.prepare(entry(silero, 1), warm_up=False)

    assert registry.replace(old, new, stuck=False) is True

    assert new.stats is stats
    assert (stats.requests, stats.errors, stats.successes, stats.consecutive_failures) == (5, 4, 1, 0)
    assert registry.find("vad", 1) is new and registry.get("vad") is new
    assert registry.served() == (new,)
    await new.infer(feeds(2))  # the new session serves, into the same counters
    assert (stats.requests, stats.successes) == (6, 2)


async def test_replace_of_a_version_no_longer_served_changes_nothing(make: Factory, silero: Path) -> None:
    registry = make()
    old = await serve(registry, silero, 1)
    new = await registry.prepare(entry(silero, 1), warm_up=False)
    await registry.unload("vad", 1)  # e.g. a deployment unloaded it while the watchdog loaded ``new``

    assert registry.replace(old, new, stuck=False) is False
    assert registry.served() == ()
    assert new.stats is not old.stats
    await asyncio.to_thread(new.close)  # the caller's job when it is refused


async def test_replace_of_a_version_already_replaced_changes_nothing(make: Factory, silero: Path) -> None:
    registry = make()
    old = await serve(registry, silero, 1)
    first = await registry.prepare(entry(silero, 1), warm_up=False)
    second = await registry.prepare(entry(silero, 1), warm_up=False)
    assert registry.replace(old, first, stuck=False)

    assert registry.replace(old, second, stuck=False) is False
    assert registry.find("vad", 1) is first
    await asyncio.to_thread(second.close)


# -- requests are counted where the health window and the watchdog read them -----------------------------------------


async def test_requests_and_rejections_are_counted_per_version(make: Factory, silero: Path) -> None:
    registry = make()
    served = await serve(registry, silero, 1)
    out = await served.infer(feeds(3))
    assert set(out) == {o.name for o in served.outputs}
    with pytest.raises(RequestError):
        await served.infer({"input": np.zeros((1, 576), np.float32)})  # missing inputs: refused, never run
    stats = served.stats
    assert (stats.requests, stats.successes, stats.rejected, stats.errors) == (1, 1, 1, 0)
    assert len(stats.latencies) == 1


# -- loading from the models directory ------------------------------------------------------------------------------


async def test_load_all_serves_the_active_version_and_reload_follows_it(make: Factory, silero: Path,
                                                                        tmp_path: Path) -> None:
    models = tmp_path / "models"
    for version in (1, 2):
        (models / "vad" / str(version)).mkdir(parents=True)
        shutil.copyfile(silero, models / "vad" / str(version) / "model.onnx")
    (models / "vad" / ".active").write_text("1\n")
    registry = make()

    await registry.load_all()
    assert registry.versions("vad") == [1]  # "latest" means the installer's active version when there is one
    assert registry.default_version("vad") == 1

    (models / "vad" / ".active").write_text("2\n")
    changes = await registry.reload()
    assert changes == {"added": ["vad@2"], "removed": ["vad@1"], "failed": []}
    assert registry.versions("vad") == [2]
    assert registry.default_version("vad") == 2
