"""Fleet service storage on SQLite and PostgreSQL: migrations, exactly-once writes, gaps, device state."""

from __future__ import annotations

import time

import orjson
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.messages import Topics, parse
from cloud_sync.fleet.server.store import DeviceCounters, Store, fill_gaps, open_gaps

TOPICS = Topics("edge/v1", "edge/v1/console/srv/responses")


def rec(topic: str, body: object):
    return parse(TOPICS, f"edge/v1/{topic}", orjson.dumps(body), received_at=time.time(), max_bytes=65536)


def results(device: str, *seqs: int, stream: str = "cam"):
    return [rec(f"devices/{device}/results/{stream}", {"seq": q, "ts": 1000.0 + q, "v": q}) for q in seqs]


@pytest.fixture
def db(db_url: str):
    database = Database(db_url, busy_timeout_ms=2000)
    database.migrate()
    yield database
    database.dispose()


def gaps_of(db: Database, device: str) -> list[tuple[int, int]]:
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(sa.select(s.gaps.c.first_seq, s.gaps.c.last_seq)
                                               .where(s.gaps.c.device_id == device).order_by(s.gaps.c.first_seq))]


def count(db: Database, table: sa.Table) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_migrations_match_the_schema_and_are_idempotent(db: Database) -> None:
    assert db.migrate() == Database.head() == db.revision()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), s.metadata)
    assert diff == []


def test_gap_arithmetic() -> None:
    assert open_gaps(0, [5, 6, 9], first_contact=True) == ([(7, 8)], 9)
    assert open_gaps(0, [5], first_contact=False) == ([(1, 4)], 5)
    assert open_gaps(4, [3, 4], first_contact=False) == ([], 4)
    assert fill_gaps([(3, 9)], [3, 5, 9, 12]) == [(4, 4), (6, 8)]
    assert fill_gaps([(3, 3), (5, 6)], [3, 6]) == [(5, 5)]


def test_duplicates_are_stored_once_and_counted(db: Database) -> None:
    store = Store(db)
    first = store.write_batch(results("dev-a", 1, 2, 2, 3), time.time())
    again = store.write_batch(results("dev-a", 2, 3, 4), time.time())
    assert (first.stored, first.duplicates) == (3, 1)
    assert (again.stored, again.duplicates) == (1, 2)
    with db.read() as conn:
        rows = conn.execute(sa.select(s.results.c.seq, s.results.c.payload, s.results.c.stream)
                            .order_by(s.results.c.seq)).all()
        device = conn.execute(sa.select(s.devices).where(s.devices.c.id == "dev-a")).one()
    assert [(r.seq, r.payload["v"], r.stream) for r in rows] == [(1, 1, "cam"), (2, 2, "cam"), (3, 3, "cam"),
                                                                  (4, 4, "cam")]
    assert (device.max_seq, device.stored, device.duplicates) == (4, 4, 3)


def test_out_of_order_seqs_record_gaps_then_fill_them(db: Database) -> None:
    store = Store(db)
    store.write_batch(results("dev-a", 1, 2, 6, 10), time.time())
    assert gaps_of(db, "dev-a") == [(3, 5), (7, 9)]
    out = store.write_batch(results("dev-a", 4, 8, 9), time.time())
    assert out.gaps_filled == 3
    assert gaps_of(db, "dev-a") == [(3, 3), (5, 5), (7, 7)]
    store.write_batch(results("dev-a", 3, 5, 7), time.time())
    assert gaps_of(db, "dev-a") == []
    assert count(db, s.results) == 10


def test_seqs_are_per_device_across_kinds(db: Database) -> None:
    store = Store(db)
    batch = [*results("dev-a", 1), rec("devices/dev-a/telemetry", {"seq": 2, "ts": 5.0, "system": {"cpu": 3}}),
             rec("devices/dev-a/events", {"seq": 3, "type": "x"}), *results("dev-b", 1)]
    out = store.write_batch(batch, time.time())
    assert (out.stored, out.gaps_opened) == (4, 0)
    store.write_batch([rec("devices/dev-a/telemetry", {"seq": 2, "ts": 5.0, "system": {"cpu": 3}})], time.time())
    with db.read() as conn:
        device = conn.execute(sa.select(s.devices).where(s.devices.c.id == "dev-a")).one()
    assert device.telemetry == {"seq": 2, "ts": 5.0, "system": {"cpu": 3}}
    assert (device.max_seq, device.duplicates) == (3, 1)
    assert count(db, s.telemetry) == count(db, s.events) == 1


def test_state_updates_the_device_and_its_groups_and_models(db: Database) -> None:
    store = Store(db)
    birth = {"online": True, "agent_version": "1.2.0", "profile": "rpi5", "groups": ["lab", "north"],
             "models": [{"name": "faces", "version": 3, "runtime": "tflite", "delegate": "xnnpack"}],
             "health": {"cpu_percent": 5}, "started_at": 10.0, "ts": 11.0, "device_id": "someone-else"}
    store.write_batch([rec("devices/dev-a/state", birth)], time.time())
    store.write_batch([rec("devices/dev-a/state", {"online": False, "device_id": "dev-a"})], time.time())
    with db.read() as conn:
        device = conn.execute(sa.select(s.devices).where(s.devices.c.id == "dev-a")).one()
        groups = conn.execute(sa.select(s.device_groups.c.group).order_by(s.device_groups.c.group)).scalars().all()
        models = conn.execute(sa.select(s.device_models)).all()
        others = conn.execute(sa.select(sa.func.count()).select_from(s.devices)).scalar_one()
    assert (device.online, device.agent_version, device.profile) == (False, "1.2.0", "rpi5")  # the Will keeps them
    assert groups == ["lab", "north"]
    assert [(m.name, m.version, m.runtime, m.delegate) for m in models] == [("faces", 3, "tflite", "xnnpack")]
    assert others == 1  # the payload's device_id claimed nothing


