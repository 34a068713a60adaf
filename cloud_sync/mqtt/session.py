"""The device's MQTT session: connection with backoff and jitter, birth/Last Will, command
subscriptions, and the outbox sender that deletes a message only on its PUBACK.

paho-mqtt blocks, so by default it runs on two threads of ours: ``mqtt-net`` drives the
client (connect, ``loop``, reconnect) and ``mqtt-outbox`` replays the outbox in order with
a bounded window of QoS 1 messages in flight. Everything else talks to it through
thread-safe methods; incoming messages are handed to ``on_message`` on the net thread.

Many sessions in one process (the fleet simulator) can instead share one
:class:`~cloud_sync.mqtt.hub.SessionHub` thread, which runs the same connect/backoff and
sender steps for all of them; a real device keeps its own two threads.
"""

from __future__ import annotations

import collections
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.mqtt.topics import Topics
from cloud_sync.outbox import Kind, Outbox

log = structlog.get_logger(__name__)


class Driver(Protocol):
    """Drives many sessions' paho clients from one thread (``cloud_sync.mqtt.hub.SessionHub``)."""

    def attach(self, session: DeviceSession) -> None: ...

    def detach(self, session: DeviceSession, timeout: float = 5.0) -> None: ...

    def wake(self, session: DeviceSession) -> None:
        """The session has something to send."""


@dataclass(frozen=True)
class IncomingMessage:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None


def make_client(broker: BrokerSettings, client_id: str) -> mqtt.Client:
    """A configured, unconnected paho client (TLS, credentials, protocol)."""
    broker.validate()
    v5 = broker.protocol == "5"
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True,
                         reconnect_on_failure=False)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=broker.ca_file, certfile=broker.cert_file, keyfile=broker.key_file,
                       cert_reqs=ssl.CERT_REQUIRED)
    return client


def connect(client: mqtt.Client, broker: BrokerSettings) -> None:
    """Blocking TCP/TLS connect and CONNECT; the CONNACK arrives through ``loop``."""
    if broker.protocol == "5":
        client.connect(broker.host, broker.port, broker.keepalive_s, clean_start=True)
    else:
        client.connect(broker.host, broker.port, broker.keepalive_s)


def backoff(delay: float, broker: BrokerSettings) -> float:
    """Equal jitter: half the delay fixed, half random, so a fleet does not reconnect in step."""
    return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not cryptography


IDLE_WAIT_S = 0.5  # the sender's longest nap: nothing to send, or not connected


@dataclass
class SenderState:
    """The outbox sender's position, kept between rounds of :meth:`DeviceSession.pump`."""

    generation: int = 0
    last_sent: int = 0
    acked: list[int] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)


