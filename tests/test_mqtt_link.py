"""The MQTT cloud link against a real mosquitto: birth/LWT, commands, idempotency, no loss,
TLS with client certificates, staged rollouts, and the edge-fleet console."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.fleet.console import FleetClient, rollout
from cloud_sync.mqtt.settings import BrokerSettings
from tests.conftest import Daemon, install, start_daemon, wait_for
from tests.mqtt_broker import Broker, make_broker


@pytest.fixture
def small_models(tmp_path: Path, samples) -> Path:
    root = tmp_path / "models"
    install(root, samples, "okay_nabu")
    return root


def agent_env(broker: Broker, device: str, **extra: str) -> dict[str, str]:
    env = {"EDGE_AGENT_MQTT__URL": broker.url, "EDGE_AGENT_AGENT__DEVICE_ID": device,
           "EDGE_AGENT_MQTT__BACKOFF_MIN_S": "0.1", "EDGE_AGENT_MQTT__BACKOFF_MAX_S": "0.5"}
    env.update(extra)
    return env


def start_agent(tmp_path: Path, models: Path, broker: Broker, device: str, **extra: str) -> Daemon:
    return start_daemon(tmp_path / device, "--models-dir", str(models), env=agent_env(broker, device, **extra))




def console(broker: Broker, **kw) -> FleetClient:
    client = FleetClient(BrokerSettings(url=broker.url, **kw))
    client.connect()
    return client


def device_state(client: FleetClient, device: str) -> dict:
    states = {d.id: d for d in client.devices(wait=0.5)}
    return states[device].state if device in states else {}


# -- session: birth, Last Will, graceful offline -------------------------------------------------------
def test_birth_offline_and_last_will(tmp_path, small_models, broker):
    agent = start_agent(tmp_path, small_models, broker, "dev-1", EDGE_AGENT_MQTT__GROUPS='["lab"]')
    with console(broker) as fleet:
        state = wait_for(lambda: device_state(fleet, "dev-1").get("online") and device_state(fleet, "dev-1"),
                         what="birth")
        assert state["groups"] == ["lab"] and state["profile"] == "x86-cpu" and state["started_at"] > 0
        assert state["models"] == [{"name": "okay_nabu", "version": 1, "runtime": "tflite", "delegate": "xnnpack"}]
        assert agent.stop() == 0
        state = device_state(fleet, "dev-1")
        assert state["online"] is False and state["reason"] == "shutdown"

        killed = start_agent(tmp_path / "again", small_models, broker, "dev-1")
        wait_for(lambda: device_state(fleet, "dev-1").get("online"), what="second birth")
        killed.stop(signal.SIGKILL)
        state = wait_for(lambda: (s := device_state(fleet, "dev-1")) and s.get("online") is False and s,
                         what="last will")
        assert state == {"online": False, "device_id": "dev-1"}, "the Last Will, not a graceful offline"


# -- commands -----------------------------------------------------------------------------------------------
def raw_command(fleet: FleetClient, device: str, payload: bytes, timeout: float = 10) -> dict:
    """Publish arbitrary bytes as a command, with an MQTT 5 response address."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = fleet.reply_topic
    props.CorrelationData = b"raw"
    fleet._client.publish(f"edge/v1/devices/{device}/commands", payload, qos=1, properties=props)
    for msg in fleet.messages(timeout):
        if msg.topic == fleet.reply_topic and msg.correlation == b"raw":
            return json.loads(msg.payload)
    raise AssertionError("no response")


@pytest.fixture
def linked(tmp_path, small_models, broker):
    agent = start_agent(tmp_path, small_models, broker, "dev-1", EDGE_AGENT_MQTT__MAX_COMMAND_BYTES="2048")
    fleet = console(broker)
    wait_for(lambda: device_state(fleet, "dev-1").get("online"), what="birth")
    yield agent, fleet
    fleet.close()
    agent.stop()


@pytest.fixture(scope="module")
def shared_link(tmp_path_factory, samples):
    """One broker and one linked agent for the command tables: each case is one command and its
    answer (ids never repeat), so they need not pay a broker and a daemon start each."""
    work = tmp_path_factory.mktemp("shared-link")
    models = work / "models"
    install(models, samples, "okay_nabu")
    broker = make_broker(work / "mosquitto")
    broker.start()
    agent = start_agent(work, models, broker, "dev-1", EDGE_AGENT_MQTT__MAX_COMMAND_BYTES="2048")
    fleet = console(broker)
    try:
        wait_for(lambda: device_state(fleet, "dev-1").get("online"), what="birth")
        yield agent, fleet
    finally:
        fleet.close()
        agent.stop()
        broker.stop()


