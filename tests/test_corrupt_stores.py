"""A corrupt store never stops the daemon (the SD-card power-loss case): each store is damaged on disk for
real, a real ``edge-agent run`` starts anyway, moves the file aside as ``NAME.corrupt-TIMESTAMP``, starts
fresh, works, and reports a ``store.corrupt`` event once the link is up. The API starts even when the link
cannot."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import orjson
import pytest

from cloud_sync.fleet.console import FleetClient
from cloud_sync.mqtt.settings import BrokerSettings
from cloud_sync.outbox import Outbox
from tests.conftest import Daemon, install, start_daemon, wait_for
from tests.mqtt_broker import Broker
from tests.test_link_faults import Collector, agent_env

AUDIO = {"serving_default_input_audio:0": np.zeros((1, 3, 40), np.float32)}


@pytest.fixture
def small_models(tmp_path: Path, samples) -> Path:
    root = tmp_path / "models"
    install(root, samples, "okay_nabu")
    return root


def start(work: Path, models: Path, broker: Broker) -> Daemon:
    return start_daemon(work, "--models-dir", str(models), env=agent_env(broker.url, "dev-1"))


def corrupt_event(collector: Collector, store: str) -> dict:
    def find() -> dict | None:
        with collector.lock:
            return next((p for p in collector.payloads if p.get("type") == "store.corrupt" and p["store"] == store),
                        None)

    return wait_for(find, timeout=15, what=f"a store.corrupt event for the {store}")


def moved_aside(path: Path) -> Path:
    found = sorted(path.parent.glob(f"{path.name}.corrupt-*"))
    assert len([p for p in found if not p.name.endswith(("-wal", "-shm"))]) == 1, found
    return found[0]


def assert_serving(agent: Daemon) -> None:
    assert agent.proc.poll() is None
    assert agent.client.infer("okay_nabu", AUDIO), "local predict works"


def random_bytes(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(8192)
    path.write_bytes(data)
    return data


def truncated_outbox(path: Path) -> bytes:
    with Outbox(path) as ob:
        ob.put_many([("result", "t/r", {"i": i, "pad": "x" * 300}) for i in range(2000)])
    data = path.read_bytes()[: 4096 * 30]
    path.write_bytes(data)
    return data


def newer_outbox(path: Path) -> bytes:
    with Outbox(path) as ob:
        ob.put("event", "t/e", {})
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", [random_bytes, truncated_outbox, newer_outbox],
                         ids=["8KiB-random", "truncated", "newer-schema"])
def test_corrupt_outbox_is_moved_aside_and_the_agent_runs(tmp_path, small_models, broker, damage):
    path = tmp_path / "agent" / "state" / "cloud" / "outbox.db"
    original = damage(path)
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/#")
    agent = start(tmp_path / "agent", small_models, broker)
    try:
        assert_serving(agent)
        event = corrupt_event(collector, "outbox")
        aside = moved_aside(path)
        assert aside.read_bytes() == original, "the damaged file is kept for inspection, untouched"
        assert event["path"] == str(path) and event["moved_to"] == str(aside) and event["reason"]
        status, _, body = agent.client.request("POST", "/v1/agent/results/cam", b'{"x": 1}')
        assert status == 202
        seq = orjson.loads(body)["seq"]
        wait_for(lambda: seq in collector.seen(), what="a result through the fresh outbox")
        assert agent.client.status()["link"]["connected"] is True
        store_lines = [json.loads(x) for x in agent.log_text().splitlines() if '"store.corrupt"' in x]
        assert store_lines and store_lines[0]["store"] == "outbox"
    finally:
        collector.close()
        assert agent.stop() == 0


def test_corrupt_command_log_is_moved_aside_and_commands_work(tmp_path, small_models, broker):
    path = tmp_path / "agent" / "state" / "cloud" / "commands.db"
    original = random_bytes(path)
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/#")
    agent = start(tmp_path / "agent", small_models, broker)
    try:
        assert_serving(agent)
        corrupt_event(collector, "command_log")
        assert moved_aside(path).read_bytes() == original
        with FleetClient(BrokerSettings(url=broker.url)) as fleet:
            first = fleet.responses(fleet.send("dev-1", "ping", cid="after-corruption"), 10)
            again = fleet.responses(fleet.send("dev-1", "ping", cid="after-corruption"), 10)
        assert first[0]["ok"] and again[0] == first[0], "the fresh log keeps answered ids"
    finally:
        collector.close()
        assert agent.stop() == 0


@pytest.mark.parametrize("content", [
    b"\x00\x17garbage from a torn write",
    b'{"model": "okay_nabu", "version": "two", "previous": 1, "state": "swapped", "history": 5}',
    b'[1, 2, 3]',
    b'{"model": "someone_else", "version": 2, "previous": 1, "state": "swapped"}',
], ids=["not-json", "wrong-types", "not-an-object", "other-model"])
def test_corrupt_deployment_record_is_moved_aside(tmp_path, small_models, broker, content):
    path = tmp_path / "agent" / "state" / "deployments" / "okay_nabu.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/#")
    agent = start(tmp_path / "agent", small_models, broker)
    try:
        assert_serving(agent)
        event = corrupt_event(collector, "deployment")
        assert moved_aside(path).read_bytes() == content and event["path"] == str(path)
        status = agent.client.status()
        assert status["deployments"] == [] and [m["version"] for m in status["models"]] == [1]
        assert (small_models / "okay_nabu" / "1").is_dir(), "nothing was undone on the strength of a bad record"
    finally:
        collector.close()
        assert agent.stop() == 0


@pytest.mark.parametrize("content", [b'{"logging.level": "loud"}', b'{"mqtt.telemetry_interval_s": -5}',
                                     b"\xff\xfe not json", b'"a string"'],
                         ids=["invalid-level", "invalid-interval", "not-json", "not-an-object"])
def test_corrupt_config_overrides_are_moved_aside(tmp_path, small_models, broker, content):
    path = tmp_path / "agent" / "state" / "config-overrides.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/#")
    agent = start(tmp_path / "agent", small_models, broker)
    try:
        assert_serving(agent)
        corrupt_event(collector, "config_overrides")
        assert moved_aside(path).read_bytes() == content
        with FleetClient(BrokerSettings(url=broker.url)) as fleet:
            response = fleet.command("dev-1", "set-config", {"values": {"logging.level": "debug"}})
        assert response["ok"], response
        assert json.loads(path.read_text()) == {"logging.level": "debug"}, "a fresh overrides file"
    finally:
        collector.close()
        assert agent.stop() == 0


def test_api_starts_when_the_link_cannot(tmp_path, small_models, broker):
    """The link's state directory is unusable (a file where the directory should be): nothing to move aside,
    the link cannot start, and the agent serves locally and says why."""
    blocker = tmp_path / "agent" / "state" / "cloud"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"not a directory")
    agent = start(tmp_path / "agent", small_models, broker)
    try:
        assert_serving(agent)
        link = agent.client.status()["link"]
        assert link["connected"] is False and link["state"] == "unavailable" and "outbox" in link["last_error"]
        status, _, body = agent.client.request("POST", "/v1/agent/results/cam", b'{"x": 1}')
        assert status == 503 and b"could not start" in body
        assert any('"cloud.link_failed"' in line for line in agent.log_text().splitlines())
        assert blocker.read_bytes() == b"not a directory", "what is not a store is not moved"
    finally:
        assert agent.stop() == 0


def test_api_starts_when_the_tls_files_are_missing(tmp_path, small_models, tls_broker):
    """A certificate file lost with the SD card's last write: the link cannot even be built; the rest runs."""
    missing = tmp_path / "gone" / "ca.crt"
    agent = start_daemon(tmp_path / "agent", "--models-dir", str(small_models),
                         env=agent_env(tls_broker.url, "dev-a", EDGE_AGENT_MQTT__CA_FILE=str(missing)))
    try:
        assert_serving(agent)
        link = agent.client.status()["link"]
        assert link["state"] == "unavailable" and link["last_error_code"] == "link_unavailable"
        assert "No such file" in link["last_error"] or "ca.crt" in link["last_error"], link
    finally:
        assert agent.stop() == 0
