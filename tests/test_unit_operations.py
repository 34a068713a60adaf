"""The operations facade (``agent.operations.Operations``) built directly.

Its ports are fakes (a swapper holding fake served models, a recording link behind a real
``Uplink``, a canned system monitor); the deployer and the stream manager are the real
components built on those fakes, with nothing configured to reach out of the temp dir.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.config import OVERRIDES_FILE, Config, StreamSection, UpdatesSection
from agent.core.uplink import Uplink
from agent.deploy.installer import Deployer, DeviceFacts
from agent.deploy.state import Deployment
from agent.errors import (
    DeployError,
    DeploymentNotFoundError,
    InvalidArgumentError,
    LinkNotConfiguredError,
    OutboxFullError,
    RequestError,
    StreamError,
)
from agent.models.served import LoadFailure
from agent.operations import AgentInfo, Operations
from agent.pipelines.manager import StreamManager
from cloud_sync import fsutil
from tests.fakes import FakeMonitor, FakeSwapper, RecordingSink, drive, fake_worker, make_served


@dataclass
class Rig:
    ops: Operations
    swapper: FakeSwapper
    uplink: Uplink
    deployer: Deployer
    monitor: FakeMonitor
    state_dir: Path
    settings: list[tuple[Config, dict[str, Any]]] = field(default_factory=list)

    def attach(self, seq: int | None = 1) -> RecordingSink:
        link = RecordingSink(seq)
        self.uplink.attach(link)
        return link

    @property
    def overrides(self) -> Path:
        return self.state_dir / OVERRIDES_FILE


@pytest.fixture(autouse=True)
def _no_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``set_config`` validates with the process environment: keep the developer's out of it."""
    import os

    for var in list(os.environ):
        if var.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(var)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    state_dir = tmp_path / "state"
    info = AgentInfo("1.2.3", "dev-1", tmp_path / "models", None, "x86-cpu", "auto: x86_64", 2, {"arch": "x86_64"})
    swapper, uplink = FakeSwapper(), Uplink()
    deployer = Deployer(UpdatesSection(), models_dir=tmp_path / "models", state_dir=state_dir, models=swapper,
                        sink=uplink, device=DeviceFacts("1.2.3"))
    streams = StreamManager({"mic": StreamSection(source={"type": "wav", "path": "x.wav"}, model="vad",
                                                  autostart=False)}, swapper, uplink)
    monitor = FakeMonitor()
    settings: list[tuple[Config, dict[str, Any]]] = []

    def on_settings(config: Config, changed: Mapping[str, Any]) -> None:
        settings.append((config, dict(changed)))

    ops = Operations(info, models=swapper, deployer=deployer, streams=streams, monitor=monitor,  # type: ignore[arg-type]
                     uplink=uplink, state_dir=state_dir, stuck_after_s=10.0, on_settings=on_settings)
    yield Rig(ops, swapper, uplink, deployer, monitor, state_dir, settings)


# -- push_result --------------------------------------------------------------------------------------------------


def test_push_result_without_a_link(rig: Rig) -> None:
    with pytest.raises(LinkNotConfiguredError) as caught:
        rig.ops.push_result("app", {"x": 1})
    assert caught.value.code == "not_configured"


@pytest.mark.parametrize("body", [[1, 2], "text", 5, None])
def test_push_result_needs_an_object(rig: Rig, body: Any) -> None:
    link = rig.attach()
    with pytest.raises(RequestError) as caught:
        rig.ops.push_result("app", body)
    assert caught.value.code == "bad_request"
    assert link.results == []


@pytest.mark.parametrize("seq", [-1, None])
def test_push_result_outbox_full(rig: Rig, seq: int | None) -> None:
    rig.attach(seq)
    with pytest.raises(OutboxFullError) as caught:
        rig.ops.push_result("app", {"x": 1})
    assert caught.value.code == "outbox_full"


def test_push_result_returns_the_outbox_seq(rig: Rig) -> None:
    link = rig.attach(42)
    assert rig.ops.push_result("app", {"label": "cat"}) == 42
    assert link.results == [("app", {"label": "cat"})]


# -- set_config ---------------------------------------------------------------------------------------------------


async def test_set_config_refuses_a_key_that_is_not_settable(rig: Rig) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await rig.ops.set_config({"mqtt.telemetry_interval_s": 5, "mqtt.url": "mqtt://evil", "agent.device_id": "x"})
    assert caught.value.code == "bad_args"
    assert str(caught.value).startswith("values.agent.device_id: not settable remotely (settable: ")
    assert "logging.level" in str(caught.value)
    assert not rig.overrides.exists()
    assert rig.settings == []