COMMAND_CASES = [
    ("ping", {}, True, None, lambda r: r["result"]["pong"] is True),
    ("status", {}, True, None, lambda r: r["result"]["models"][0]["name"] == "okay_nabu"
     and r["result"]["link"]["connected"] is True),
    ("logs", {"lines": 5}, True, None, lambda r: 1 <= len(r["result"]["lines"]) <= 5),
    ("logs", {"lines": "many"}, False, "bad_args", lambda r: "args.lines" in r["error"]["message"]),
    ("logs", {"lines": 5, "color": True}, False, "bad_args", lambda r: "args.color: unknown argument"
     in r["error"]["message"]),
    ("ping", {"x": 1}, False, "bad_args", lambda r: "takes no arguments" in r["error"]["message"]),
    ("self-destruct", {}, False, "unknown_command", lambda r: "unknown command 'self-destruct'"
     in r["error"]["message"]),
    ("deploy", {"model": "okay_nabu", "version": 2}, False, "not_configured", lambda r: "[updates]"
     in r["error"]["message"]),
    ("deploy", {"version": 2}, False, "bad_args", lambda r: "args.model" in r["error"]["message"]),
    ("rollback", {"model": "okay_nabu"}, False, "no_previous", lambda r: "no version older than 1"
     in r["error"]["message"]),
    ("rollback", {"model": "ghost"}, False, "not_found", lambda r: "'ghost'" in r["error"]["message"]),
    ("stream-start", {"stream": "cam"}, False, "bad_stream", lambda r: "no stream 'cam'" in r["error"]["message"]),
    ("stream-stop", {"stream": "cam"}, False, "bad_stream", lambda r: "not running" in r["error"]["message"]),
    ("set-config", {"values": {"agent.device_id": "x"}}, False, "bad_args", lambda r: "not settable"
     in r["error"]["message"]),
    ("set-config", {"values": {"logging.level": "loud"}}, False, "bad_args", lambda r: "logging.level"
     in r["error"]["message"]),
    ("reload", {}, True, None, lambda r: r["result"] == {"added": [], "removed": [], "failed": []}),
]


@pytest.mark.parametrize(("name", "args", "ok", "code", "check"), COMMAND_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(COMMAND_CASES)])
def test_commands(shared_link, name, args, ok, code, check):
    _agent, fleet = shared_link
    response = fleet.command("dev-1", name, args, timeout=10)
    assert response["ok"] is ok, response
    assert response["device_id"] == "dev-1" and response["status"] == "done"
    if code:
        assert response["error"]["code"] == code
    assert check(response), response


@pytest.mark.parametrize(("payload", "code", "fragment"), [
    (b"{not json", "bad_request", "malformed JSON"),
    (b"[1, 2]", "bad_request", "JSON object"),
    (b'{"name": "ping"}', "bad_request", "'id'"),
    (b'{"id": "a1", "name": 7}', "bad_request", "'name'"),
    (b'{"id": "a2", "name": "ping", "args": [1]}', "bad_args", "'args' must be an object"),
    (b'{"id": "a3", "name": "ping", "pad": "' + b"x" * 3000 + b'"}', "too_large", "exceeds 2048"),
    (b'{"id": "a4", "name": "set-config", "args": {"values": {"logging.level": "debug"}}, "device_id": "dev-2"}',
     "wrong_device", "'dev-2'"),
])
def test_malformed_commands_get_error_responses(shared_link, payload, code, fragment):
    agent, fleet = shared_link
    response = raw_command(fleet, "dev-1", payload)
    assert response["ok"] is False and response["error"]["code"] == code
    assert fragment in response["error"]["message"]
    assert fleet.command("dev-1", "ping")["ok"], "the agent keeps answering"
    assert agent.proc.poll() is None


def test_long_running_command_answers_accepted_then_final_and_an_event(linked):
    _agent, fleet = linked
    fleet.subscribe(["edge/v1/devices/dev-1/events"])
    seen: list[dict] = []
    final = fleet.command("dev-1", "reload", timeout=10, on_response=seen.append)
    assert [r["status"] for r in seen] == ["accepted", "done"] and final["ok"] is True
    event = wait_for(lambda: next((json.loads(m.payload) for m in fleet.messages(2)
                                   if m.topic.endswith("/events")), None), what="completion event")
    assert event["type"] == "command.completed" and event["name"] == "reload" and event["ok"] is True
    assert isinstance(event["seq"], int)


