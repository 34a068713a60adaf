"""The device's MQTT session: connection with backoff and jitter, birth/Last Will, command
subscriptions, and the outbox sender that deletes a message only on its successful PUBACK.

paho-mqtt blocks, so by default it runs on two threads of ours: ``mqtt-net`` drives the
client (connect, ``loop``, reconnect) and ``mqtt-outbox`` replays the outbox in order with
a bounded window of QoS 1 messages in flight. Everything else talks to it through
thread-safe methods; incoming messages are handed to ``on_message`` on the net thread.

Many sessions in one process (the fleet simulator) can instead share one
:class:`~cloud_sync.mqtt.hub.SessionHub` thread, which runs the same connect/backoff and
sender steps for all of them; a real device keeps its own two threads.

Four rules keep delivery ordered and honest:

* **One thread writes to the socket.** paho's ``publish`` from any other thread would write
  the packet itself unless an external write hook is set, and paho's packet writer has no
  lock: two threads writing at once can put seq 194 on the wire before 193, interleave the
  bytes of two packets after a partial write, or drive one TLS connection from two threads.
  The session sets the hook, so a publish only queues the packet and wakes the ``mqtt-net``
  thread's ``select``, and that thread alone writes (a :class:`SessionHub` is its sessions'
  only writer the same way).
* **The outbox is the only source of replay.** paho would resend, at the next CONNACK, every
  QoS 1 message it still holds (in flight without a PUBACK, or published while the link was
  down), interleaved with our replay. Before each connect those copies are dropped
  (:func:`connect`), paho's own in-flight limit is off (our ``publish_window`` is the only
  one), and a publish is made only while its generation (one per connection) is current,
  under the lock that the connect step takes to drop paho's copies: a sender round that
  started before a reconnect can never put a newer message on the new connection ahead of
  the replay.
* **A refused publish is not delivered.** Under MQTT 5 a PUBACK can carry a failure reason
  code (``Not authorized`` for an ACL denial). Such a message stays in the outbox, is retried
  with backoff, and after ``refused_max_attempts`` moves to the outbox's dead letters
  (``on_dead_letter`` is told).
* **A failed connect says why.** A refusal in the CONNACK, a TLS handshake the broker
  rejected (paho only logs that one), an unreachable broker: each becomes a
  :class:`~cloud_sync.errors.ConnectError` in ``stats()``, a ``mqtt.connect_failed`` log
  line with the reason, and is kept after the next connect so telemetry reports it.
"""

from __future__ import annotations

import collections
import logging
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

from cloud_sync.errors import ConnectError
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.mqtt.topics import Topics
from cloud_sync.outbox import DeadLetter, Kind, Outbox, OutboxMessage

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
    # The sender's publish_window is the only in-flight limit: with paho's own limit, paho would queue
    # messages itself and send them on its own schedule.
    client.max_inflight_messages_set(0)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=broker.ca_file, certfile=broker.cert_file, keyfile=broker.key_file,
                       cert_reqs=ssl.CERT_REQUIRED)
    return client


def connect(client: mqtt.Client, broker: BrokerSettings) -> None:
    """Blocking TCP/TLS connect and CONNECT; the CONNACK arrives through ``loop``.

    Whatever paho still holds from the previous connection is dropped first: the outbox
    replays those messages, in order, and paho resending its own copies at the CONNACK
    would interleave with that replay. (A clean start also means the broker keeps no
    session state for us: the outbox is the whole story.)
    """
    client.drop_out_messages()
    if broker.protocol == "5":
        client.connect(broker.host, broker.port, broker.keepalive_s, clean_start=True)
    else:
        client.connect(broker.host, broker.port, broker.keepalive_s)


def backoff(delay: float, broker: BrokerSettings) -> float:
    """Equal jitter: half the delay fixed, half random, so a fleet does not reconnect in step."""
    return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not cryptography


def connect_error(exc: BaseException) -> ConnectError:
    """What a failed connect step (TCP, TLS handshake, DNS) means for an operator."""
    if isinstance(exc, ssl.SSLError):
        return ConnectError("tls_failed", f"TLS handshake failed: {exc}")
    return ConnectError("unreachable", f"cannot connect: {exc}")


def refusal_error(reason: Any) -> ConnectError:
    """A CONNACK with a failure reason code (MQTT 5) or return code (3.1.1)."""
    text = str(reason)
    lowered = text.lower()
    if "not authori" in lowered:
        code = "not_authorized"
    elif "user name or password" in lowered or "username or password" in lowered:
        code = "bad_credentials"
    else:
        code = "connect_refused"
    return ConnectError(code, f"connection refused by the broker: {text}")


