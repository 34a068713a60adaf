"""Elastic instances (``agent.models.instances``) on the real registry and the real face detection
model (LiteRT): load drives a scale-up and idleness a scale-down, a thermal zone past its trip point
(a fake ``hardware_root``) forces the minimum, the memory budget blocks growth; every request
succeeds throughout. Waits are for conditions, with deadlines."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import InstancesSection, ModelSection, RuntimeSection, ScalingSection
from agent.core.metrics import Metrics
from agent.models.instances import Scaler, device_hot
from agent.models.registry import ModelRegistry
from agent.models.served import ServedModel
from tests.conftest import running, until
from tests.fakes import RecordingSink

pytestmark = pytest.mark.timeout(120)
NAME = "face"


@pytest.fixture
async def registry(tmp_path: Path, samples: dict[str, Path]) -> AsyncIterator[ModelRegistry]:
    dest = tmp_path / "models" / NAME / "1" / "model.tflite"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(samples["face_detection"], dest)
    options = {NAME: ModelSection(inline_max_us=0, threads=1, instances=InstancesSection(min=1, max=2))}
    reg = ModelRegistry(tmp_path / "models", model_options=options, versions_policy="latest",
                        runtime=RuntimeSection(), delegates={}, threads=1, metrics=Metrics(), elastic=True)
    await reg.load_all()
    yield reg
    await reg.close()


def scaler(reg: ModelRegistry, root: Path, sink: RecordingSink, **settings: Any) -> Scaler:
    cfg = {"enabled": True, "interval_s": 0.05, "window_s": 1.0, "scale_up_wait_ms": 0.5, "min_requests": 10,
           "idle_s": 0.5, **settings}
    return Scaler(ScalingSection(**cfg), reg, sink, options=lambda n: reg.options(n).instances, hardware_root=root,
                  cpu_budget=4)


class Load:
    """Concurrent predict tasks on the event loop until stopped; counts answers and failures."""

    def __init__(self, served: ServedModel, clients: int = 6) -> None:
        self.served, self.clients = served, clients
        self.ok = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.feeds = {"input": np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)}

    async def _client(self) -> None:
        while not self.stop.is_set():
            try:
                out = await self.served.infer(self.feeds)
                assert out["classificators"].shape == (1, 896, 1)
                self.ok += 1
            except Exception as exc:
                self.failures.append(repr(exc))

    async def __aenter__(self) -> Load:
        self.tasks = [asyncio.get_running_loop().create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)






def scaled(sink: RecordingSink) -> list[dict[str, Any]]:
    return [e for e in sink.events if e["type"] == "instances.scaled"]


def zone(root: Path, temp_c: float, trip_c: float, kind: str = "passive") -> None:
    z = root / "sys/class/thermal/thermal_zone0"
    z.mkdir(parents=True, exist_ok=True)
    (z / "type").write_text("cpu-thermal\n")
    (z / "temp").write_text(f"{int(temp_c * 1000)}\n")
    (z / "trip_point_0_temp").write_text(f"{int(trip_c * 1000)}\n")
    (z / "trip_point_0_type").write_text(f"{kind}\n")


async def test_load_scales_up_and_idleness_scales_down(registry: ModelRegistry, tmp_path: Path) -> None:
    served = registry.get(NAME)
    assert served.pool is not None and len(served.pool) == 1
    sink = RecordingSink()
    async with running(scaler(registry, tmp_path / "hw", sink)):
        async with Load(served) as load:
            await until(lambda: len(served.pool or ()) == 2, 60, "a second instance under load")
            answered = load.ok
            await until(lambda: load.ok > answered + 100, 30, "answers with two instances")
        assert served.describe()["instances"] == 2
        # the event follows the extra worker's stop (out of rotation at once, stopped once drained)
        await until(lambda: len(served.pool or ()) == 1 and len(scaled(sink)) == 2, 30,
                    "back to one instance when idle, reported")
    up, down = scaled(sink)
    assert (up["from"], up["to"]) == (1, 2) and "p95 queue wait" in up["reason"], up
    assert (down["from"], down["to"]) == (2, 1) and "idle" in down["reason"], down
    assert not load.failures, load.failures[:3]
    assert served.stats.errors == 0 and served.stats.successes == load.ok


async def test_a_hot_device_goes_back_to_the_minimum_and_does_not_grow(registry: ModelRegistry,
                                                                       tmp_path: Path) -> None:
    root = tmp_path / "hw"
    zone(root, 50, 80)
    assert device_hot(root) is None
    served = registry.get(NAME)
    sink = RecordingSink()
    s = scaler(registry, root, sink, idle_s=3600)
    async with running(s), Load(served) as load:
        await until(lambda: len(served.pool or ()) == 2, 60, "a second instance under load")
        zone(root, 85, 80)  # past its passive trip point
        assert "cpu-thermal at 85.0" in (device_hot(root) or "")
        await until(lambda: len(served.pool or ()) == 1, 30, "the minimum while hot")
        await until(lambda: "hot" in s.blocked.get(served.key, ""), 30, "growth held back while hot")
        assert len(served.pool or ()) == 1
    down = [e for e in sink.events if e["type"] == "instances.scaled" and e["to"] == 1]
    assert down and down[0]["reason"].startswith("hot: cpu-thermal at 85.0"), sink.events
    assert not load.failures, load.failures[:3]


async def test_the_memory_budget_blocks_a_scale_up(registry: ModelRegistry, tmp_path: Path) -> None:
    served = registry.get(NAME)
    sink = RecordingSink()
    s = scaler(registry, tmp_path / "hw", sink, memory_budget_mb=64)
    s.rss = lambda: 63 * 2**20  # within 90 % of the budget (the real process is measured otherwise)
    async with running(s), Load(served) as load:
        await until(lambda: "memory" in s.blocked.get(served.key, ""), 60, "growth blocked by memory")
        assert len(served.pool or ()) == 1
    assert not [e for e in sink.events if e["type"] == "instances.scaled"]
    assert not load.failures


async def test_a_stream_alone_drives_a_scale_up(registry: ModelRegistry, tmp_path: Path,
                                               samples: dict[str, Path]) -> None:
    """Stream items' queue waits are judged too: a video stream (no pacing, frames overlapping in the
    model) is the only load, and it adds an instance."""
    from agent.config import StreamSection
    from agent.pipelines.manager import StreamManager
    from tests.media import make_video, photo_frames
    from tests.test_streams import FACE_POST, FACE_PRE

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    frames, _ = photo_frames(samples["astronaut"], n=20, size=(320, 240), scales=(0.9, 0.9))
    video = make_video(tmp_path / "faces.avi", frames, fps=10)
    section = StreamSection(**tomllib.loads(f"""