def test_retried_command_id_runs_once(linked):
    agent, fleet = linked
    first = fleet.responses(fleet.send("dev-1", "set-config", {"values": {"logging.level": "debug"}}, cid="fixed-1"),
                            10)
    second = fleet.responses(fleet.send("dev-1", "set-config", {"values": {"logging.level": "debug"}},
                                        cid="fixed-1"), 10)
    assert first and second and first[0] == second[0] and first[0]["ok"] is True
    log = agent.log_text()
    assert log.count('"command.received"') >= 1
    received = [line for line in log.splitlines() if "command.received" in line and "fixed-1" in line]
    repeated = [line for line in log.splitlines() if "command.repeated" in line and "fixed-1" in line]
    assert len(received) == 1 and len(repeated) == 1


def test_set_config_applies_and_persists(tmp_path, small_models, broker):
    agent = start_agent(tmp_path, small_models, broker, "dev-1", EDGE_AGENT_MQTT__TELEMETRY_INTERVAL_S="3600")
    with console(broker) as fleet:
        wait_for(lambda: device_state(fleet, "dev-1").get("online"), what="birth")
        fleet.subscribe(["edge/v1/devices/dev-1/telemetry"])
        response = fleet.command("dev-1", "set-config", {"values": {"mqtt.telemetry_interval_s": 1}})
        assert response["ok"], response
        arrivals = [m.received for m in fleet.messages(3.5) if m.topic.endswith("/telemetry")]
        assert len(arrivals) >= 2, "telemetry now every second"
        assert agent.stop() == 0
        state_dir = tmp_path / "dev-1" / "state"
        assert json.loads((state_dir / "config-overrides.json").read_text()) == {"mqtt.telemetry_interval_s": 1}
        again = start_daemon(tmp_path / "dev-1", "--models-dir", str(small_models),
                             env=agent_env(broker, "dev-1", EDGE_AGENT_MQTT__TELEMETRY_INTERVAL_S="3600"))
        fleet.subscribe(["edge/v1/devices/dev-1/telemetry"])
        arrivals = [m for m in fleet.messages(3.5) if m.topic.endswith("/telemetry")]
        assert len(arrivals) >= 2, "the remote setting survives a restart"
        again.stop()


def test_reload_publishes_new_inventory(linked, small_models, samples):
    _agent, fleet = linked
    install(small_models, samples, "okay_nabu", version=2)
    response = fleet.command("dev-1", "reload")
    assert response["result"]["added"] == ["okay_nabu@2"] and response["result"]["removed"] == ["okay_nabu@1"]
    state = wait_for(lambda: (s := device_state(fleet, "dev-1")) and s["models"][0]["version"] == 2 and s,
                     what="new birth")
    assert [m["version"] for m in state["models"]] == [2]


def test_group_commands_and_foreign_topics(tmp_path, small_models, broker):
    a = start_agent(tmp_path, small_models, broker, "dev-a", EDGE_AGENT_MQTT__GROUPS='["lab"]')
    b = start_agent(tmp_path, small_models, broker, "dev-b", EDGE_AGENT_MQTT__GROUPS='["lab"]')
    c = start_agent(tmp_path, small_models, broker, "dev-c")
    with console(broker) as fleet:
        wait_for(lambda: {d.id for d in fleet.members("lab")} == {"dev-a", "dev-b"}, what="group births")
        cid = fleet.send(None, "ping", group="lab")
        finals = fleet.responses(cid, 10, expect=2)
        assert sorted(r["device_id"] for r in finals) == ["dev-a", "dev-b"] and all(r["ok"] for r in finals)
        # a command for another device never reaches dev-c
        fleet.command("dev-a", "ping")
        assert "command.received" not in [json.loads(x).get("event") for x in c.log_text().splitlines()
                                          if x.startswith("{")]
    for d in (a, b, c):
        assert d.stop() == 0


def test_mqtt_311_answers_on_responses_topic(tmp_path, small_models, broker):
    agent = start_agent(tmp_path, small_models, broker, "dev-1", EDGE_AGENT_MQTT__PROTOCOL='"3.1.1"')
    try:
        with console(broker, protocol="3.1.1") as fleet:
            wait_for(lambda: device_state(fleet, "dev-1").get("online"), what="birth")
            response = fleet.command("dev-1", "ping")
            assert response["ok"] and response["result"]["pong"]
    finally:
        assert agent.stop() == 0


