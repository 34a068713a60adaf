"""Idle versions unloaded and loaded again (``[model.NAME] unload_after_s``, ``agent.models.residency``)
on the real registry with real models: face detection (LiteRT) and Silero VAD (ONNX Runtime).

An idle version is released (thread stopped, session dropped) but stays listed; the next request
is answered as before and reports the cold start; concurrent requests share one load; a load that
fails is a specific 503 while other models serve on; a stream keeps its model loaded, and a
stream started on an unloaded model loads it. Waits are for conditions, with deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli.demo_env import silero_feeds
from agent.config import ModelSection, RuntimeSection
from agent.core.metrics import Metrics
from agent.errors import ModelReloadError
from agent.models.registry import ModelRegistry
from agent.models.residency import Residency
from agent.models.served import ServedModel
from tests.conftest import install, running, until
from tests.fakes import RecordingSink

pytestmark = pytest.mark.timeout(120)
FACE, VAD = "face_detection", "silero_vad"


class Rig:
    def __init__(self, registry: ModelRegistry, residency: Residency, sink: RecordingSink, models_dir: Path) -> None:
        self.registry, self.residency, self.sink, self.models_dir = registry, residency, sink, models_dir

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.sink.events if e["type"] == kind]

    async def unload_now(self, served: ServedModel) -> None:
        """As if idle for long: the residency's next look unloads it."""
        served.last_used = time.monotonic() - 3600
        assert served.key in await self.residency.step()
        assert served.state == "UNLOADED"


async def make_rig(tmp_path: Path, samples: dict[str, Path], *, elastic: bool = False,
                   pinned: Callable[[ServedModel], str | None] = lambda _m: None) -> Rig:
    models_dir = tmp_path / "models"
    install(models_dir, samples, FACE)
    install(models_dir, samples, VAD)
    options = {FACE: ModelSection(threads=1, unload_after_s=0.5), VAD: ModelSection(threads=1, unload_after_s=0.5)}
    metrics, sink = Metrics(), RecordingSink()
    registry = ModelRegistry(models_dir, model_options=options, versions_policy="latest", runtime=RuntimeSection(),
                             delegates={}, threads=1, metrics=metrics, elastic=elastic)
    await registry.load_all()
    residency = Residency(registry, sink, metrics, unload_after=lambda n: registry.options(n).unload_after_s,
                          pinned=pinned, interval_s=0.05)
    return Rig(registry, residency, sink, models_dir)


@pytest.fixture
async def rig(tmp_path: Path, samples: dict[str, Path]) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path, samples)
    yield r
    await r.residency.stop()
    await r.registry.close()






def face_feeds() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(3).random((1, 128, 128, 3), dtype=np.float32)}


async def test_an_idle_version_is_unloaded_and_the_next_request_loads_it_again(rig: Rig) -> None:
    served = rig.registry.get(FACE)
    before = await served.infer(face_feeds())
    worker, session = served.worker, served.session
    async with running(rig.residency):
        await until(lambda: served.state == "UNLOADED" and rig.events("model.unloaded"), 30, "the idle unload")
    # released: the thread ended and the runtime's interpreter is dropped; still listed, with its specs
    assert not worker._thread.is_alive() and session._interp is None  # type: ignore[attr-defined]
    assert rig.registry.get(FACE) is served and rig.registry.versions(FACE) == [1]
    state = served.describe()
    assert state["state"] == "UNLOADED" and state["instances"] == 0 and state["cold_start_ms"] is None
    assert [s["name"] for s in state["inputs"]] == ["input"]
    assert rig.registry.version_states(FACE)[0]["state"] == "UNLOADED"
    unloaded = rig.events("model.unloaded")[0]
    assert (unloaded["model"], unloaded["version"], unloaded["reason"]) == (FACE, 1, "idle")

    after = await served.infer(face_feeds())  # loads it again, then answers
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)
    assert served.state == "AVAILABLE" and served.worker is not worker
    reloaded = rig.events("model.reloaded")
    assert len(reloaded) == 1 and reloaded[0]["cold_start_ms"] > 0, reloaded
    assert served.describe()["cold_start_ms"] == reloaded[0]["cold_start_ms"]
    assert rig.registry.metrics.value("edge_agent_model_unloads", model=FACE) >= 1
    assert rig.registry.metrics.value("edge_agent_model_reloads", model=FACE, outcome="ok") == 1
    assert served.stats.errors == 0 and served.stats.successes == 2  # statistics carried across the unload


