"""Ingestion end to end: device -> real mosquitto -> Ingestor -> SQLite / PostgreSQL.

Bad input (each a test): payloads that are not JSON, too large, of the wrong types, claiming another
device; duplicated and out-of-order seqs; a flooding device; a broker that goes away; a database that
is locked. Every wait has a deadline; nothing asserts on timing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.ingest import FloodLimiter
from cloud_sync.mqtt.session import DeviceSession
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.mqtt.topics import Topics
from cloud_sync.outbox import Outbox
from tests.fleet_env import PREFIX, RawDevice, count, device_row, running_ingestor, settings, wait_for
from tests.mqtt_broker import Broker, make_broker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def db(db_url: str):
    database = Database(db_url, busy_timeout_ms=200)
    database.migrate()
    yield database
    database.dispose()


def gaps(db: Database, device: str) -> list[tuple[int, int]]:
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(sa.select(s.gaps.c.first_seq, s.gaps.c.last_seq)
                                               .where(s.gaps.c.device_id == device).order_by(s.gaps.c.first_seq))]


def test_every_kind_is_stored_and_the_device_comes_from_the_state(db, broker: Broker, tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path)
    dev = RawDevice(broker.url, "cam-1")
    dev.publish("state", {"online": True, "agent_version": "0.9.0", "profile": "x86", "groups": ["lab"],
                          "models": [{"name": "faces", "version": 2, "runtime": "tflite", "delegate": "xnnpack"}]},
                retain=True)  # retained before the service starts: it must still see it
    with running_ingestor(cfg, db) as ingestor:
        dev.results(1, 2)
        dev.publish("telemetry", {"seq": 3, "ts": 1003.0, "system": {"cpu_percent": 12.5}})
        dev.publish("events", {"seq": 4, "ts": 1004.0, "type": "deploy.committed", "model": "faces"})
        wait_for(lambda: count(db, s.events) == 1 and count(db, s.results) == 2 and count(db, s.telemetry) == 1,
                 what="rows")
        wait_for(lambda: (device_row(db, "cam-1") or {}) and device_row(db, "cam-1").agent_version == "0.9.0",
                 what="state")
        row = device_row(db, "cam-1")
        assert (row.online, row.profile, row.max_seq, row.stored) == (True, "x86", 4, 4)
        assert row.telemetry["system"] == {"cpu_percent": 12.5}
        dev.client.disconnect()  # no Last Will on a clean disconnect; publish the offline state like the agent
        dev2 = RawDevice(broker.url, "cam-1")
        dev2.publish("state", {"online": False, "device_id": "cam-1"}, retain=True)
        wait_for(lambda: not device_row(db, "cam-1").online, what="offline")
        assert device_row(db, "cam-1").agent_version == "0.9.0"
        # A batch is acknowledged, then counted, just after its commit: wait for both counts to settle.
        wait_for(lambda: ingestor.counters["acked"] == ingestor.counters["received"] > 0, what="acked = received")
        dev2.close()
    dev.close()


def test_bad_payloads_are_counted_acknowledged_and_not_stored(db, broker: Broker, tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path, **{"ingest.max_payload_bytes": 1024})
    dev = RawDevice(broker.url, "cam-1")
    with running_ingestor(cfg, db) as ingestor:
        dev.publish("results/cam", b"not json {")
        dev.publish("results/cam", b'{"seq": 1, "blob": "' + b"x" * 2000 + b'"}')  # too large
        dev.publish("results/cam", [1, 2, 3])  # not an object
        dev.publish("results/cam", {"seq": "1"})  # seq of the wrong type
        dev.publish("results/cam", {"seq": True})
        dev.publish("results/cam", {"seq": 1, "ts": "yesterday"})
        dev.publish("results/cam", {"seq": 1, "model": 42})
        dev.publish("events", {"seq": 1, "type": ["x"]})
        dev.publish("telemetry", b'{"seq": 1, "note": "\\u0000"}')  # NUL: PostgreSQL could not store it
        dev.publish("state", {"online": "yes"})
        dev.publish("state", {"online": True, "models": [{"name": "m", "version": "2"}]})
        dev.publish("responses", {"ok": True})  # no id
        dev.client.publish(f"{PREFIX}/devices/-bad/results/cam", b'{"seq": 1}', qos=1).wait_for_publish(5)
        dev.results(1)  # a good one after all the bad ones: nothing blocks the stream
        wait_for(lambda: count(db, s.results) == 1, what="the good result")
        wait_for(lambda: ingestor.counters["acked"] == 14, what="every message acknowledged")
        assert dict(ingestor.rejected) == {"not_json": 2, "too_large": 1, "not_object": 1, "bad_seq": 2,
                                           "bad_field": 3, "bad_state": 2, "bad_response": 1, "bad_topic": 1}
        wait_for(lambda: device_row(db, "cam-1").rejected == 12, what="per-device counter")
        assert count(db, s.telemetry) == count(db, s.events) == 0
    dev.close()


def test_a_payload_claiming_another_device_is_stored_under_the_topic_device(db, broker: Broker,
                                                                            tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path)
    dev = RawDevice(broker.url, "cam-1")
    with running_ingestor(cfg, db):
        dev.publish("results/cam", {"seq": 1, "device_id": "victim", "stream": "other"})
        dev.publish("state", {"online": True, "device_id": "victim", "agent_version": "evil"})
        wait_for(lambda: count(db, s.results) == 1 and device_row(db, "cam-1").agent_version == "evil",
                 what="rows")
        with db.read() as conn:
            row = conn.execute(sa.select(s.results)).one()
        assert (row.device_id, row.stream) == ("cam-1", "cam")
        assert device_row(db, "victim") is None
    dev.close()


def test_duplicated_and_out_of_order_seqs_are_stored_once_with_gaps_recorded_then_filled(
        db, broker: Broker, tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path)
    dev = RawDevice(broker.url, "cam-1")
    with running_ingestor(cfg, db) as ingestor:
        dev.results(1, 2, 5, 3, 3, 9, 2)
        wait_for(lambda: ingestor.counters["received"] == 7, what="delivery")
        assert gaps(db, "cam-1") == [(4, 4), (6, 8)]
        dev.results(4, 6, 7, 8, 8, 1)
        wait_for(lambda: ingestor.counters["received"] == 13, what="delivery")
        assert gaps(db, "cam-1") == []
        with db.read() as conn:
            seqs = conn.execute(sa.select(s.results.c.seq).order_by(s.results.c.seq)).scalars().all()
        assert seqs == list(range(1, 10))
        row = device_row(db, "cam-1")
        assert (row.stored, row.duplicates, row.max_seq) == (9, 4, 9)
        assert ingestor.counters["duplicates"] == 4
    dev.close()


def test_flood_limiter_is_a_token_bucket() -> None:
    limiter = FloodLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("b", 0.0)  # per device
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)  # one token back after 0.5 s at 2/s
    assert FloodLimiter(rate=0, burst=1).allow("a", 0.0)


def test_a_flooding_device_is_bounded_and_others_are_not_starved(db, broker: Broker, tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path, **{"ingest.flood_rate": 1.0, "ingest.flood_burst": 50})
    flood, quiet = RawDevice(broker.url, "flood"), RawDevice(broker.url, "quiet")
    frozen = 1_000_000.0  # a clock that does not move: the budget is exactly the burst
    with running_ingestor(cfg, db, clock=lambda: frozen) as ingestor:
        flood.results(*range(1, 501))
        quiet.results(1, 2, 3)
        wait_for(lambda: ingestor.counters["received"] == 503, what="delivery")
        assert count(db, s.results, device_id="flood") == 50
        assert count(db, s.results, device_id="quiet") == 3
        row = device_row(db, "flood")
        assert (row.stored, row.dropped) == (50, 450)
        assert ingestor.counters["acked"] == 503  # dropped, not redelivered forever
    flood.close()
    quiet.close()


def _device_session(broker_url: str, device_id: str, tmp_path: Path) -> tuple[DeviceSession, Outbox]:
    outbox = Outbox(tmp_path / f"{device_id}-outbox.db")
    link = LinkSettings(device_id=device_id, prefix=PREFIX,
                        broker=BrokerSettings(url=broker_url, backoff_min_s=0.05, backoff_max_s=0.2))
    return DeviceSession(link, outbox), outbox


def test_broker_restart_loses_nothing(db, tmp_path: Path) -> None:
    """mosquitto 2.0.11 (Debian 12) does not restore *shared* subscriptions from its persistence file, so
    a single instance that must survive broker restarts on it subscribes without $share (docs)."""
    broker = make_broker(tmp_path / "mosquitto", persistence=True)
    broker.start()
    cfg = settings(str(db.url), broker.url, tmp_path, **{"ingest.shared": False})
    session, outbox = _device_session(broker.url, "cam-1", tmp_path)
    topic = Topics(PREFIX, "cam-1").results("cam")
    try:
        with running_ingestor(cfg, db) as ingestor:
            session.start()
            for i in range(200):
                session.enqueue("result", topic, {"ts": float(i), "i": i})
            wait_for(lambda: count(db, s.results) >= 50, what="first results")
            broker.stop()  # SIGTERM: mosquitto saves the sessions
            wait_for(lambda: not ingestor.connected, what="disconnect")
            for i in range(200, 400):
                session.enqueue("result", topic, {"ts": float(i), "i": i})  # into the outbox meanwhile
            broker.start()
            wait_for(lambda: count(db, s.results) == 400, timeout=30, what="all 400 results")
            assert gaps(db, "cam-1") == []
            assert ingestor.counters["connects"] >= 2
            wait_for(lambda: outbox.stats().depth == 0, what="outbox drained")
    finally:
        session.stop()
        outbox.close()
        broker.stop()


def test_messages_sent_while_the_service_is_down_wait_in_its_persistent_session(db, broker: Broker,
                                                                               tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path)
    dev = RawDevice(broker.url, "cam-1")
    with running_ingestor(cfg, db):
        dev.results(1)
        wait_for(lambda: count(db, s.results) == 1, what="first result")
    dev.results(*range(2, 302))  # nobody is connected: the broker queues them for the session
    with running_ingestor(cfg, db) as ingestor:  # same client id, clean_start=False
        wait_for(lambda: count(db, s.results) == 301, what="the queued results")
        assert ingestor.counters["duplicates"] == 0
    dev.close()


class _Lock:
    """Holds the database so that writers wait: SQLite's write lock, or a PostgreSQL table lock."""

    def __init__(self, db: Database) -> None:
        self.db = db
        if db.dialect == "sqlite":
            self.conn: object = sqlite3.connect(str(db.url.database), isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")  # type: ignore[attr-defined]
        else:
            self.conn = db.engine.connect()
            self.conn.execute(sa.text("LOCK TABLE results IN ACCESS EXCLUSIVE MODE"))  # type: ignore[attr-defined]

    def release(self) -> None:
        if isinstance(self.conn, sqlite3.Connection):
            self.conn.execute("ROLLBACK")
        self.conn.close()  # type: ignore[attr-defined]


def test_a_locked_database_makes_ingestion_back_off_without_acknowledging_or_losing(db, broker: Broker,
                                                                                   tmp_path: Path) -> None:
    cfg = settings(str(db.url), broker.url, tmp_path, **{"ingest.receive_maximum": 100})
    dev = RawDevice(broker.url, "cam-1")
    lock = _Lock(db)
    try:
        with running_ingestor(cfg, db) as ingestor:
            dev.results(*range(1, 301))  # the broker takes them all (PUBACK to the device)
            wait_for(lambda: ingestor.counters["db_retries"] >= 3, what="retries while locked")
            assert ingestor.counters["acked"] == 0  # nothing acknowledged before it is committed
            assert ingestor.stats()["queued"] <= 100  # receive_maximum: the broker keeps the rest
        # the service stopped (as if it crashed) while the database was still locked
    finally:
        lock.release()
    assert count(db, s.results) == 0
    with running_ingestor(cfg, db) as ingestor:  # the broker redelivers everything never acknowledged
        wait_for(lambda: count(db, s.results) == 300, timeout=30, what="all 300 results")
        assert gaps(db, "cam-1") == []
    dev.close()


def test_two_instances_split_the_load_and_store_each_message_once(db, broker: Broker, tmp_path: Path) -> None:
    cfg_a = settings(str(db.url), broker.url, tmp_path, client_id="srv-a")
    cfg_b = settings(str(db.url), broker.url, tmp_path, client_id="srv-b")
    devices = [RawDevice(broker.url, f"cam-{i}") for i in range(4)]
    with running_ingestor(cfg_a, db) as a, running_ingestor(cfg_b, db) as b:
        for dev in devices:
            dev.results(*range(1, 101))
        wait_for(lambda: count(db, s.results) == 400, timeout=30, what="400 results")
        # Each instance counts a batch just after committing it: wait for the counts to catch up.
        wait_for(lambda: a.counters["received"] + b.counters["received"] >= 400, timeout=30, what="both counted")
        assert a.counters["received"] > 0 and b.counters["received"] > 0
        assert a.counters["received"] + b.counters["received"] == 400
        with db.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(s.gaps)).scalar_one() == 0
            assert conn.execute(sa.select(sa.func.sum(s.devices.c.duplicates))).scalar_one() == 0
    for dev in devices:
        dev.close()
