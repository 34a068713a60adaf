"""The fleet simulator against a real mosquitto: births, commands, the deploy event sequence,
failures, rollback, seq'd telemetry/results without loss, broker restarts, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_sync.fleet.console import FleetClient
from cloud_sync.fleet.simulator import FAILURES, FleetSimulator, SimModel, SimulatorSettings
from cloud_sync.mqtt.contract import DEPLOY_STEPS
from cloud_sync.mqtt.settings import BrokerSettings
from tests.conftest import wait_for
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.timeout(90)

STEPS = [f"deploy.{s}" for s in DEPLOY_STEPS]


def simulator(broker: Broker, **kw: Any) -> FleetSimulator:
    settings = SimulatorSettings(**{"devices": 20, "groups": ("lab",), "install_time_s": 0.5, "seed": 7, **kw})
    return FleetSimulator(settings, BrokerSettings(url=broker.url, backoff_min_s=0.2, backoff_max_s=2.0))


@pytest.fixture
def sim(broker: Broker) -> Iterator[FleetSimulator]:
    s = simulator(broker)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def fleet(broker: Broker) -> Iterator[FleetClient]:
    with FleetClient(BrokerSettings(url=broker.url)) as client:
        yield client


def watcher(broker: Broker, topics: list[str]) -> FleetClient:
    """A second console that only collects messages (commands on ``fleet`` would skip them)."""
    client = FleetClient(BrokerSettings(url=broker.url))
    client.connect()
    client.subscribe(topics)
    return client


def online_births(fleet: FleetClient) -> dict[str, dict[str, Any]]:
    return {d.id: d.state for d in fleet.devices(wait=0.3) if d.online}


def events_until(client: FleetClient, final: set[str], timeout: float = 20) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for msg in client.messages(timeout):
        body = msg.json()
        if isinstance(body, dict) and str(body.get("type", "")).startswith("deploy."):
            seen.append(body)
            if body["type"] in final:
                return seen
    raise AssertionError(f"no {final} event within {timeout} s; saw {[e['type'] for e in seen]}")


def test_devices_come_online_with_births(sim: FleetSimulator, fleet: FleetClient) -> None:
    births = wait_for(lambda: (b := online_births(fleet)) and len(b) == 20 and b, what="20 births")
    assert sorted(births) == [f"sim-{i:04d}" for i in range(20)]
    state = births["sim-0003"]
    assert state["groups"] == ["lab"] and state["simulated"] is True and state["started_at"] > 0
    assert state["models"] == [{"name": "silero-vad", "version": 1, "runtime": "onnx",
                                "delegate": "CPUExecutionProvider"}]
    assert sim.online() == 20
    assert sim.hub is not None and sim.hub.sessions == 20


def test_ping_status_logs_and_group_commands(sim: FleetSimulator, fleet: FleetClient) -> None:
    wait_for(lambda: sim.online() == 20, what="online")
    pong = fleet.command("sim-0001", "ping", timeout=10)
    assert pong["ok"] and pong["result"]["pong"] is True and pong["device_id"] == "sim-0001"
    status = fleet.command("sim-0001", "status", timeout=10)["result"]
    assert status["agent"]["device_id"] == "sim-0001" and status["link"]["connected"] is True
    assert status["outbox"]["last_seq"] >= 0
    lines = fleet.command("sim-0001", "logs", {"lines": 5}, timeout=10)["result"]["lines"]
    assert 1 <= len(lines) <= 5 and orjson.loads(lines[-1])["event"] == "command.received"
    unknown = fleet.command("sim-0001", "frobnicate", timeout=10)
    assert unknown["ok"] is False and unknown["error"]["code"] == "unknown_command"
    bad = fleet.command("sim-0001", "deploy", {"model": "m", "version": 0}, timeout=10)
    assert bad["error"]["code"] == "bad_args"

    cid = fleet.send(None, "ping", group="lab")
    finals = fleet.responses(cid, 15, expect=20)
    assert sorted(f["device_id"] for f in finals) == [f"sim-{i:04d}" for i in range(20)]
    assert all(f["ok"] for f in finals)


def test_deploy_walks_the_event_sequence_and_updates_the_birth(broker: Broker, sim: FleetSimulator,
                                                               fleet: FleetClient) -> None:
    wait_for(lambda: sim.online() == 20, what="online")
    events = watcher(broker, ["edge/v1/devices/sim-0002/events"])
    try:
        seen: list[dict[str, Any]] = []
        response = fleet.command("sim-0002", "deploy", {"model": "silero-vad", "version": 2}, timeout=20,
                                 on_response=seen.append)
        assert [r["status"] for r in seen] == ["accepted", "done"]
        assert response["ok"] is True and response["result"]["state"] == "committed"
        assert response["result"]["version"] == 2 and response["result"]["previous"] == 1
        steps = events_until(events, {"deploy.committed"})
    finally:
        events.close()
    assert [e["type"] for e in steps] == [*STEPS, "deploy.committed"]
    assert [e["seq"] for e in steps] == sorted(e["seq"] for e in steps)
    assert all(e["model"] == "silero-vad" and e["previous"] == 1 for e in steps)
    assert steps[0]["version"] == 2 and "error" not in steps[-1]
    assert next(e for e in steps if e["type"] == "deploy.loaded")["delegate"] == "CPUExecutionProvider"
    births = wait_for(lambda: (b := online_births(fleet)) and b["sim-0002"]["models"][0]["version"] == 2 and b,
                      what="birth with version 2")
    assert births["sim-0003"]["models"][0]["version"] == 1

    again = fleet.command("sim-0002", "deploy", {"model": "silero-vad", "version": 2}, timeout=10)
    assert again["ok"] is False and again["error"]["code"] == "already_active"

    rolled = fleet.command("sim-0002", "rollback", {"model": "silero-vad"}, timeout=10)
    assert rolled["ok"] and rolled["result"] == {"model": "silero-vad", "from": 2, "to": 1}
    wait_for(lambda: online_births(fleet)["sim-0002"]["models"][0]["version"] == 1, what="birth back at 1")
    none_left = fleet.command("sim-0002", "rollback", {"model": "silero-vad"}, timeout=10)
    assert none_left["error"]["code"] == "no_previous"


def test_a_repeated_command_id_is_answered_again_not_run_again(sim: FleetSimulator, fleet: FleetClient) -> None:
    wait_for(lambda: sim.online() == 20, what="online")
    cid = fleet.send("sim-0004", "deploy", {"model": "kws", "version": 3})
    first = fleet.responses(cid, 15)[0]
    assert first["ok"] and first["result"]["version"] == 3 and first["result"]["previous"] is None
    fleet.send("sim-0004", "deploy", {"model": "kws", "version": 3}, cid=cid)
    assert fleet.responses(cid, 10)[0] == first
    assert sim.counters.deploys_committed == 1


def test_failure_rate_one_fails_every_deploy(broker: Broker, fleet: FleetClient) -> None:
    with simulator(broker, devices=3, failure_rate=1.0, models=(SimModel(name="det", version=4, runtime="tflite"),)) \
            as sim:
        wait_for(lambda: sim.online() == 3, what="online")
        events = watcher(broker, ["edge/v1/devices/+/events"])
        try:
            response = fleet.command("sim-0000", "deploy", {"model": "det"}, timeout=20)
            steps = events_until(events, {"deploy.failed"})
        finally:
            events.close()
        codes = {code for _step, code, _message in FAILURES}
        assert response["ok"] is False and response["error"]["code"] in codes
        assert "deploy of det@5 failed" in response["error"]["message"]
        assert steps[0]["type"] == "deploy.started" and steps[-1]["type"] == "deploy.failed"
        assert steps[-1]["error"]["code"] == response["error"]["code"]
        assert "deploy.swapped" not in [e["type"] for e in steps]
        births = online_births(fleet)
        assert births["sim-0000"]["models"] == [{"name": "det", "version": 4, "runtime": "tflite",
                                                 "delegate": "xnnpack"}]
        assert sim.counters.deploys_failed == 1


def test_telemetry_and_results_arrive_in_seq_order_without_loss(broker: Broker) -> None:
    with simulator(broker, devices=5, results_per_s=50.0, telemetry_interval_s=0.2) as sim:
        wait_for(lambda: sim.online() == 5, what="online")
        client = watcher(broker, ["edge/v1/devices/sim-0001/#"])
        try:
            seqs: list[int] = []
            kinds: set[str] = set()
            for msg in client.messages(20):
                body = msg.json()
                leaf = msg.topic.split("/", 4)[-1]
                if leaf == "telemetry":
                    assert body["system"]["cpu_percent"] > 0 and body["outbox"]["depth"] >= 0
                    assert 20 <= body["system"]["temperatures"]["cpu"] <= 100
                if leaf.startswith(("results/", "telemetry", "events")):
                    seqs.append(body["seq"])
                    kinds.add(leaf.split("/")[0])
                if len(seqs) >= 200 and "telemetry" in kinds:
                    break
        finally:
            client.close()
        assert kinds == {"results", "telemetry"}
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap, no duplicate, in order"
        device = sim.device("sim-0001")
        wait_for(lambda: device.outbox.stats().depth <= 100, what="outbox drained by PUBACKs")


def test_broker_restart_brings_every_device_back(broker: Broker, sim: FleetSimulator) -> None:
    wait_for(lambda: sim.online() == 20, what="online")
    broker.restart()  # no persistence: the retained births are gone until the devices reconnect
    wait_for(lambda: sim.stats()["reconnects"] >= 20, timeout=15, what="disconnects noticed")
    wait_for(lambda: sim.online() == 20, timeout=30, what="all back online")
    with FleetClient(BrokerSettings(url=broker.url)) as fleet:
        wait_for(lambda: len(online_births(fleet)) == 20, timeout=15, what="births retained again")
        assert fleet.command("sim-0019", "ping", timeout=10)["ok"]


def test_stop_publishes_offline_state(broker: Broker, fleet: FleetClient) -> None:
    sim = simulator(broker, devices=4)
    sim.start()
    wait_for(lambda: len(online_births(fleet)) == 4, what="births")
    sim.stop()
    states = {d.id: d.state for d in fleet.devices(wait=0.3)}
    assert all(s["online"] is False and s["reason"] == "shutdown" for s in states.values())


def test_threads_driver_and_file_outboxes(broker: Broker, fleet: FleetClient, tmp_path: Path) -> None:
    with simulator(broker, devices=3, driver="threads", outbox_dir=tmp_path / "outboxes") as sim:
        assert sim.hub is None
        wait_for(lambda: len(online_births(fleet)) == 3, what="births")
        assert fleet.command("sim-0002", "deploy", {"model": "silero-vad"}, timeout=20)["result"]["version"] == 2
    assert sorted(p.name for p in (tmp_path / "outboxes").glob("*.db")) == ["sim-0000.db", "sim-0001.db",
                                                                             "sim-0002.db"]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="threads driver"):
        SimulatorSettings(devices=301, driver="threads")
    with pytest.raises(ValueError, match="failure_rate"):
        SimulatorSettings(devices=1, failure_rate=1.5)
    with pytest.raises(ValueError, match="NAME@VERSION"):
        SimModel.parse("vad")
    assert SimModel.parse("det@3:tflite") == SimModel(name="det", version=3, runtime="tflite")
    assert SimulatorSettings(devices=12000).device_ids()[-1] == "sim-11999"


def test_cli_simulate_runs_and_stops(broker: Broker, fleet: FleetClient) -> None:
    out = subprocess.run([sys.executable, "-m", "cloud_sync.fleet.cli", "simulate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "tests, demos and capacity planning" in out
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "simulate", "--devices", "3",
                             "--broker", broker.url, "--group", "demo", "--id-prefix", "cli", "--duration", "60",
                             "--status-interval", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        births = wait_for(lambda: (b := online_births(fleet)) and len(b) == 3 and b, timeout=30, what="CLI births")
        assert sorted(births) == ["cli-0000", "cli-0001", "cli-0002"]
        assert births["cli-0001"]["groups"] == ["demo"]
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "simulating 3 devices (cli-0000 .. cli-0002)" in stdout
    assert "stopping: every device sends its offline state" in stdout and "online 0/3" in stdout.splitlines()[-1]
    assert all(not d.online for d in fleet.devices(wait=0.3))


def test_cli_simulate_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from cloud_sync.fleet import cli

    assert cli.main(["simulate", "--devices", "2", "--failure-rate", "2"]) == 2
    assert "failure_rate" in capsys.readouterr().err
    assert cli.main(["simulate", "--devices", "2", "--model", "nope"]) == 2
    assert "NAME@VERSION" in capsys.readouterr().err
    assert cli.main(["simulate", "--devices", "2", "--broker", "http://x"]) == 2
    assert "broker.url" in capsys.readouterr().err