async def test_concurrent_requests_while_unloaded_share_one_load(tmp_path: Path, samples: dict[str, Path]) -> None:
    r = await make_rig(tmp_path, samples, elastic=True)
    try:
        served = r.registry.get(VAD)
        before = await served.infer(silero_feeds(1))
        await r.unload_now(served)
        outputs = await asyncio.wait_for(asyncio.gather(*(served.infer(silero_feeds(1)) for _ in range(8))), 60)
        for out in outputs:
            np.testing.assert_allclose(out["output"], before["output"], rtol=1e-5, atol=1e-6)
        assert len(r.events("model.reloaded")) == 1, r.events("model.reloaded")
        assert r.registry.metrics.value("edge_agent_model_reloads", model=VAD, outcome="ok") == 1
        assert served.pool is not None and len(served.pool) == 1 and served.pool.workers[0] is served.worker
        assert served.stats.errors == 0
    finally:
        await r.residency.stop()
        await r.registry.close()


async def test_a_failed_load_is_a_specific_error_and_the_next_request_retries(rig: Rig) -> None:
    served, other = rig.registry.get(FACE), rig.registry.get(VAD)
    good = await served.infer(face_feeds())
    await rig.unload_now(served)
    model_file = rig.models_dir / FACE / "1" / "model.tflite"
    original = model_file.read_bytes()
    model_file.write_bytes(b"not a model" * 100)  # corrupted on disk while unloaded
    with pytest.raises(ModelReloadError) as caught:
        await served.infer(face_feeds())
    assert caught.value.code == "reload_failed" and "could not be loaded again" in str(caught.value)
    from agent.api.errors import http_status

    assert http_status(caught.value) == 503
    assert served.state == "UNLOADED"
    failed = rig.events("model.reload_failed")
    assert len(failed) == 1 and failed[0]["error"]["code"] == "reload_failed"
    assert rig.registry.metrics.value("edge_agent_model_reloads", model=FACE, outcome="failed") == 1
    await other.infer(silero_feeds(2))  # the other model serves on

    model_file.write_bytes(original)  # the next request tries again
    again = await served.infer(face_feeds())
    np.testing.assert_allclose(again["classificators"], good["classificators"], rtol=1e-5, atol=1e-5)
    assert served.state == "AVAILABLE" and len(rig.events("model.reloaded")) == 1


async def test_pinned_mirrored_and_busy_versions_stay_loaded(rig: Rig) -> None:
    served = rig.registry.get(FACE)
    served.last_used = time.monotonic() - 3600
    served.mirror = lambda *_args: None  # a shadow beside it
    assert served.key not in await rig.residency.step()
    served.mirror = None
    served.nonfinite_check = frozenset()  # a deployment's health window
    assert served.key not in await rig.residency.step()
    served.nonfinite_check = None
    rig.residency.pinned = lambda m: "deployment" if m.name == FACE else None
    assert served.key not in await rig.residency.step()
    assert served.state == "AVAILABLE"
    rig.residency.pinned = lambda _m: None
    await rig.unload_now(served)