def lost_error(transport: str | None, reason: Any, *, before_connack: bool, tls: bool = False,
               over_tls: bool = False) -> ConnectError:
    """The connection ended: paho's transport error (a TLS alert, a reset) says more than its reason code.

    ``tls``: that error was an ``ssl.SSLError``; ``over_tls``: the connection was TLS. With TLS 1.3
    the client's side of the handshake completes before the broker has checked the client's
    certificate, so a broker that rejects it ends the session just after: with an alert
    ("unknown ca", "certificate required"), or, in a race, a bare EOF or reset. Both come
    before the CONNACK.
    """
    detail = transport or str(reason)
    ssl_error = tls or (transport is not None and ("SSL" in transport or "_ssl.c" in transport))
    if before_connack and (ssl_error or over_tls):
        return ConnectError("tls_failed", f"TLS session ended before the CONNACK (the broker may have rejected "
                                          f"this client's certificate): {detail}")
    if ssl_error:
        return ConnectError("tls_failed", f"TLS failed: {detail}")
    if before_connack:
        return ConnectError("unreachable", f"connection closed before the CONNACK: {transport or reason}")
    return ConnectError("connection_lost", f"disconnected: {transport or reason}")


class _TransportErrors(logging.Handler):
    """paho reports why a socket failed (a TLS alert from the broker, a reset) only in its log."""

    def __init__(self, session: DeviceSession) -> None:
        super().__init__(logging.ERROR)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        self.session._transport_error = record.getMessage()[:300]
        self.session._transport_tls = isinstance(cause, ssl.SSLError)


def _error_logger(session: DeviceSession, client_id: str) -> logging.Logger:
    # A logger of its own, outside the logging hierarchy: error records only, nothing propagates.
    logger = logging.Logger(f"paho.{client_id}", logging.ERROR)
    logger.propagate = False
    logger.addHandler(_TransportErrors(session))
    return logger


