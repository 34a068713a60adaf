"""Helpers for the fleet-service tests: settings, a running ingestor, and a scriptable MQTT device.

``RawDevice`` is a bare paho client so tests can send exactly the bytes they want (bad payloads,
chosen seqs, another device's id); end-to-end tests also use the real device link
(``cloud_sync.mqtt.session.DeviceSession`` with its outbox).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.config import ServerSettings, load_settings
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.ingest import Ingestor
from cloud_sync.mqtt.settings import BrokerSettings

PREFIX = "edge/v1"
_ids = itertools.count(1)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def settings(db_url: str, broker_url: str, tmp_path: Path, *, client_id: str | None = None,
             **overrides: Any) -> ServerSettings:
    """Test settings: fast batches, a short busy timeout, an ephemeral API port."""
    values = {"db": db_url, "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"),
              "client_id": client_id or f"srv-{uuid.uuid4().hex[:8]}", "db_busy_timeout_ms": 200,
              "ingest.batch_ms": 20, "ingest.retry_max_s": 0.2, **overrides}
    return load_settings(overrides=values, environ={}, broker=BrokerSettings(url=broker_url), prefix=PREFIX)


@contextlib.contextmanager
def running_ingestor(cfg: ServerSettings, db: Database | None = None, **kw: Any) -> Iterator[Ingestor]:
    own = db is None
    db = db or Database(cfg.db_url, busy_timeout_ms=cfg.db_busy_timeout_ms)
    db.migrate()
    ingestor = Ingestor(cfg, db, **kw)
    ingestor.start()
    try:
        assert ingestor.wait_ready(10), "ingestor did not connect and subscribe"
        yield ingestor
    finally:
        ingestor.stop()
        if own:
            db.dispose()


def count(db: Database, table: sa.Table, **where: Any) -> int:
    with db.read() as conn:
        q = sa.select(sa.func.count()).select_from(table)
        for key, value in where.items():
            q = q.where(table.c[key] == value)
        return int(conn.execute(q).scalar_one())


def device_row(db: Database, device_id: str) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(s.devices).where(s.devices.c.id == device_id)).first()


class RawDevice:
    """A paho MQTT 5 client publishing as device ``device_id``; optionally answers commands."""

    def __init__(self, broker_url: str, device_id: str, *,
                 answer: Callable[[dict[str, Any]], list[dict[str, Any]] | None] | None = None) -> None:
        self.device_id = device_id
        self.answer = answer
        broker = BrokerSettings(url=broker_url)
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"{device_id}-{next(_ids)}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if answer is not None:
            self.client.subscribe(f"{PREFIX}/devices/{device_id}/commands", qos=1)
            assert self._subscribed.wait(5)

    def topic(self, leaf: str) -> str:
        return f"{PREFIX}/devices/{self.device_id}/{leaf}"

    def publish(self, leaf: str, payload: Any, *, retain: bool = False, wait: bool = True) -> mqtt.MQTTMessageInfo:
        raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        info = self.client.publish(self.topic(leaf), raw, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(10)
        return info

    def publish_many(self, leaf: str, payloads: list[Any]) -> None:
        infos = [self.publish(leaf, p, wait=False) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)

    def results(self, *seqs: int, stream: str = "cam", **extra: Any) -> None:
        self.publish_many(f"results/{stream}", [{"seq": q, "ts": 1000.0 + q, "stream": stream, **extra}
                                                for q in seqs])

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        self.commands.put(body)
        replies = self.answer(body) if self.answer else None
        props = msg.properties
        for reply in replies or []:
            out = Properties(PacketTypes.PUBLISH)
            out.CorrelationData = props.CorrelationData
            client.publish(props.ResponseTopic, orjson.dumps(reply), qos=1, properties=out)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