async def test_a_stream_keeps_its_model_loaded_and_one_started_later_loads_it(tmp_path: Path,
                                                                              samples: dict[str, Path]) -> None:
    from agent.config import StreamSection
    from agent.pipelines.manager import StreamManager
    from tests.media import speech_wav
    from tests.test_streams import VAD_PRE

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    wav = speech_wav(tmp_path / "speech.wav", "one two three four five six seven eight nine ten")
    holder: list[StreamManager] = []
    r = await make_rig(tmp_path, samples,
                       pinned=lambda m: "stream" if holder and holder[0].uses(m.name, m.version) else None)

    def section(realtime: bool) -> StreamSection:
        return StreamSection(**tomllib.loads(f"""
model = "{VAD}"
source = {{ type = "wav", path = "{wav}", realtime = {str(realtime).lower()} }}
pre = {VAD_PRE}
post = {{ type = "vad", threshold = 0.5 }}
"""))

    streams = StreamManager({"paced": section(True), "fast": section(False)}, r.registry, r.sink)
    holder.append(streams)
    served = r.registry.get(VAD)
    try:
        streams.start("paced")  # real time: runs for seconds
        await until(lambda: streams.status()[1]["inferred"] > 0, 30, "the paced stream inferring")
        served.last_used = time.monotonic() - 3600  # as if its source were silent
        assert served.key not in await r.residency.step()
        assert served.state == "AVAILABLE"
        await asyncio.wait_for(streams.stop("paced"), 30)

        await r.unload_now(served)
        streams.start("fast")  # its first window waits for the load
        await until(lambda: streams.status()[0]["inferred"] > 10, 60, "the stream inferring after the load")
        fast = streams.status()[0]
        assert fast["errors"] == 0 and fast["state"] in ("running", "ended"), fast
        assert served.state == "AVAILABLE" and len(r.events("model.reloaded")) == 1
    finally:
        await asyncio.wait_for(streams.stop_all(), 30)
        await r.residency.stop()
        await r.registry.close()


def test_end_to_end_in_the_daemon(tmp_path: Path, samples: dict[str, Path], broker: Any) -> None:
    """A real daemon: an idle model shows UNLOADED in status, `edge-agent models` and /metrics, still
    answers metadata, and the next predict loads it again (the cold start in status, /metrics and an
    MQTT event); the model without ``unload_after_s`` stays loaded."""
    import subprocess
    import sys

    from cloud_sync.fleet.console import FleetClient
    from cloud_sync.mqtt.settings import BrokerSettings
    from tests.conftest import start_daemon, wait_for

    install(tmp_path / "models", samples, FACE)
    install(tmp_path / "models", samples, VAD)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "idle-1"
[mqtt]
url = "{broker.url}"
[models]
idle_check_s = 0.1
[model.{FACE}]
unload_after_s = 0.5
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))

    def state(name: str) -> dict[str, Any]:
        return next(m for m in daemon.client.status()["models"] if m["name"] == name)

    try:
        with FleetClient(BrokerSettings(url=broker.url)) as fleet:
            fleet.subscribe(["edge/v1/devices/idle-1/events"])
            before = daemon.client.infer(FACE, face_feeds())
            wait_for(lambda: state(FACE)["state"] == "UNLOADED", 30, "the idle model unloaded")
            assert state(FACE)["instances"] == 0 and state(VAD)["state"] == "AVAILABLE"
            out = subprocess.run([sys.executable, "-m", "agent.cli", "models", "--socket", str(daemon.socket)],
                                 capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode == 0 and "UNLOADED" in out.stdout, out
            assert f'edge_agent_model_unloaded{{model="{FACE}",version="1"}} 1.0' in daemon.client.metrics()
            meta = daemon.client.model_metadata(FACE)
            assert [i["name"] for i in meta["inputs"]] == ["input"], meta

            after = daemon.client.infer(FACE, face_feeds())  # loads it again
            for name in before:
                np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)
            loaded = state(FACE)
            assert loaded["cold_start_ms"] is not None and loaded["cold_start_ms"] > 0, loaded
            metrics = daemon.client.metrics()
            assert f'edge_agent_model_cold_start_seconds{{model="{FACE}",version="1"}}' in metrics
            assert f'edge_agent_model_reloads_total{{model="{FACE}",outcome="ok"}} 1.0' in metrics

            def events() -> list[dict[str, Any]]:
                seen = [m.json() for m in fleet.messages(5, quiet=0.5)]
                return [e for e in seen if isinstance(e, dict) and str(e.get("type", "")).startswith("model.")]

            got: list[dict[str, Any]] = []
            wait_for(lambda: got.extend(events()) or any(e["type"] == "model.reloaded" for e in got), 30,
                     "the reload event over MQTT")
            reloaded = next(e for e in got if e["type"] == "model.reloaded")
            assert reloaded["model"] == FACE and reloaded["cold_start_ms"] > 0, reloaded
            assert any(e["type"] == "model.unloaded" and e["model"] == FACE for e in got), got
            assert not any(e.get("model") == VAD for e in got), got
    finally:
        assert daemon.stop() == 0