def _net_thread_writes(_client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
    """paho's external-write hook: nothing to do, the net thread's ``loop`` selects for writing itself."""


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
                 hub: Driver | None = None,
                 on_dead_letter: Callable[[DeadLetter], None] | None = None,
                 on_connected: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``hub``: share one driver thread with other sessions instead of starting two threads.

        ``on_dead_letter`` is called (on the sender's thread) for each message moved to the
        outbox's dead letters; ``on_connected`` (on the net thread) after a connect that
        followed failures or a lost connection, with a summary of the outage.
        """
        self.settings = settings
        self.broker = settings.broker
        self.topics = Topics(settings.prefix, settings.device_id)
        self.outbox = outbox
        self.on_message = on_message or (lambda _m: None)
        self.on_dead_letter = on_dead_letter or (lambda _d: None)
        self.on_connected = on_connected
        client_id = settings.broker.client_id or settings.device_id
        self._client = make_client(self.broker, client_id)
        self._client.enable_logger(_error_logger(self, client_id))
        will = orjson.dumps({"online": False, "device_id": settings.device_id})
        self._client.will_set(self.topics.state, will, qos=1, retain=True)
        if hub is None:
            # Publishes from other threads only queue and wake mqtt-net's select (see the module docstring).
            self._client.on_socket_register_write = _net_thread_writes
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._birth: dict[str, Any] = {"device_id": settings.device_id}
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._wake = threading.Event()
        # Sender publishes vs. the connect step that drops paho's copies (see the module docstring).
        self._lock = threading.RLock()
        self._acks: collections.deque[tuple[int, str | None]] = collections.deque()  # (mid, refusal reason)
        self._inflight: dict[int, int] = {}  # mid -> outbox seq, touched by the pumping thread only
        self._retry: dict[int, float] = {}  # refused seq -> monotonic time it may be sent again (pumping thread)
        self._generation = 0  # bumped on every disconnect so the sender restarts from the oldest
        self._hub = hub
        self._attempt_open = False  # a connect is under way and has no CONNACK yet
        self._transport_error: str | None = None  # paho's last error log line in this attempt
        self._transport_tls = False  # ... and it was an ssl.SSLError
        self._failures_since_connect: collections.Counter[str] = collections.Counter()  # code -> count
        self._offline_since = time.monotonic()
        self._ever_connected = False
        self.reconnects = 0
        self.connect_failures = 0
        self.connect_errors: collections.Counter[str] = collections.Counter()  # code -> count, since start
        self.publishes_refused = 0
        self.connected_at: float | None = None
        self.error: ConnectError | None = None  # the last connect failure or disconnect; kept after reconnecting
        self.error_at: float | None = None
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

    @property
    def last_error(self) -> str | None:
        error = self.error
        return error.reason if error is not None else None

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
        error = self.error
        return {"connected": self.connected, "reconnects": self.reconnects, "connected_at": self.connected_at,
                "last_error": error.reason if error else None, "last_error_code": error.code if error else None,
                "last_error_at": self.error_at, "connect_failures": self.connect_failures,
                "connect_errors": dict(self.connect_errors),
                "publishes_refused": self.publishes_refused, "retrying": len(self._retry), "broker": self.broker.url}

    # -- connection attempts (the net thread, or a SessionHub's connector and hub threads) --------------
    def connect_once(self) -> None:
        """One blocking connect step; the outcome arrives as a CONNACK (or a failure) through the loop.

        Raises:
            OSError, ssl.SSLError, ValueError: the TCP/TLS connect failed (then call :meth:`connect_failed`).
        """
        self._transport_error, self._transport_tls = None, False
        self._attempt_open = True
        with self._lock:
            # The generation was bumped when the last connection ended, so once the lock is ours no sender
            # publish of that generation can follow the drop; a publish already under way has finished.
            self._client.drop_out_messages()
        connect(self._client, self.broker)

    def connect_failed(self, exc: BaseException) -> None:
        """The connect step raised: record and log why."""
        self._attempt_failed(connect_error(exc))

    def connection_lost(self) -> None:
        """The driver's loop ended without paho noticing: make the state consistent."""
        if self._connected.is_set():
            self._on_disconnect(self._client, None, None, "connection lost", None)
        elif self._attempt_open and not self._stop.is_set():
            self._attempt_failed(lost_error(self._transport_error, "connection lost", before_connack=True,
                                             tls=self._transport_tls, over_tls=self.broker.tls))

    def _attempt_failed(self, error: ConnectError) -> None:
        self._attempt_open = False
        self.connect_failures += 1
        self.connect_errors[error.code] += 1
        self._failures_since_connect[error.code] += 1
        self._set_error(error)
        level = log.warning if self._hub is None else log.debug  # a simulated fleet would flood the log
        level("mqtt.connect_failed", broker=self.broker.url, code=error.code, reason=error.reason,
              failures=self._failures_since_connect.total())

    def _set_error(self, error: ConnectError) -> None:
        self.error, self.error_at = error, time.time()

    # -- paho callbacks (net thread) -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._attempt_failed(refusal_error(reason))
            return
        self._attempt_open = False
        topics = [(self.topics.commands, 1)] + [(self.topics.group_commands(g), 1) for g in self.settings.groups]
        client.subscribe(topics)
        self._publish_birth()
        self.connected_at = time.time()
        outage = None
        if self._failures_since_connect or self._ever_connected:
            error = self.error
            outage = {"failed_attempts": self._failures_since_connect.total(),
                      "errors": dict(self._failures_since_connect),
                      "offline_s": round(time.monotonic() - self._offline_since, 3),
                      "last_error": {"code": error.code, "message": error.reason, "at": self.error_at}
                      if error else None}
        self._failures_since_connect.clear()
        self._ever_connected = True
        self._connected.set()
        self._notify()
        log.info("mqtt.connected", broker=self.broker.url, reconnects=self.reconnects)
        if outage is not None and self.on_connected is not None:
            try:
                self.on_connected(outage)
            except Exception:
                log.exception("mqtt.on_connected_failed")

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._generation += 1
        self._notify()
        if self._stop.is_set():
            return
        if was:
            self.reconnects += 1
            self._offline_since = time.monotonic()
            error = lost_error(self._transport_error, reason, before_connack=False, tls=self._transport_tls)
            self._set_error(error)
            log.warning("mqtt.disconnected", code=error.code, reason=error.reason)
        elif self._attempt_open:
            self._attempt_failed(lost_error(self._transport_error, reason, before_connack=True,
                                            tls=self._transport_tls, over_tls=self.broker.tls))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            self.on_message(IncomingMessage(msg.topic, bytes(msg.payload), response_topic, correlation))
        except Exception:
            log.exception("mqtt.on_message_failed", topic=msg.topic)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        # MQTT 5: a PUBACK reason code >= 0x80 is a refusal (e.g. 0x87 Not authorized by the ACL), not a delivery.
        refused = str(reason) if getattr(reason, "is_failure", False) else None
        self._acks.append((mid, refused))
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
                self.connect_once()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.connect_failed(exc)
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
            try:
                wait = self.pump(state)
            except Exception:  # an outbox that fails must not silently end delivery for good
                log.exception("mqtt.sender_failed")
                wait = IDLE_WAIT_S * 4
            if wait <= 0:
                continue
            if self._connected.is_set():
                self._wake.wait(wait)
            else:
                self._connected.wait(wait)
        try:
            self.flush_acks(state)
        except Exception:
            log.exception("mqtt.sender_failed")

    # -- the sender's steps, shared by the ``mqtt-outbox`` thread and a SessionHub ------------------
    def pump(self, state: SenderState) -> float:
        """One round of the outbox sender: settle PUBACKs, publish what the window allows.

        Returns how long to wait for a wake-up before the next round (0: go on at once).
        Only one thread may pump a session (it owns ``_inflight`` and ``_retry``).
        """
        generation, connected = self._generation, self._connected.is_set()
        if state.generation != generation or not connected:
            # Reconnect: settle what the old connection acknowledged, then replay the rest from the outbox
            # (receivers dedupe by seq).
            self._settle(state)
            self._inflight.clear()
            self.flush_acks(state)
            state.last_sent, state.generation = 0, generation
            if not connected:
                return IDLE_WAIT_S
        self._settle(state)
        now = time.monotonic()
        if state.acked and (len(state.acked) >= 256 or now - state.last_flush > 0.05 or not self._inflight):
            self.flush_acks(state)
            state.last_flush = now
        room = max(self.settings.publish_window, 1) - len(self._inflight)
        if room <= 0:
            return 0.05
        if self._retry:
            due = sorted(seq for seq, at in self._retry.items() if at <= now)[:room]
            if due:
                found = self.outbox.get(due)
                for seq in set(due) - {m.seq for m in found}:
                    del self._retry[seq]  # acknowledged or dropped meanwhile
                for message in found:
                    if not self._publish(state, message):
                        return 0.05
                    del self._retry[message.seq]
                    room -= 1
                if room <= 0:
                    return 0.0
        batch = self.outbox.pending(after_seq=state.last_sent, limit=min(room, 500))
        if not batch:
            wait = 0.05 if state.acked or self._inflight else IDLE_WAIT_S
            if self._retry:
                wait = min(wait, max(min(self._retry.values()) - now, 0.01))
            return wait
        for message in batch:
            if message.seq in self._retry:  # refused: waits for its retry time
                state.last_sent = message.seq
                continue
            if not self._publish(state, message):
                return 0.05
            state.last_sent = message.seq
        return 0.0

    def _publish(self, state: SenderState, message: OutboxMessage) -> bool:
        """Publish one outbox message on the current connection; False if it is gone or paho refused."""
        with self._lock:
            if state.generation != self._generation or not self._connected.is_set():
                return False
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self._inflight[info.mid] = message.seq
        return True

    def _settle(self, state: SenderState) -> None:
        """Turn PUBACKs into acknowledged seqs, and refusals into retries or dead letters."""
        while self._acks:
            mid, refused = self._acks.popleft()
            seq = self._inflight.pop(mid, None)
            if seq is None:
                if refused is not None:  # a command response or the birth
                    log.warning("mqtt.publish_refused", reason=refused, outbox=False)
                continue
            if refused is None:
                state.acked.append(seq)
            else:
                self._refused(seq, refused)

    def _refused(self, seq: int, reason: str) -> None:
        self.publishes_refused += 1
        outcome = self.outbox.refuse(seq, reason, max_attempts=max(self.settings.refused_max_attempts, 1))
        if outcome.dead is not None:
            self._retry.pop(seq, None)
            try:
                self.on_dead_letter(outcome.dead)
            except Exception:
                log.exception("mqtt.on_dead_letter_failed", seq=seq)
        elif outcome.attempts:
            delay = min(self.settings.refused_backoff_s * 2 ** (outcome.attempts - 1), self.broker.backoff_max_s)
            self._retry[seq] = time.monotonic() + backoff(delay, self.broker)
            log.warning("mqtt.publish_refused", seq=seq, reason=reason, attempts=outcome.attempts,
                        retry_in_s=round(delay, 2))

    def flush_acks(self, state: SenderState) -> None:
        """Delete acknowledged messages from the outbox."""
        if state.acked:
            self.outbox.ack(state.acked)
            state.acked.clear()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()