def statements(db: Database, batch: list) -> int:
    """How many statements ``Store.write_batch`` sends to the database for ``batch``."""
    sent: list[str] = []

    def count_one(_conn, _cursor, statement, *_args) -> None:
        sent.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", count_one)
    try:
        Store(db).write_batch(batch, time.time())
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", count_one)
    return len(sent)


def test_a_batch_of_late_seqs_and_states_costs_the_same_statements_for_10_or_100_devices(db: Database) -> None:
    # With several instances on a shared subscription each one gets every other message of a device, so most
    # batches fill gaps of most devices, and every instance writes every device's state (births come with each
    # telemetry sample). A statement or five per device, under the devices' row locks, made two instances on
    # PostgreSQL wait on each other: a 1,000-device rollout took 43-165 s instead of 20 (bench/fleet.py).
    counts = {}
    for n in (10, 100):
        devices = [f"dev-{n}-{i:03d}" for i in range(n)]
        statements(db, [r for d in devices for r in results(d, 1, 3, 5)])  # opens gaps 2 and 4
        births = [rec(f"devices/{d}/state", {"online": True, "agent_version": "1.2.0", "groups": ["lab", d],
                                            "models": [{"name": "faces", "version": 3}], "health": {"cpu": i}})
                  for i, d in enumerate(devices)]
        counts[n] = statements(db, [*births, *(r for d in devices for r in results(d, 4, 2))])
        assert all(gaps_of(db, d) == [] for d in devices)
        with db.read() as conn:
            rows = conn.execute(sa.select(s.devices.c.id, s.devices.c.health, s.devices.c.max_seq)
                                .where(s.devices.c.id.in_(devices)).order_by(s.devices.c.id)).all()
            groups = conn.execute(sa.select(s.device_groups.c.device_id, s.device_groups.c.group)
                                  .where(s.device_groups.c.device_id.in_(devices))).all()
            served = conn.execute(sa.select(sa.func.count()).select_from(s.device_models)
                                  .where(s.device_models.c.device_id.in_(devices))).scalar_one()
        assert [(r.health, r.max_seq) for r in rows] == [({"cpu": i}, 5) for i in range(n)]
        assert sorted(groups) == sorted([(d, "lab") for d in devices] + [(d, d) for d in devices])
        assert served == n
    assert counts[100] == counts[10]
    # the Last Will leaves out what it does not say (health stays a JSON object, not null), next to a birth
    store = Store(db)
    store.write_batch([rec("devices/dev-10-000/state", {"online": False}),
                       rec("devices/dev-10-001/state", {"online": True, "groups": [], "models": []})], time.time())
    with db.read() as conn:
        will, birth = conn.execute(sa.select(s.devices.c.online, s.devices.c.health, s.devices.c.agent_version)
                                   .where(s.devices.c.id.in_(["dev-10-000", "dev-10-001"]))
                                   .order_by(s.devices.c.id)).all()
        left = conn.execute(sa.select(sa.func.count()).select_from(s.device_groups)
                            .where(s.device_groups.c.device_id == "dev-10-001")).scalar_one()
    assert tuple(will) == (False, {"cpu": 0}, "1.2.0")
    assert tuple(birth) == (True, {"cpu": 1}, "1.2.0") and left == 0


def test_counters_without_rows_create_the_device(db: Database) -> None:
    counters = DeviceCounters()
    counters.rejected["dev-x"] = 2
    counters.dropped["dev-x"] = 5
    Store(db).write_batch([], time.time(), counters)
    with db.read() as conn:
        device = conn.execute(sa.select(s.devices).where(s.devices.c.id == "dev-x")).one()
    assert (device.rejected, device.dropped, device.stored) == (2, 5, 0)


def test_command_responses_update_the_command_once(db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.insert(s.commands), [{"id": "c1", "device_id": "dev-a", "name": "ping", "args": {},
                                              "sent_at": 1.0, "status": "sent"}])
    store = Store(db)
    accepted = rec("console/srv/responses", {"id": "c1", "ok": True, "status": "accepted"})
    done = rec("console/srv/responses", {"id": "c1", "ok": True, "status": "done", "result": {"pong": True}})
    spoof = rec("devices/dev-b/responses", {"id": "c1", "ok": False, "status": "done"})
    stray = rec("console/srv/responses", {"id": "nobody-sent-this", "ok": True})
    out = store.write_batch([accepted, done, done, spoof, stray], time.time())
    assert out.unknown_responses == 1
    assert [(cid, dev) for cid, dev, _ in out.responses] == [("c1", "dev-a")] * 3 + [("c1", "dev-b")]
    with db.read() as conn:
        command = conn.execute(sa.select(s.commands)).one()
    assert (command.status, command.ok, command.response["result"]) == ("done", True, {"pong": True})
    assert count(db, s.command_responses) == 3  # accepted + done from dev-a, and dev-b's (kept, not applied)