model = "{NAME}"
source = {{ type = "video", path = "{video}", loop = true, realtime = false }}
pre = {FACE_PRE}
post = {FACE_POST}
"""))
    served = registry.get(NAME)
    sink = RecordingSink()
    streams = StreamManager({"cam": section}, registry, sink)
    async with running(scaler(registry, tmp_path / "hw", sink, idle_s=3600)):
        streams.start("cam")
        try:
            await until(lambda: len(served.pool or ()) == 2, 60, "a second instance for the stream's load")
            inferred = streams.status()[0]["inferred"]
            await until(lambda: streams.status()[0]["inferred"] > inferred + 20, 30, "frames with two instances")
        finally:
            await asyncio.wait_for(streams.stop_all(), 30)
    up = scaled(sink)[0]
    assert (up["from"], up["to"]) == (1, 2) and "p95 queue wait" in up["reason"], up
    assert served.stats.errors == 0 and served.stats.successes > 0
    assert streams.status()[0]["errors"] == 0


def test_throttling_flags_and_active_trip_points(tmp_path: Path) -> None:
    root = tmp_path / "hw"
    zone(root, 70, 60, kind="active")  # a fan trip point is not a limit
    assert device_hot(root) is None
    assert device_hot(root, max_temp_c=65) is not None
    firmware = root / "sys/devices/platform/soc/soc:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("50000\n")  # throttling occurred since boot, not now
    assert device_hot(root) is None
    (firmware / "get_throttled").write_text("50005\n")  # under-voltage and throttled now
    assert "throttled" in (device_hot(root) or "")


def test_end_to_end_in_the_daemon(tmp_path: Path, samples: dict[str, Path], broker: Any) -> None:
    """A real daemon: API clients drive a scale-up, seen in status, `edge-agent models`, /metrics and an
    MQTT event; idle again, it scales down; no request fails."""
    import subprocess
    import sys
    import threading

    from agent.client import AgentClient
    from cloud_sync.fleet.console import FleetClient
    from cloud_sync.mqtt.settings import BrokerSettings
    from tests.conftest import start_daemon, wait_for

    dest = tmp_path / "models" / NAME / "1" / "model.tflite"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(samples["face_detection"], dest)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "el-1"
[mqtt]
url = "{broker.url}"
[scaling]
enabled = true
interval_s = 0.1
window_s = 1.0
scale_up_wait_ms = 0.5
min_requests = 10
idle_s = 1.0
[model.{NAME}]
inline_max_us = 0
threads = 1
instances = {{ min = 1, max = 2 }}
""")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    stop = threading.Event()
    failures: list[str] = []
    ok = [0]

    def client() -> None:
        feeds = {"input": np.random.default_rng(1).random((1, 128, 128, 3), dtype=np.float32)}
        with AgentClient(daemon.socket, timeout=10) as c:
            while not stop.is_set():
                try:
                    c.infer(NAME, feeds)
                    ok[0] += 1
                except Exception as exc:
                    failures.append(repr(exc))

    def instances() -> int:
        return next(m["instances"] for m in daemon.client.status()["models"] if m["name"] == NAME)

    try:
        with FleetClient(BrokerSettings(url=broker.url)) as fleet:
            fleet.subscribe(["edge/v1/devices/el-1/events"])
            threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                wait_for(lambda: instances() == 2, 60, "two instances under load")
                out = subprocess.run([sys.executable, "-m", "agent.cli", "models", "--socket", str(daemon.socket)],
                                     capture_output=True, text=True, timeout=60, check=False)
                assert out.returncode == 0 and "instances" in out.stdout, out
                assert f'edge_agent_model_instances{{model="{NAME}",version="1"}} 2.0' in daemon.client.metrics()
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            wait_for(lambda: instances() == 1, 30, "one instance when idle")
            seen = [m.json() for m in fleet.messages(5, quiet=0.5)]
            scaled = [e for e in seen if isinstance(e, dict) and e.get("type") == "instances.scaled"]
            assert [(e["from"], e["to"]) for e in scaled][:2] == [(1, 2), (2, 1)], scaled
        assert ok[0] > 100 and not failures, failures[:3]
    finally:
        daemon.stop()