@pytest.mark.parametrize(("values", "key"), [
    ({"mqtt.telemetry_interval_s": 0}, "values.mqtt.telemetry_interval_s: "),
    ({"mqtt.telemetry_interval_s": "often"}, "values.mqtt.telemetry_interval_s: "),
    ({"logging.level": "loud"}, "values.logging.level: "),
])
async def test_set_config_refuses_a_bad_value_and_keeps_what_was_persisted(rig: Rig, values: dict[str, Any],
                                                                           key: str) -> None:
    rig.overrides.parent.mkdir(parents=True)
    rig.overrides.write_bytes(orjson.dumps({"logging.level": "debug"}))
    with pytest.raises(InvalidArgumentError) as caught:
        await rig.ops.set_config(values)
    assert caught.value.code == "bad_args"
    assert str(caught.value).startswith(key)
    assert orjson.loads(rig.overrides.read_bytes()) == {"logging.level": "debug"}
    assert rig.settings == []


async def test_set_config_persists_merged_and_applies(rig: Rig) -> None:
    rig.overrides.parent.mkdir(parents=True)
    rig.overrides.write_bytes(orjson.dumps({"logging.level": "debug"}))

    answer = await rig.ops.set_config({"mqtt.telemetry_interval_s": 5})

    assert answer == {"applied": {"mqtt.telemetry_interval_s": 5}, "persisted": str(rig.overrides)}
    assert orjson.loads(rig.overrides.read_bytes()) == {"logging.level": "debug", "mqtt.telemetry_interval_s": 5}
    assert sorted(p.name for p in rig.state_dir.iterdir()) == [OVERRIDES_FILE]  # no temp file left behind
    [(config, changed)] = rig.settings
    assert changed == {"mqtt.telemetry_interval_s": 5}  # only what changed now
    assert config.mqtt.telemetry_interval_s == 5.0
    assert config.logging.level == "debug"  # the full, validated config, earlier overrides included


