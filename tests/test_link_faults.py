"""The cloud link when things go wrong, against real mosquitto: replay order across reconnects (the outbox is
the only source of replay), publishes the broker refuses (ACL), and TLS or authentication failures that must
be visible in status, logs and telemetry."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync.fleet.console import FleetClient
from cloud_sync.mqtt.session import DeviceSession, connect_error, lost_error, refusal_error
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.outbox import Outbox
from tests.conftest import Daemon, install, start_daemon, wait_for
from tests.mqtt_broker import TlsFiles, make_broker
from tests.tcp_proxy import Proxy


@pytest.fixture
def small_models(tmp_path: Path, samples) -> Path:
    root = tmp_path / "models"
    install(root, samples, "okay_nabu")
    return root


def agent_env(url: str, device: str, **extra: str) -> dict[str, str]:
    env = {"EDGE_AGENT_MQTT__URL": url, "EDGE_AGENT_AGENT__DEVICE_ID": device,
           "EDGE_AGENT_MQTT__BACKOFF_MIN_S": "0.1", "EDGE_AGENT_MQTT__BACKOFF_MAX_S": "0.5"}
    env.update(extra)
    return env


def log_events(agent: Daemon, event: str) -> list[dict]:
    lines = (json.loads(x) for x in agent.log_text().splitlines() if x.startswith("{"))
    return [line for line in lines if line.get("event") == event]


class Collector:
    """A subscriber that records every arrival in order (duplicates included); persistent session if asked."""

    def __init__(self, host: str, port: int, topic: str, *, persistent: bool = False, client_id: str = "collector"):
        self.arrivals: list[int] = []
        self.payloads: list[dict] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect(host, port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "collector subscribed"

    def _message(self, _c, _u, msg) -> None:
        body = orjson.loads(msg.payload)
        with self.lock:
            if "seq" in body:  # not the retained state
                self.arrivals.append(body["seq"])
            self.payloads.append({"topic": msg.topic, **body})

    def seen(self) -> set[int]:
        with self.lock:
            return set(self.arrivals)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def assert_first_arrivals_in_order(arrivals: list[int]) -> None:
    """The strict check: duplicates may come at any time (at-least-once), but a seq seen for the first time is
    always higher than every seq seen before it. One seq arriving after a higher one fails."""
    seen: set[int] = set()
    highest = 0
    for position, seq in enumerate(arrivals):
        if seq in seen:
            continue
        assert seq > highest, f"seq {seq} first arrived at position {position}, after seq {highest}"
        seen.add(seq)
        highest = seq


# -- item 14: the outbox is the only source of replay ----------------------------------------------------------
def test_outbox_is_the_only_replay_after_a_reconnect(tmp_path, broker):
    """Messages in flight when a link goes silent are sent again once, from the outbox, in order: paho must not
    resend its own copies at the next CONNACK (which also interleaved with the replay)."""
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/results/#")
    proxy = Proxy(broker.host, broker.port)
    outbox = Outbox(tmp_path / "outbox.db")
    settings = LinkSettings(device_id="dev-1", publish_window=50,
                            broker=BrokerSettings(url=f"mqtt://127.0.0.1:{proxy.port}", backoff_min_s=0.05,
                                                  backoff_max_s=0.2))
    session = DeviceSession(settings, outbox)
    topic = session.topics.results("cam")
    pad = "x" * 200
    session.start()
    try:
        wait_for(lambda: session.connected, what="connected through the proxy")
        session.enqueue_many([("result", topic, {"i": i, "pad": pad}) for i in range(100)])
        wait_for(lambda: collector.seen() >= set(range(1, 101)) and outbox.stats().depth == 0, what="first 100")

        proxy.blackhole(True)  # the path goes silent: publishes leave the device but never arrive
        session.enqueue_many([("result", topic, {"i": i, "pad": pad}) for i in range(100, 200)])
        wait_for(lambda: proxy.dropped_bytes >= 50 * 200, what="a full window in flight into the void")
        proxy.cut()
        proxy.blackhole(False)
        wait_for(lambda: proxy.connections >= 2 and session.connected, what="reconnected")
        marker = session.enqueue("result", topic, {"marker": True})
        wait_for(lambda: marker in collector.seen() and outbox.stats().depth == 0, timeout=20, what="the marker")
        with collector.lock:
            arrivals = list(collector.arrivals)
        assert_first_arrivals_in_order(arrivals)
        assert arrivals == list(range(1, marker + 1)), "each message exactly once: only the outbox replayed"
        assert session.stats()["last_error_code"] == "connection_lost"
    finally:
        session.stop()
        outbox.close()
        proxy.close()
        collector.close()


def test_only_the_net_thread_writes_to_the_socket(tmp_path, broker):
    """paho's packet writer has no lock, and a publish from another thread writes by itself unless an external
    write hook is set: two writers put seq N+1 on the wire before N (seen once in a 6,000-result run), or
    interleave packet bytes after a partial write. The sender, command responses and the birth all publish
    from other threads; only ``mqtt-net`` may write."""
    outbox = Outbox(tmp_path / "outbox.db")
    session = DeviceSession(LinkSettings(device_id="dev-1", broker=BrokerSettings(url=broker.url)), outbox)
    writers: set[str] = set()
    send = session.client._sock_send  # paho's one write path (private: this test pins the contract)

    def recording(buf):
        writers.add(threading.current_thread().name)
        return send(buf)

    session.client._sock_send = recording  # type: ignore[method-assign]
    session.start()
    try:
        wait_for(lambda: session.connected, what="connected")
        topic = session.topics.results("cam")
        for i in range(20):
            session.enqueue_many([("result", topic, {"i": i, "j": j}) for j in range(100)])
            session.publish_now(session.topics.responses, {"id": f"r{i}", "ok": True})  # this (main) thread
            session.set_birth({"i": i})
        wait_for(lambda: outbox.stats().depth == 0, timeout=20, what="all acknowledged")
        assert writers == {"mqtt-net"}
    finally:
        session.stop()
        outbox.close()


@pytest.mark.timeout(240)
def test_results_arrive_in_seq_order_across_broker_restarts(tmp_path, small_models):
    broker = make_broker(tmp_path / "mq", persistence=True)
    broker.start()
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/results/#", persistent=True)
    agent = start_daemon(tmp_path / "agent", "--models-dir", str(small_models),
                         env=agent_env(broker.url, "dev-1", EDGE_AGENT_MQTT__PUBLISH_WINDOW="200"))
    sent: list[int] = []
    try:
        wait_for(lambda: agent.client.status()["link"]["connected"], what="connected")
        for round_ in range(4):
            for i in range(1500):
                status, _, body = agent.client.request("POST", "/v1/agent/results/cam",
                                                       orjson.dumps({"round": round_, "i": i}))
                assert status == 202, body
                sent.append(orjson.loads(body)["seq"])
            broker.restart()  # while the replay of this round is in flight
        wait_for(lambda: collector.seen() >= set(sent), timeout=120, what="every result delivered")
        with collector.lock:
            arrivals = list(collector.arrivals)
        assert_first_arrivals_in_order(arrivals)
        assert agent.client.status()["link"]["reconnects"] >= 2, "the replay really crossed outages"
    finally:
        collector.close()
        agent.stop()
        broker.stop()


# -- item 13: refused publishes ------------------------------------------------------------------------------
DENY_ACL = """\
topic readwrite edge/v1/#
topic deny edge/v1/devices/dev-1/results/denied
"""


def test_refused_publish_is_kept_retried_then_dead_lettered(tmp_path, small_models):
    broker = make_broker(tmp_path / "mq", acl=DENY_ACL)
    broker.start()
    collector = Collector(broker.host, broker.port, "edge/v1/devices/dev-1/#")
    agent = start_daemon(tmp_path / "agent", "--models-dir", str(small_models),
                         env=agent_env(broker.url, "dev-1", EDGE_AGENT_MQTT__REFUSED_MAX_ATTEMPTS="3",
                                       EDGE_AGENT_MQTT__REFUSED_BACKOFF_S="0.2",
                                       EDGE_AGENT_MQTT__TELEMETRY_INTERVAL_S="1"))
    try:
        wait_for(lambda: agent.client.status()["link"]["connected"], what="connected")
        status, _, body = agent.client.request("POST", "/v1/agent/results/denied", b'{"x": 1}')
        assert status == 202
        denied = orjson.loads(body)["seq"]
        status, _, body = agent.client.request("POST", "/v1/agent/results/cam", b'{"x": 2}')
        allowed = orjson.loads(body)["seq"]
        wait_for(lambda: allowed in collector.seen(), what="a later, allowed result is not held up")

        def dead_letter_event() -> dict | None:
            with collector.lock:
                return next((p for p in collector.payloads if p.get("type") == "outbox.dead_lettered"), None)

        event = wait_for(dead_letter_event, timeout=30, what="the dead-letter event")
        assert event["message_seq"] == denied and event["attempts"] == 3
        assert event["reason"] == "Not authorized" and event["topic"] == "edge/v1/devices/dev-1/results/denied"
        assert denied not in collector.seen()
        outbox = agent.client.status()["outbox"]
        assert outbox["dead_lettered"] == 1 and outbox["dead_letters"] == 1  # (depth: telemetry comes and goes)
        assert agent.client.status()["link"]["publishes_refused"] == 3

        def telemetry_counter() -> bool:
            with collector.lock:
                return any(p["topic"].endswith("/telemetry") and p["outbox"]["dead_lettered"] == 1
                           for p in collector.payloads)

        wait_for(telemetry_counter, what="the counter in telemetry")
        refusals = [line for line in log_events(agent, "mqtt.publish_refused") if line.get("seq") == denied]
        assert [r["attempts"] for r in refusals] == [1, 2], "kept and retried before giving up"
        assert refusals[0]["retry_in_s"] < refusals[1]["retry_in_s"], "with backoff"
    finally:
        collector.close()
        agent.stop()
        broker.stop()


# -- item 12: TLS and authentication failures are visible ------------------------------------------------------
def wait_for_link_error(agent: Daemon, code: str) -> dict:
    return wait_for(lambda: (link := agent.client.status()["link"]) and link["last_error_code"] == code and link,
                    timeout=15, what=f"link.last_error_code {code}")


def test_client_certificate_from_another_ca_is_reported(tmp_path, small_models, tls_broker):
    cert, key = TlsFiles.create(tmp_path / "rogue-pki").client("dev-a")
    agent = start_daemon(tmp_path / "dev-a", "--models-dir", str(small_models),
                         env=agent_env(tls_broker.url, "dev-a", EDGE_AGENT_MQTT__CA_FILE=str(tls_broker.tls.ca),
                                       EDGE_AGENT_MQTT__CERT_FILE=str(cert), EDGE_AGENT_MQTT__KEY_FILE=str(key)))
    try:
        link = wait_for_link_error(agent, "tls_failed")
        # The broker's alert names the reason; when it closes first, the client sees the TLS session end
        # before the CONNACK, and the message says what that usually means.
        assert link["connected"] is False and ("unknown ca" in link["last_error"].lower()
                                               or "rejected this client's certificate" in link["last_error"])
        assert link["connect_failures"] >= 1 and link["last_error_at"] > 0
        assert set(link["connect_errors"]) == {"tls_failed"}
        failed = wait_for(lambda: log_events(agent, "mqtt.connect_failed"), what="the log line")
        assert {f["code"] for f in failed} == {"tls_failed"} and "TLS" in failed[0]["reason"]
        assert any("unknown ca" in f["reason"].lower() for f in wait_for(
            lambda: [f for f in log_events(agent, "mqtt.connect_failed") if "unknown ca" in f["reason"].lower()],
            what="an attempt that received the broker's alert"))
        assert agent.client.request("GET", "/v2/health/live")[0] == 200
    finally:
        assert agent.stop() == 0


def test_untrusted_broker_certificate_is_reported(tmp_path, small_models, tls_broker):
    cert, key = tls_broker.tls.client("dev-a")
    rogue_ca = TlsFiles.create(tmp_path / "rogue-pki").ca
    agent = start_daemon(tmp_path / "dev-a", "--models-dir", str(small_models),
                         env=agent_env(tls_broker.url, "dev-a", EDGE_AGENT_MQTT__CA_FILE=str(rogue_ca),
                                       EDGE_AGENT_MQTT__CERT_FILE=str(cert), EDGE_AGENT_MQTT__KEY_FILE=str(key)))
    try:
        link = wait_for_link_error(agent, "tls_failed")
        assert "certificate verify failed" in link["last_error"]
        assert log_events(agent, "mqtt.connect_failed")[0]["code"] == "tls_failed"
    finally:
        assert agent.stop() == 0


@pytest.mark.parametrize("credentials", [{"EDGE_AGENT_MQTT__USERNAME": "dev-1", "EDGE_AGENT_MQTT__PASSWORD": '"wrong"'},
                                         {}], ids=["wrong-password", "anonymous"])
def test_refused_connect_is_reported_and_in_telemetry_after_reconnecting(tmp_path, small_models, credentials):
    broker = make_broker(tmp_path / "mq", passwords={"console": "console-pw"})
    broker.start()
    agent = start_daemon(tmp_path / "dev-1", "--models-dir", str(small_models),
                         env=agent_env(broker.url, "dev-1", EDGE_AGENT_MQTT__TELEMETRY_INTERVAL_S="1", **credentials))
    try:
        link = wait_for_link_error(agent, "not_authorized")
        assert link["connected"] is False and "Not authorized" in link["last_error"]
        failed = wait_for(lambda: log_events(agent, "mqtt.connect_failed"), what="the log line")
        assert failed[0]["code"] == "not_authorized" and "Not authorized" in failed[0]["reason"]

        # The operator fixes the broker (a reload, no restart); the device connects and tells the fleet what
        # had been wrong.
        if credentials:
            broker.set_passwords({"console": "console-pw", "dev-1": "wrong"})
        else:
            broker.config.write_text(broker.config.read_text().replace("allow_anonymous false",
                                                                       "allow_anonymous true"))
        broker.reload()
        with FleetClient(BrokerSettings(url=broker.url, username="console", password="console-pw")) as fleet:
            fleet.subscribe(["edge/v1/devices/dev-1/telemetry", "edge/v1/devices/dev-1/events"])
            telemetry = restored = None
            for msg in fleet.messages(15):
                body = json.loads(msg.payload)
                if msg.topic.endswith("/telemetry") and body["link"]["connected"]:
                    telemetry = body
                if msg.topic.endswith("/events") and body.get("type") == "link.restored":
                    restored = body
                if telemetry and restored:
                    break
        assert telemetry is not None and restored is not None, "telemetry and an event after reconnecting"
        assert telemetry["link"]["last_error_code"] == "not_authorized"
        assert "Not authorized" in telemetry["link"]["last_error"]
        assert telemetry["link"]["connect_errors"] == {"not_authorized": telemetry["link"]["connect_failures"]}
        assert restored["errors"] == {"not_authorized": restored["failed_attempts"]}
        assert restored["last_error"]["code"] == "not_authorized"
    finally:
        agent.stop()
        broker.stop()


def test_failure_reasons_are_classified():
    assert refusal_error(ReasonCode(PacketTypes.CONNACK, "Not authorized")).code == "not_authorized"
    assert refusal_error(ReasonCode(PacketTypes.CONNACK, "Bad user name or password")).code == "bad_credentials"
    assert refusal_error(ReasonCode(PacketTypes.CONNACK, "Server unavailable")).code == "connect_refused"
    assert connect_error(ConnectionRefusedError(111, "Connection refused")).code == "unreachable"
    import ssl

    assert connect_error(ssl.SSLCertVerificationError("certificate verify failed")).code == "tls_failed"
    tls = lost_error("failed to receive on socket: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "x",
                     before_connack=True)
    assert tls.code == "tls_failed" and "unknown ca" in tls.reason
    assert lost_error(None, "Unspecified error", before_connack=False).code == "connection_lost"
    assert lost_error(None, "Unspecified error", before_connack=True).code == "unreachable"
    reset = lost_error("failed to receive on socket: [Errno 104] Connection reset by peer", "x", before_connack=True,
                       over_tls=True)
    assert reset.code == "tls_failed" and "rejected this client's certificate" in reset.reason
    assert lost_error("[Errno 104] Connection reset by peer", "x", before_connack=False, over_tls=True).code \
        == "connection_lost"


def test_session_never_raises_on_sigkilled_broker(tmp_path):
    """The sender survives a broker killed mid-replay; the session reports the loss and reconnects."""
    broker = make_broker(tmp_path / "mq")
    broker.start()
    outbox = Outbox(tmp_path / "outbox.db")
    session = DeviceSession(LinkSettings(device_id="dev-1", broker=BrokerSettings(
        url=broker.url, backoff_min_s=0.05, backoff_max_s=0.2)), outbox)
    session.start()
    try:
        wait_for(lambda: session.connected, what="connected")
        session.enqueue_many([("result", session.topics.results("cam"), {"i": i}) for i in range(3000)])
        broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        broker.proc.wait(5)  # type: ignore[union-attr]
        broker.proc = None
        wait_for(lambda: not session.connected, what="disconnected")
        broker.start()
        wait_for(lambda: outbox.stats().depth == 0, timeout=30, what="the outbox drained after the restart")
        assert session.reconnects >= 1 and all(t.is_alive() for t in session._threads)
    finally:
        session.stop()
        outbox.close()
        broker.stop()