def test_broker_unreachable_at_start_then_connects(tmp_path, small_models):
    import numpy as np

    broker = make_broker(tmp_path / "late")
    agent = start_agent(tmp_path, small_models, broker, "dev-1")
    try:
        out = agent.client.infer("okay_nabu", {"serving_default_input_audio:0": np.zeros((1, 3, 40), np.float32)})
        assert out, "local predicts work while the broker is down"
        assert agent.client.status()["link"]["connected"] is False
        broker.start()
        wait_for(lambda: agent.client.status()["link"]["connected"], timeout=15, what="connect after start")
        with console(broker) as fleet:
            assert device_state(fleet, "dev-1")["online"] is True
    finally:
        agent.stop()
        broker.stop()


def test_results_api_without_link_is_503(daemon_factory, small_models):
    daemon = daemon_factory("--models-dir", str(small_models))
    status, _, body = daemon.client.request("POST", "/v1/agent/results/cam", b'{"x": 1}')
    assert status == 503 and b"[mqtt] url" in body


# -- no loss across broker outage and agent SIGKILL -----------------------------------------------------
class Collector:
    """A persistent-session subscriber: the broker keeps its QoS 1 messages while it is away."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.seqs: set[int] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="collector",
                                  protocol=mqtt.MQTTv5)
        self.topic = topic
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()

    def _message(self, _c, _u, msg) -> None:
        with self.lock:
            self.seqs.add(orjson.loads(msg.payload)["seq"])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def post_results(daemon: Daemon, count: int, start: int) -> list[int]:
    seqs = []
    for i in range(start, start + count):
        status, _, body = daemon.client.request("POST", "/v1/agent/results/cam", orjson.dumps({"i": i}))
        assert status == 202, body
        seqs.append(orjson.loads(body)["seq"])
    return seqs


@pytest.mark.timeout(180)
def test_no_result_lost_across_outage_and_sigkill(tmp_path, small_models):
    broker = make_broker(tmp_path / "mq", persistence=True)
    broker.start()
    collector = Collector(broker, "edge/v1/devices/dev-1/results/#")
    work = tmp_path / "agent"
    env = agent_env(broker, "dev-1")
    agent = start_daemon(work, "--models-dir", str(small_models), env=env)
    try:
        wait_for(lambda: agent.client.status()["link"]["connected"], what="connected")
        sent = post_results(agent, 3000, 0)
        broker.stop()  # outage: results pile up in the outbox
        sent += post_results(agent, 3000, 3000)
        agent.stop(signal.SIGKILL)  # killed while offline, with messages in the outbox
        agent = start_daemon(work, "--models-dir", str(small_models), env=env)
        sent += post_results(agent, 4000, 6000)
        broker.start()
        assert len(set(sent)) == 10_000 and sorted(sent) == sent, "seqs are unique and increasing"
        wait_for(lambda: collector.seqs >= set(sent), timeout=90, what="every result delivered")
        assert collector.seqs >= set(sent)
        outbox = agent.client.status()
        assert outbox["link"]["connected"] is True
    finally:
        collector.close()
        agent.stop()
        broker.stop()


def test_outbox_bound_drops_oldest_results_and_counts(tmp_path, small_models):
    broker = make_broker(tmp_path / "mq")  # never started: everything stays in the outbox
    agent = start_agent(tmp_path, small_models, broker, "dev-1", EDGE_AGENT_MQTT__OUTBOX_MAX_MESSAGES="100")
    try:
        seqs = post_results(agent, 150, 0)
        assert len(seqs) == 150 and all(s > 0 for s in seqs)
        from cloud_sync.outbox import Outbox

        agent.stop()
        box = Outbox(tmp_path / "dev-1" / "state" / "cloud" / "outbox.db", max_messages=100)
        stats = box.stats()
        assert stats.depth <= 100 and stats.dropped["result"] >= 50
        kept = [m.seq for m in box.pending(limit=1000) if m.kind == "result"]
        assert kept == sorted(kept) and kept[-1] == seqs[-1], "the newest results are kept"
        box.close()
    finally:
        agent.stop()


# -- TLS with client certificates -------------------------------------------------------------------------
def test_tls_client_certificates(tmp_path, small_models, tls_broker):
    cert, key = tls_broker.tls.client("dev-a")
    agent = start_agent(tmp_path, small_models, tls_broker, "dev-a", EDGE_AGENT_MQTT__CA_FILE=str(tls_broker.tls.ca),
                        EDGE_AGENT_MQTT__CERT_FILE=str(cert), EDGE_AGENT_MQTT__KEY_FILE=str(key))
    ccert, ckey = tls_broker.tls.client("console")
    try:
        settings = BrokerSettings(url=tls_broker.url, ca_file=str(tls_broker.tls.ca), cert_file=str(ccert),
                                  key_file=str(ckey))
        with FleetClient(settings) as fleet:
            wait_for(lambda: device_state(fleet, "dev-a").get("online"), what="birth over TLS")
            assert fleet.command("dev-a", "ping")["ok"]
    finally:
        assert agent.stop() == 0


# -- staged rollout ------------------------------------------------------------------------------------------
def test_staged_rollout_stops_on_failing_canary(tmp_path, small_models, broker):
    agents = [start_agent(tmp_path, small_models, broker, f"dev-{i}", EDGE_AGENT_MQTT__GROUPS='["lab"]')
              for i in range(3)]
    try:
        with console(broker) as fleet:
            members = wait_for(lambda: sorted(d.id for d in fleet.members("lab")) == ["dev-0", "dev-1", "dev-2"]
                               and ["dev-0", "dev-1", "dev-2"], what="births")
            report = rollout(fleet, members, "deploy", {"model": "okay_nabu", "version": 2}, canary="1",
                             abort_after=1, timeout=15)
            assert report.aborted and list(report.failed) == ["dev-0"] and report.skipped == ["dev-1", "dev-2"]
            assert "not_configured" in report.failed["dev-0"]
            ok = rollout(fleet, members, "reload", {}, canary="34%", wave_size=1, timeout=15)
            assert ok.ok and ok.waves == [["dev-0"], ["dev-1"], ["dev-2"]] and ok.succeeded == members
        for a in agents[1:]:
            assert '"name": "deploy"' not in a.log_text(), "devices after the canary never got the deploy"
    finally:
        for a in agents:
            a.stop()


# -- edge-fleet console ------------------------------------------------------------------------------------
def fleet_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys; from cloud_sync.fleet.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_edge_fleet_cli(tmp_path, small_models, broker):
    agent = start_agent(tmp_path, small_models, broker, "dev-1", EDGE_AGENT_MQTT__TELEMETRY_INTERVAL_S="1")
    try:
        with console(broker) as fleet:
            wait_for(lambda: device_state(fleet, "dev-1").get("online"), what="birth")
        with console(broker) as fleet:  # telemetry every second refreshes the retained state with health
            wait_for(lambda: device_state(fleet, "dev-1").get("health"), what="health in the retained state")
        out = fleet_cli("devices", "--broker", broker.url)
        assert out.returncode == 0 and "dev-1" in out.stdout and "okay_nabu@1" in out.stdout, out.stderr
        assert "ok cpu" in out.stdout and "mem " in out.stdout and "disk " in out.stdout
        out = fleet_cli("command", "--broker", broker.url, "dev-1", "logs", "lines=3")
        assert out.returncode == 0 and json.loads(out.stdout)["ok"] is True
        out = fleet_cli("command", "--broker", broker.url, "dev-1", "deploy", "model=x")
        assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "not_configured"
        out = fleet_cli("watch", "--broker", broker.url, "dev-1", "--telemetry", "--count", "2", "--timeout", "10")
        assert out.returncode == 0 and out.stdout.count("telemetry {") == 2
        telemetry = json.loads(out.stdout.splitlines()[0].split(" ", 1)[1])
        assert telemetry["system"]["memory"]["percent"] > 0 and telemetry["outbox"]["depth"] >= 0
        assert telemetry["models"] and all("latency_ms" in m for m in telemetry["models"])
        out = fleet_cli("deploy", "--broker", broker.url, "okay_nabu@2", "--to", "dev-1", "--timeout", "10")
        assert out.returncode == 1 and "failed: 1" in out.stdout
        config = tmp_path / "fleet.toml"
        config.write_text(f'[broker]\nurl = "{broker.url}"\n')
        out = fleet_cli("command", "--config", str(config), "dev-1", "ping")
        assert out.returncode == 0
        config.write_text('[broker]\nhost = "x"\n')
        out = fleet_cli("devices", "--config", str(config))
        assert out.returncode == 2 and "broker.host" in out.stderr
        out = fleet_cli("devices", "--broker", "mqtt://127.0.0.1:1")
        assert out.returncode == 1 and "cannot connect" in out.stderr
    finally:
        agent.stop()