async def test_set_config_write_is_atomic(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.overrides.parent.mkdir(parents=True)
    rig.overrides.write_bytes(orjson.dumps({"logging.level": "debug"}))

    def power_cut(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch, pytest.raises(OSError):
        patch.setattr(fsutil.os, "fsync", power_cut)
        await rig.ops.set_config({"logging.level": "error"})

    assert orjson.loads(rig.overrides.read_bytes()) == {"logging.level": "debug"}  # the old file, whole
    assert rig.settings == []  # not applied when not persisted


# -- deployments --------------------------------------------------------------------------------------------------


async def test_deployment_not_found(rig: Rig) -> None:
    with pytest.raises(DeploymentNotFoundError) as caught:
        await rig.ops.deployment("vad")
    assert caught.value.code == "not_found"


async def test_deployment_is_the_record_and_whether_it_runs(rig: Rig) -> None:
    record = Deployment("vad", 2, 1, state="committed")
    rig.deployer.store.save(record)
    got = await rig.ops.deployment("vad")
    assert got == {**orjson.loads(orjson.dumps(record.to_dict())), "running": False}


async def test_deploy_and_wait_raises_the_deployers_code(rig: Rig) -> None:
    with pytest.raises(DeployError) as caught:
        await rig.ops.deploy_and_wait("vad", 2)  # no repository configured
    assert caught.value.code == "not_configured"
    got = await rig.ops.deployment("vad")
    assert (got["state"], got["error"]["code"], got["running"]) == ("failed", "not_configured", False)


async def test_rollback_of_an_unknown_model(rig: Rig) -> None:
    with pytest.raises(DeployError) as caught:
        await rig.ops.rollback("nope")
    assert caught.value.code == "not_found"


# -- models -------------------------------------------------------------------------------------------------------


def test_stuck_workers(rig: Rig) -> None:
    now = time.monotonic()
    for version, busy in ((1, None), (2, now - 5), (3, now - 31), (4, now - 3600), (5, now - 15)):
        served = rig.swapper.add(make_served("vad", version))
        fake_worker(served).busy_since = busy
    # Three times stuck_after_s (10 s): past what the in-process watchdog could heal.
    assert rig.ops.stuck_workers() == ["vad@3", "vad@4"]
    assert rig.ops.stuck_workers(threshold_s=4) == ["vad@2", "vad@3", "vad@4", "vad@5"]
    assert rig.ops.stuck_workers(threshold_s=7200) == []


def test_describe_models_flags_the_default_version(rig: Rig) -> None:
    rig.swapper.add(make_served("vad", 1), active=True)
    rig.swapper.add(make_served("vad", 2))
    rig.swapper.add(make_served("kws", 3))
    rig.swapper.load_failures.append(LoadFailure("vad", 5, "/m/vad/5/model.onnx", "bad file"))

    described = rig.ops.describe_models()

    assert [(m["name"], m["version"], m["state"], m.get("default")) for m in described] == [
        ("kws", 3, "AVAILABLE", True),
        ("vad", 5, "FAILED", None),
        ("vad", 2, "AVAILABLE", False),
        ("vad", 1, "AVAILABLE", True),  # the active version, not the highest
    ]


def test_inventory_and_counters(rig: Rig) -> None:
    served = rig.swapper.add(make_served("vad", 1, delegate="XnnpackExecutionProvider"))
    drive(served.stats, ok=3, failed=1)
    assert rig.ops.inventory() == [{"name": "vad", "version": 1, "runtime": "onnx",
                                    "delegate": "XnnpackExecutionProvider"}]
    assert rig.ops.model_counters() == [{"name": "vad", "version": 1, "requests": 4, "errors": 1,
                                         "delegate": "XnnpackExecutionProvider",
                                         "latency_ms": {"p50": 1.0, "p99": 1.0, "count": 3}}]
    # each telemetry sample covers the calls since the previous one
    assert rig.ops.model_counters()[0]["latency_ms"] is None
    drive(served.stats, ok=99, latency_s=0.002)
    drive(served.stats, ok=1, latency_s=0.050)
    assert rig.ops.model_counters()[0]["latency_ms"] == {"p50": 2.0, "p99": 50.0, "count": 100}


async def test_reload_announces_the_new_inventory(rig: Rig) -> None:
    link = rig.attach()
    rig.swapper.reload_answer = {"added": ["vad@2"], "removed": [], "failed": []}
    assert await rig.ops.reload() == {"added": ["vad@2"], "removed": [], "failed": []}
    assert rig.swapper.calls == [("reload",)]
    assert link.inventory_changes == 1


# -- streams ------------------------------------------------------------------------------------------------------


async def test_stream_errors(rig: Rig) -> None:
    with pytest.raises(StreamError) as unknown:
        rig.ops.stream_start("nope")
    assert "mic" in str(unknown.value)
    with pytest.raises(StreamError):
        await rig.ops.stream_stop("mic")  # configured, not running
    with pytest.raises(StreamError):
        rig.ops.stream_feed("nope")


# -- status -------------------------------------------------------------------------------------------------------


async def test_status_without_a_link(rig: Rig) -> None:
    rig.swapper.add(make_served("vad", 1), active=True)
    rig.deployer.store.save(Deployment("vad", 1, None, state="committed"))
    rig.ops.info.listeners.append("unix:/run/agent.sock")

    status = await rig.ops.status()

    assert set(status) == {"agent", "profile", "hardware", "models", "link", "outbox", "system", "deployments",
                           "streams", "shadows"}
    agent = status["agent"]
    assert {k: agent[k] for k in ("version", "device_id", "listeners", "config")} == {
        "version": "1.2.3", "device_id": "dev-1", "listeners": ["unix:/run/agent.sock"], "config": None}
    assert agent["uptime_s"] >= 0
    assert status["profile"] == {"name": "x86-cpu", "reason": "auto: x86_64", "threads": 2}
    assert status["hardware"] == {"arch": "x86_64"}
    assert [(m["name"], m["version"], m["default"]) for m in status["models"]] == [("vad", 1, True)]
    assert (status["link"], status["outbox"]) == (None, None)
    assert status["system"] == {"cpu_percent": 1.5, "memory": {"used": 1}}
    assert [(d["model"], d["state"]) for d in status["deployments"]] == [("vad", "committed")]
    assert status["streams"] == [{"name": "mic", "state": "stopped", "model": "vad"}]
    assert status["shadows"] == []
    assert rig.monitor.snapshots == 1
    orjson.dumps(status)  # what the API and the status command send


async def test_status_with_a_link(rig: Rig) -> None:
    rig.attach()
    status = await rig.ops.status()
    assert status["link"] == {"connected": True}
    assert status["outbox"] == {"pending": 0}
    assert status["models"] == [] and status["deployments"] == []


def test_ping(rig: Rig) -> None:
    pong = rig.ops.ping()
    assert pong["pong"] is True and pong["device_id"] == "dev-1"