class DeviceSession:
    def __init__(self, settings: LinkSettings, outbox: Outbox,
                 on_message: Callable[[IncomingMessage], None] | None = None, *,
                 hub: Driver | None = None) -> None:
        """``hub``: share one driver thread with other sessions instead of starting two threads."""
        self.settings = settings
        self.broker = settings.broker
        self.topics = Topics(settings.prefix, settings.device_id)
        self.outbox = outbox
        self.on_message = on_message or (lambda _m: None)
        self._client = make_client(self.broker, settings.broker.client_id or settings.device_id)
        will = orjson.dumps({"online": False, "device_id": settings.device_id})
        self._client.will_set(self.topics.state, will, qos=1, retain=True)
        self._client.max_inflight_messages_set(max(settings.publish_window, 1))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._birth: dict[str, Any] = {"device_id": settings.device_id}
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._acks: collections.deque[int] = collections.deque()
        self._inflight: dict[int, int] = {}  # mid -> outbox seq, touched by the sender thread only
        self._generation = 0  # bumped on every disconnect so the sender restarts from the oldest
        self._hub = hub
        self.reconnects = 0
        self.connected_at: float | None = None
        self.last_error: str | None = None
        self._threads = [threading.Thread(target=self._net, name="mqtt-net", daemon=True),
                         threading.Thread(target=self._send, name="mqtt-outbox", daemon=True)]

    # -- public, thread-safe -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def client(self) -> mqtt.Client:
        """The paho client, for a :class:`SessionHub` that drives it."""
        return self._client

    def start(self) -> None:
        """Returns at once; the session keeps trying to connect in the background."""
        if self._hub is not None:
            self._hub.attach(self)
            return
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Retained offline state (so the Last Will is not needed), DISCONNECT, join the threads."""
        if self.connected:
            payload = orjson.dumps({"online": False, "device_id": self.settings.device_id,
                                    "reason": "shutdown", "ts": time.time()})
            info = self._client.publish(self.topics.state, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("mqtt.offline_not_sent", reason=str(exc))
        self._stop.set()
        self._notify()
        self._client.disconnect()
        if self._hub is not None:
            self._hub.detach(self, timeout)
            return
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def set_birth(self, state: Mapping[str, Any]) -> None:
        """Remember the birth state and publish it (retained) now if connected, else on connect."""
        self._birth = {"device_id": self.settings.device_id, **state}
        if self.connected:
            self._publish_birth()

    def enqueue(self, kind: Kind, topic: str, payload: Mapping[str, Any]) -> int:
        """Persist a device-originated message in the outbox; the sender delivers it."""
        seq = self.outbox.put(kind, topic, payload)
        self._notify()
        return seq

    def enqueue_many(self, items: Iterable[tuple[Kind, str, Mapping[str, Any]]]) -> list[int]:
        """Persist several ``(kind, topic, payload)`` messages in one outbox transaction."""
        seqs = self.outbox.put_many(items)
        self._notify()
        return seqs

    def publish_now(self, topic: str, payload: Mapping[str, Any], *, correlation: bytes | None = None) -> bool:
        """Direct QoS 1 publish (command responses); False when not connected."""
        properties = None
        if correlation is not None and self.broker.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        info = self._client.publish(topic, orjson.dumps(payload), qos=1, properties=properties)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "reconnects": self.reconnects, "connected_at": self.connected_at,
                "last_error": self.last_error, "broker": self.broker.url}

    # -- paho callbacks (net thread) -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.last_error = f"connection refused: {reason}"
            log.warning("mqtt.refused", reason=str(reason), broker=self.broker.url)
            return
        topics = [(self.topics.commands, 1)] + [(self.topics.group_commands(g), 1) for g in self.settings.groups]
        client.subscribe(topics)
        self._publish_birth()
        self.connected_at = time.time()
        self.last_error = None
        self._connected.set()
        self._notify()
        log.info("mqtt.connected", broker=self.broker.url, reconnects=self.reconnects)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._generation += 1
        self._notify()
        if was and not self._stop.is_set():
            self.reconnects += 1
            self.last_error = f"disconnected: {reason}"
            log.warning("mqtt.disconnected", reason=str(reason))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            self.on_message(IncomingMessage(msg.topic, bytes(msg.payload), response_topic, correlation))
        except Exception:
            log.exception("mqtt.on_message_failed", topic=msg.topic)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._acks.append(mid)
        self._notify()

    def _notify(self) -> None:
        """The sender has something to look at (new message, PUBACK, connection change)."""
        self._wake.set()
        if self._hub is not None:
            self._hub.wake(self)

    def _publish_birth(self) -> None:
        payload = orjson.dumps({**self._birth, "online": True, "ts": time.time()}, option=orjson.OPT_SERIALIZE_NUMPY)
        self._client.publish(self.topics.state, payload, qos=1, retain=True)

    # -- threads ---------------------------------------------------------------------------------------
    def _net(self) -> None:
        delay = self.broker.backoff_min_s
        while not self._stop.is_set():
            try:
                connect(self._client, self.broker)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"connect failed: {exc}"
                log.warning("mqtt.connect_failed", broker=self.broker.url, error=str(exc), retry_in_s=round(delay, 2))
                self._stop.wait(backoff(delay, self.broker))
                delay = min(delay * 2, self.broker.backoff_max_s)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if self._connected.is_set():
                    delay = self.broker.backoff_min_s
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            self.connection_lost()  # loop ended without paho noticing: make it consistent
            if not self._stop.is_set():
                self._stop.wait(backoff(delay, self.broker))
                delay = min(delay * 2, self.broker.backoff_max_s)
        # let a final DISCONNECT or the offline message go out
        for _ in range(10):
            if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    def _send(self) -> None:
        state = SenderState(generation=self._generation)
        while not self._stop.is_set():
            self._wake.clear()  # cleared before looking, so a wake-up during the checks is not lost
            wait = self.pump(state)
            if wait <= 0:
                continue
            if self._connected.is_set():
                self._wake.wait(wait)
            else:
                self._connected.wait(wait)
        self.flush_acks(state)

    # -- the sender's steps, shared by the ``mqtt-outbox`` thread and a SessionHub ------------------
    def pump(self, state: SenderState) -> float:
        """One round of the outbox sender: settle PUBACKs, publish what the window allows.

        Returns how long to wait for a wake-up before the next round (0: go on at once).
        Only one thread may pump a session (it owns ``_inflight``).
        """
        if state.generation != self._generation or not self._connected.is_set():
            # Reconnect: whatever was in flight is resent from the outbox (receivers dedupe by seq).
            self._inflight.clear()
            self._acks.clear()
            state.last_sent, state.generation = 0, self._generation
            if not self._connected.is_set():
                return IDLE_WAIT_S
        while self._acks:
            seq = self._inflight.pop(self._acks.popleft(), None)
            if seq is not None:
                state.acked.append(seq)
        now = time.monotonic()
        if state.acked and (len(state.acked) >= 256 or now - state.last_flush > 0.05 or not self._inflight):
            self.flush_acks(state)
            state.last_flush = now
        room = max(self.settings.publish_window, 1) - len(self._inflight)
        if room <= 0:
            return 0.05
        batch = self.outbox.pending(after_seq=state.last_sent, limit=min(room, 500))
        if not batch:
            return 0.05 if state.acked or self._inflight else IDLE_WAIT_S
        for message in batch:
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = message.seq
            state.last_sent = message.seq
        return 0.0

    def flush_acks(self, state: SenderState) -> None:
        """Delete acknowledged messages from the outbox."""
        if state.acked:
            self.outbox.ack(state.acked)
            state.acked.clear()

    def connection_lost(self) -> None:
        """The driver's loop ended without paho noticing: make the state consistent."""
        if self._connected.is_set():
            self._on_disconnect(self._client, None, None, "connection lost", None)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()
