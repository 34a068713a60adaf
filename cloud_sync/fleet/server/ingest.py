"""MQTT ingestion: a shared MQTT 5 subscription with a persistent session, stored in batched transactions.

Two threads, because paho and the database driver block: ``fleet-mqtt`` drives the paho client
(connect with backoff, ``loop``) and only queues what arrives; ``fleet-ingest`` takes up to
``batch_max`` messages or ``batch_ms`` worth, parses them, stores them in one transaction and only
then acknowledges them (manual PUBACK, in arrival order). If the database is locked or down the
batch is retried with backoff and nothing is acknowledged: the broker stops sending once
``receive_maximum`` messages are unacknowledged and keeps the rest in this instance's session.

A message that breaks the contract (not JSON, too large, wrong types, a bad topic) is counted, logged
(rate-limited) and acknowledged without a row, so it cannot loop. A device over its flood budget
(``flood_rate``/``flood_burst``) has the excess dropped and counted the same way, which leaves a gap.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import sqlalchemy as sa
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.fleet.server.config import ServerSettings
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.messages import Record, Rejected, SeqRecord, Topics, parse
from cloud_sync.fleet.server.store import BatchOutcome, DeviceCounters, Store
from cloud_sync.mqtt.session import backoff, make_client

log = structlog.get_logger(__name__)

ResponseHook = Callable[[str, str, dict[str, Any]], None]
#: The database refused what we asked it to store (not the connection): find the message and reject it.
CONTENT_ERRORS = (sa.exc.DataError, sa.exc.IntegrityError, TypeError, ValueError)


@dataclass(frozen=True)
class _Incoming:
    generation: int  # connection it arrived on: a PUBACK is only valid on that connection
    mid: int
    qos: int
    topic: str
    payload: bytes


class _Limited:
    """At most one log line per ``key`` per ``interval`` seconds, with the count of those suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def __call__(self, key: str, event: str, **kw: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        log.warning(event, suppressed=self._suppressed.pop(key, 0), **kw)


class FloodLimiter:
    """A token bucket per device: ``rate`` messages/s sustained, ``burst`` at once (0 rate = off)."""

    def __init__(self, rate: float, burst: int, max_devices: int = 200_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_devices = max_devices
        self._buckets: dict[str, list[float]] = {}

    def allow(self, device_id: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:  # bound memory: forget full (idle) buckets
                self._buckets = {k: b for k, b in self._buckets.items()
                                 if b[0] + (now - b[1]) * self.rate < self.burst}
            bucket = self._buckets[device_id] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True


class Ingestor:
    """Owns the service's MQTT connection: ingestion, and publishing commands (``publish``)."""

    def __init__(self, settings: ServerSettings, db: Database, *, on_response: ResponseHook | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.cfg = settings.ingest
        self.db = db
        self.store = Store(db)
        self.on_response = on_response
        self.on_stored: Callable[[], None] | None = None  # after each committed batch (the console's live views)
        self.clock = clock
        self.client_id = settings.mqtt_client_id
        self.topics = Topics(settings.prefix, settings.response_topic)
        self.flood = FloodLimiter(self.cfg.flood_rate, self.cfg.flood_burst)
        self._queue: queue.SimpleQueue[_Incoming] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # SUBACK for the current connection
        self._generation = 0
        self._connected_at = 0.0
        self._limited = _Limited()
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.last_error: str | None = None
        self._client = make_client(settings.broker, self.client_id)
        self._client.manual_ack_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._threads = [threading.Thread(target=self._net, name="fleet-mqtt", daemon=True),
                         threading.Thread(target=self._writer, name="fleet-ingest", daemon=True)]

    # -- public ----------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Returns at once; connecting (and reconnecting) happens in the background."""
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand (commit + ack if the database lets us), then disconnect.

        Messages not yet committed are not acknowledged: the broker redelivers them to the session.
        """
        self._stop.set()
        self._threads[1].join(timeout)
        self._client.disconnect()
        self._threads[0].join(timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Connected and subscribed (the SUBACK arrived): from now on nothing is missed."""
        return self._subscribed.wait(timeout) and self._connected.is_set()

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        """QoS 1 publish (commands); thread-safe. The caller checks ``connected`` first."""
        return self._client.publish(topic, payload, qos=1, properties=properties)

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "client_id": self.client_id, "queued": self._queue.qsize(),
                "last_error": self.last_error, **dict(self.counters), "rejected": dict(self.rejected)}

    # -- paho callbacks (fleet-mqtt thread) -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.last_error = f"connection refused: {reason}"
            log.warning("fleet.ingest.refused", reason=str(reason), broker=self.settings.broker.url)
            return
        self._generation += 1
        self._subscribed.clear()
        result, _mid = client.subscribe([(t, 1) for t in self.topics.subscriptions(
            self.cfg.share_group if self.cfg.shared else None)])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("fleet.ingest.subscribe_failed", result=str(result))
        self.counters["connects"] += 1
        self._connected_at = time.monotonic()
        self.last_error = None
        self._connected.set()
        log.info("fleet.ingest.connected", broker=self.settings.broker.url, client_id=self.client_id,
                 session_present=bool(getattr(flags, "session_present", False)))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        failed = [str(c) for c in codes or () if getattr(c, "is_failure", False)]
        if failed:  # e.g. a broker without shared subscriptions, or an ACL that denies the topics
            log.error("fleet.ingest.subscribe_refused", reasons=failed)
        self._subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was and not self._stop.is_set():
            self.last_error = f"disconnected: {reason}"
            lasted = time.monotonic() - self._connected_at
            hint = (f"if this repeats, another process may be using the client id {self.client_id} "
                    "(give each instance its own state_dir or client_id)") if lasted < 5 else None
            log.warning("fleet.ingest.disconnected", reason=str(reason), connected_s=round(lasted, 1), hint=hint)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(_Incoming(self._generation, msg.mid, msg.qos, msg.topic, bytes(msg.payload)))

    # -- threads ----------------------------------------------------------------------------------------
    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.ReceiveMaximum = self.cfg.receive_maximum
        return props

    def _net(self) -> None:
        broker = self.settings.broker
        delay = broker.backoff_min_s
        while not self._stop.is_set():
            try:  # clean_start=False: resume the session, with what the broker kept for us
                self._client.connect(broker.host, broker.port, broker.keepalive_s, clean_start=False,
                                     properties=self._connect_properties())
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"connect failed: {exc}"
                log.warning("fleet.ingest.connect_failed", broker=broker.url, error=str(exc),
                            retry_in_s=round(delay, 2))
                self._stop.wait(backoff(delay, broker))
                delay = min(delay * 2, broker.backoff_max_s)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.1)
                if self._connected.is_set():
                    delay = broker.backoff_min_s
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self._connected.is_set():
                self._on_disconnect(self._client, None, None, "connection lost", None)
            if not self._stop.is_set():
                self._stop.wait(backoff(delay, broker))
                delay = min(delay * 2, broker.backoff_max_s)
        for _ in range(10):  # let the DISCONNECT go out
            if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    def _collect(self) -> list[_Incoming]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.batch_ms / 1000
        while len(batch) < self.cfg.batch_max:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _writer(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            try:
                self._handle(batch)
            except Exception:  # a bug must not end ingestion; the batch stays unacknowledged
                log.exception("fleet.ingest.batch_failed", size=len(batch))
                self.counters["batch_failures"] += 1
                self._stop.wait(1.0)

    def _handle(self, batch: Sequence[_Incoming]) -> None:
        now = self.clock()
        records: list[Record] = []
        counters = DeviceCounters()
        for item in batch:
            try:
                record = parse(self.topics, item.topic, item.payload, received_at=now,
                               max_bytes=self.cfg.max_payload_bytes)
            except Rejected as exc:
                self._reject(exc, item.topic, counters)
                continue
            if isinstance(record, SeqRecord) and not self.flood.allow(record.device_id, now):
                counters.dropped[record.device_id] = counters.dropped.get(record.device_id, 0) + 1
                self.counters["dropped"] += 1
                self._limited(f"flood:{record.device_id}", "fleet.ingest.flood_dropped", device=record.device_id,
                              rate=self.cfg.flood_rate, burst=self.cfg.flood_burst)
                continue
            records.append(record)
        outcomes = self._commit(records, now, counters)
        if outcomes is None:
            return  # stopping: nothing acknowledged, the broker redelivers
        self._ack(batch)
        self.counters["received"] += len(batch)
        self.counters["batches"] += 1
        for outcome in outcomes:
            self.counters["stored"] += outcome.stored
            self.counters["duplicates"] += outcome.duplicates
            self.counters["gaps_opened"] += outcome.gaps_opened
            self.counters["gaps_filled"] += outcome.gaps_filled
            if outcome.unknown_responses:
                self.rejected["unknown_command"] += outcome.unknown_responses
            if self.on_response is not None:
                for cid, device_id, payload in outcome.responses:
                    self.on_response(cid, device_id, payload)
        if self.on_stored is not None and outcomes:
            self.on_stored()
        log.debug("fleet.ingest.batch", size=len(batch), stored=sum(o.stored for o in outcomes))

    def _reject(self, exc: Rejected, topic: str, counters: DeviceCounters) -> None:
        self.rejected[exc.reason] += 1
        if exc.device_id is not None:
            counters.rejected[exc.device_id] = counters.rejected.get(exc.device_id, 0) + 1
        self._limited(f"reject:{exc.reason}", "fleet.ingest.rejected", reason=exc.reason, detail=exc.detail,
                      topic=topic[:200], device=exc.device_id)

    def _commit(self, records: list[Record], now: float, counters: DeviceCounters) -> list[BatchOutcome] | None:
        """Store, retrying while the database is unavailable; None if asked to stop meanwhile."""
        delay = 0.05
        while True:
            try:
                return self._store(records, now, counters)
            except sa.exc.SQLAlchemyError as exc:  # locked, down, or not usable: keep the messages
                self.counters["db_retries"] += 1
                self.last_error = f"database unavailable: {exc.__class__.__name__}"
                self._limited("db", "fleet.ingest.db_unavailable", error=str(exc).splitlines()[0][:300],
                              retry_in_s=round(delay, 2), pending=len(records))
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, self.cfg.retry_max_s)

    def _store(self, records: list[Record], now: float, counters: DeviceCounters) -> list[BatchOutcome]:
        """One transaction. If the database refuses the content (not the connection), split the batch
        until the offending message is alone, then reject it so that it cannot block the stream."""
        try:
            return [self.store.write_batch(records, now, counters)]
        except CONTENT_ERRORS as exc:
            if len(records) > 1:
                half = len(records) // 2
                return self._store(records[:half], now, counters) + self._store(records[half:], now, DeviceCounters())
            device_id = getattr(records[0], "device_id", None) if records else None
            self.rejected["db_rejected"] += 1
            log.error("fleet.ingest.db_rejected", device=device_id, error=str(exc).splitlines()[0][:300])
            merged = DeviceCounters(dict(counters.rejected), dict(counters.dropped))
            if device_id is not None:
                merged.rejected[device_id] = merged.rejected.get(device_id, 0) + 1
            return [self.store.write_batch([], now, merged)] if merged else []

    def _ack(self, batch: Sequence[_Incoming]) -> None:
        """PUBACK in arrival order, only on the connection the message came on (else it is redelivered)."""
        generation = self._generation
        acked = 0
        for item in batch:
            if item.qos > 0 and item.generation == generation:
                with contextlib.suppress(ValueError, OSError):
                    self._client.ack(item.mid, item.qos)
                acked += 1
        self.counters["acked"] += acked
