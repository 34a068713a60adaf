"""The persistent outbox against real SQLite files: order, seq, bounds, disk full, threads, SIGKILL, corruption."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import structlog

from cloud_sync import outbox as outbox_module
from cloud_sync.outbox import DROPPED, Outbox, OutboxError, OutboxMessage

TOPIC = "edge/v1/devices/d1/results/cam0"


def seqs_of(messages: list[OutboxMessage]) -> list[int]:
    return [m.seq for m in messages]


def kinds_by_seq(ob: Outbox) -> dict[int, str]:
    return {m.seq: m.kind for m in ob.pending(limit=1_000_000)}


# ---------------------------------------------------------------------------- basics


def test_put_pending_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "state" / "outbox.db") as ob:  # parent directory is created
        assert ob.put("result", TOPIC, {"n": 1}) == 1
        assert ob.put("telemetry", "t/telemetry", {"n": 2}, qos=0) == 2
        assert ob.put("event", "t/events", {"n": 3}, retain=True) == 3
        assert ob.put("result", TOPIC, {"n": 4}) == 4
        assert ob.put("result", TOPIC, {"n": 5}) == 5

        msgs = ob.pending()
        assert seqs_of(msgs) == [1, 2, 3, 4, 5]
        assert [orjson.loads(m.payload)["n"] for m in msgs] == [1, 2, 3, 4, 5]
        assert msgs[1] == OutboxMessage(2, "telemetry", "t/telemetry", b'{"seq":2,"n":2}', 0, False)
        assert msgs[2].retain is True
        assert msgs[2].qos == 1
        assert seqs_of(ob.pending(after_seq=2, limit=2)) == [3, 4]
        assert ob.pending(limit=0) == []

        ob.ack([2, 4, 99, 2])  # unknown and repeated seqs are ignored
        left = ob.pending()
        assert seqs_of(left) == [1, 3, 5]
        stats = ob.stats()
        assert stats.depth == 3
        assert stats.bytes == sum(len(m.payload) for m in left)
        assert stats.last_seq == 5
        assert stats.to_dict() == {
            "depth": 3,
            "bytes": stats.bytes,
            "last_seq": 5,
            "dropped": {"result": 0, "telemetry": 0, "event": 0},
            "dead_lettered": 0,
            "dead_letters": 0,
        }


def test_seq_is_inside_the_payload_json_and_numpy_works(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        payload = {
            "score": np.float32(0.5),
            "count": np.int64(7),
            "box": np.array([1, 2, 3], dtype=np.int32),
            "seq": "caller's seq is replaced",
        }
        seq = ob.put("result", TOPIC, payload)
        empty_seq = ob.put("event", "t/events", {})
        stored = {m.seq: orjson.loads(m.payload) for m in ob.pending()}
    assert stored[seq] == {"seq": seq, "score": 0.5, "count": 7, "box": [1, 2, 3]}
    assert stored[empty_seq] == {"seq": empty_seq}
    assert payload["seq"] == "caller's seq is replaced"  # the caller's mapping is not modified


def test_invalid_input_is_rejected_and_stores_nothing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        with pytest.raises(ValueError, match="kind"):
            ob.put("metrics", TOPIC, {})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="qos"):
            ob.put("result", TOPIC, {}, qos=3)
        with pytest.raises(ValueError, match="topic"):
            ob.put("result", "", {})
        with pytest.raises(TypeError):
            ob.put("result", TOPIC, {"x": object()})
        with pytest.raises(TypeError):  # one bad item: the whole batch is refused
            ob.put_many([("result", TOPIC, {"a": 1}), ("result", TOPIC, {"x": object()})])
        assert ob.stats().depth == 0
        assert ob.stats().last_seq == 0
        assert ob.put("result", TOPIC, {}) == 1
    with pytest.raises(ValueError, match="synchronous"):
        Outbox(tmp_path / "p.db", synchronous="SOMETIMES")
    with pytest.raises(ValueError):
        Outbox(tmp_path / "p.db", max_messages=0)


def test_closed_outbox_raises(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    ob.close()
    ob.close()  # idempotent
    for call in (lambda: ob.put("event", "t", {}), ob.pending, lambda: ob.ack([1])):
        with pytest.raises(OutboxError, match="closed"):
            call()


def test_seq_never_goes_back_across_reopen_and_after_acking_everything(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        assert [ob.put("result", TOPIC, {"i": i}) for i in range(3)] == [1, 2, 3]
        ob.ack([1, 2, 3])
        assert ob.stats().depth == 0
    with Outbox(path) as ob:
        assert ob.stats().last_seq == 3
        assert ob.put("event", "t/events", {}) == 4
        assert ob.put("event", "t/events", {}) == 5
    with Outbox(path) as ob:
        assert seqs_of(ob.pending()) == [4, 5]
        ob.ack([4, 5])
    with Outbox(path) as ob:
        assert ob.stats().last_seq == 5
        assert ob.put("telemetry", "t/telemetry", {}) == 6


def stored_meta(path: Path) -> dict[str, int]:
    """What a restarted agent would find after SIGKILL, read through a second connection."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


def test_seq_survives_ack_without_close(tmp_path: Path) -> None:
    """last_seq must be durable as soon as the ack commits, not only when close() tidies up."""
    path = tmp_path / "o.db"
    ob = Outbox(path)
    ob.put_many([("result", TOPIC, {})] * 3)
    ob.ack([1, 2, 3])
    # A second reader sees what a restarted agent would see after SIGKILL.
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone() == (3,)
    assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    conn.close()
    ob.close()


def test_put_many(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.put("event", "t/events", {"first": True})
        seqs = ob.put_many(
            [("result", TOPIC, {"i": 0}), ("telemetry", "t/telemetry", {"i": 1}), ("event", "t/events", {"i": 2})],
            qos=0,
        )
        assert seqs == [2, 3, 4]
        assert ob.put_many([]) == []
        msgs = ob.pending(after_seq=1)
        assert [(m.kind, orjson.loads(m.payload)) for m in msgs] == [
            ("result", {"seq": 2, "i": 0}),
            ("telemetry", {"seq": 3, "i": 1}),
            ("event", {"seq": 4, "i": 2}),
        ]
        assert {m.qos for m in msgs} == {0}


def test_synchronous_mode_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, synchronous="full") as ob:
        assert ob._conn is not None
        assert ob._conn.execute("PRAGMA synchronous").fetchone() == (2,)
        ob.put("event", "t", {})
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ---------------------------------------------------------------------------- bounds and drop policy


def test_bound_by_count_drops_results_then_telemetry_then_events(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=6) as ob:  # chunk = 1
        for kind in ("event", "telemetry", "result", "event", "telemetry", "result"):
            ob.put(kind, f"t/{kind}", {"pad": "x"})  # seqs 1..6
        assert ob.put("telemetry", "t/telemetry", {}) == 7  # pushes out result 3
        assert ob.put("event", "t/events", {}) == 8  # pushes out result 6
        assert kinds_by_seq(ob) == {1: "event", 2: "telemetry", 4: "event", 5: "telemetry", 7: "telemetry", 8: "event"}
        assert ob.put("event", "t/events", {}) == 9  # no results left: oldest telemetry (2) goes
        assert ob.put("telemetry", "t/telemetry", {}) == 10  # oldest telemetry (5) goes
        assert ob.put("event", "t/events", {}) == 11  # telemetry 7
        assert ob.put("event", "t/events", {}) == 12  # telemetry 10
        assert ob.put("event", "t/events", {}) == 13  # only events left: oldest event (1)
        assert kinds_by_seq(ob) == dict.fromkeys([4, 8, 9, 11, 12, 13], "event")
        assert ob.stats().dropped == {"result": 2, "telemetry": 4, "event": 1}
        assert ob.stats().depth == 6
        # Durable when the put commits (a SIGKILL now must not lose them), not only at close().
        assert stored_meta(path) == {"last_seq": 13, "dropped.result": 2, "dropped.telemetry": 4, "dropped.event": 1,
                                    "dead_lettered": 0}
    with Outbox(path, max_messages=6) as ob:  # counters and contents persist
        assert ob.stats().dropped == {"result": 2, "telemetry": 4, "event": 1}
        assert ob.stats().depth == 6
        assert ob.stats().last_seq == 13


def test_new_result_is_dropped_when_only_events_remain(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=5) as ob:
        ob.put_many([("event", "t/events", {"i": i}) for i in range(5)])
        before = ob.pending()
        assert ob.put("result", TOPIC, {"late": True}) == DROPPED
        assert ob.pending() == before  # no event was sacrificed for a result
        assert ob.stats().dropped == {"result": 1, "telemetry": 0, "event": 0}
        assert ob.stats().last_seq == 5  # a dropped message does not consume a seq
        ob.ack([1])
        assert ob.put("result", TOPIC, {}) == 6  # room again


def test_new_result_never_evicts_telemetry(tmp_path: Path) -> None:
    """Results are the least valuable kind: a new one may only push out older results."""
    with Outbox(tmp_path / "o.db", max_messages=3) as ob:
        ob.put_many([("telemetry", "t", {}), ("result", TOPIC, {}), ("telemetry", "t", {})])
        assert ob.put("result", TOPIC, {}) == 4  # evicts result 2
        assert ob.put("result", TOPIC, {}) == 5  # evicts result 4
        ob.ack([5])
        ob.put("telemetry", "t", {})  # 6 fills the queue: 1, 3, 6 are all telemetry
        assert ob.put("result", TOPIC, {}) == DROPPED
        assert kinds_by_seq(ob) == {1: "telemetry", 3: "telemetry", 6: "telemetry"}
        assert ob.stats().dropped == {"result": 3, "telemetry": 0, "event": 0}


def test_full_queue_drops_a_chunk_in_one_go(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=1000) as ob:  # chunk = 1% = 10
        ob.put_many([("result", TOPIC, {"i": i}) for i in range(1000)])
        assert ob.put("result", TOPIC, {}) == 1001
        assert ob.stats().depth == 991
        assert ob.stats().dropped["result"] == 10
        assert ob.pending(limit=1)[0].seq == 11
        for _ in range(9):  # the next nine fit without dropping anything
            ob.put("result", TOPIC, {})
        assert ob.stats().dropped["result"] == 10
        assert ob.stats().depth == 1000


def test_bound_by_bytes(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    max_bytes = 2_000
    with Outbox(path, max_bytes=max_bytes) as ob:
        events = [ob.put("event", "t/events", {"pad": "e" * 80}) for _ in range(5)]
        results = []
        for i in range(200):
            results.append(ob.put("result", TOPIC, {"i": i, "pad": "r" * 80}))
            assert ob.stats().bytes <= max_bytes
        assert DROPPED not in results  # older results made room every time
        stored = kinds_by_seq(ob)
        assert all(seq in stored for seq in events)  # events untouched
        assert ob.stats().dropped["event"] == 0
        assert ob.stats().dropped["telemetry"] == 0
        assert ob.stats().dropped["result"] == 200 - (len(stored) - 5)
        assert ob.stats().bytes == sum(len(m.payload) for m in ob.pending(limit=10_000))
        # A message that can never fit is dropped without evicting anything.
        depth = ob.stats().depth
        assert ob.put("event", "t/events", {"pad": "z" * max_bytes}) == DROPPED
        assert ob.stats().depth == depth
        assert ob.stats().dropped["event"] == 1
        dropped = ob.stats().dropped
    with Outbox(path, max_bytes=max_bytes) as ob:
        assert ob.stats().dropped == dropped


def test_drops_are_logged_at_most_once_per_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with structlog.testing.capture_logs() as logs:
        # A fresh logger, in case another test configured structlog to cache loggers.
        monkeypatch.setattr(outbox_module, "log", structlog.get_logger("cloud_sync.outbox"))
        ob = Outbox(tmp_path / "o.db", max_messages=5)
        ob.put_many([("event", "t/events", {})] * 5)
        for _ in range(50):
            assert ob.put("result", TOPIC, {}) == DROPPED
        ob.close()
    dropped = [entry for entry in logs if entry["event"] == "outbox.dropped"]
    assert len(dropped) == 2  # the first drop, then the rest summed up at close
    assert sum(entry["dropped"]["result"] for entry in dropped) == 50
    assert dropped[-1]["total"] == {"result": 50, "telemetry": 0, "event": 0}
    assert dropped[0]["log_level"] == "warning"


# ---------------------------------------------------------------------------- disk full (real, via max_page_count)


def page_count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA page_count").fetchone()[0])
    finally:
        conn.close()


def test_disk_full_drops_oldest_results_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_pages=40, max_messages=10_000) as ob:  # 160 KiB file, chunk = 100
        seqs = [ob.put("result", TOPIC, {"i": i, "pad": "x" * 1000}) for i in range(400)]
        assert seqs == list(range(1, 401))  # never raised, never dropped a new message
        stats = ob.stats()
        assert stats.dropped["result"] > 0
        assert stats.depth + stats.dropped["result"] == 400
        assert seqs_of(ob.pending(limit=10_000)) == list(range(401 - stats.depth, 401))  # the newest survive
    assert page_count(path) <= 40
    with Outbox(path, max_pages=40) as ob:
        assert ob.stats().dropped == stats.dropped


def test_disk_full_drops_the_new_message_when_nothing_may_go(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        ob.put_many([("event", "t/events", {"i": i, "pad": "e" * 1000}) for i in range(60)])
    pages = page_count(path)
    # SQLite never caps a file below its current size: max_pages=1 means "full right now".
    with Outbox(path, max_pages=1, max_messages=100) as ob:
        # Nothing a result may push out, and the disk is full: the new result is dropped.
        assert ob.put("result", TOPIC, {"pad": "r" * 8000}) == DROPPED
        assert ob.stats().depth == 60
        assert ob.stats().dropped == {"result": 1, "telemetry": 0, "event": 0}
        # An event may push out older events, so it gets in.
        assert ob.put("event", "t/events", {"pad": "e" * 8000}) == 61
        dropped_events = ob.stats().dropped["event"]
        assert dropped_events > 0
        assert seqs_of(ob.pending(limit=100)) == [*range(dropped_events + 1, 61), 61]  # the oldest went
        # The room the event made is enough for the next result.
        assert ob.put("result", TOPIC, {"pad": "r" * 8000}) == 62
    assert page_count(path) == pages
    with Outbox(path) as ob:
        assert ob.stats().dropped == {"result": 1, "telemetry": 0, "event": dropped_events}
        assert ob.stats().last_seq == 62


# ---------------------------------------------------------------------------- concurrency and crashes


def test_concurrent_producers_and_consumer_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    per_thread, threads = 2_000, 4
    returned: dict[int, tuple[int, int]] = {}
    returned_lock = threading.Lock()
    done = threading.Event()
    seen: list[OutboxMessage] = []
    errors: list[BaseException] = []

    def produce(t: int) -> None:
        try:
            for i in range(per_thread):
                seq = ob.put("result", TOPIC, {"t": t, "i": i})
                with returned_lock:
                    assert seq not in returned
                    returned[seq] = (t, i)
        except BaseException as exc:
            errors.append(exc)

    def consume() -> None:
        last = 0
        try:
            while True:
                batch = ob.pending(after_seq=last, limit=300)
                if batch:
                    seen.extend(batch)
                    ob.ack(seqs_of(batch))
                    last = batch[-1].seq
                elif done.is_set() and not ob.pending(after_seq=last):
                    return
                else:
                    time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    consumer.start()
    for p in producers:
        p.start()
    for p in producers:
        p.join(timeout=60)
    done.set()
    consumer.join(timeout=60)
    assert not errors
    total = per_thread * threads
    assert sorted(returned) == list(range(1, total + 1))
    assert seqs_of(seen) == list(range(1, total + 1))  # every message once, in order
    for m in seen:
        body = orjson.loads(m.payload)
        assert returned[m.seq] == (body["t"], body["i"])
        assert body["seq"] == m.seq
    assert ob.stats().depth == 0
    ob.close()


WRITER = r"""
import sys
import structlog
from cloud_sync.outbox import Outbox

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries seqs

path, run, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ob = Outbox(path, max_messages=1_000_000)
i = 0
while True:
    i += 1
    seq = ob.put("result", "t/results", {"run": run, "i": i, "pad": "x" * 200})
    if i % 200 == 0:  # a sender acking the oldest messages, as in production
        ob.ack(m.seq for m in ob.pending(limit=50))
    if i >= n and i % 100 == 0:
        print(seq, flush=True)  # seq is committed: it must survive the kill
"""


@pytest.mark.timeout(60)
def test_sigkilled_writer_leaves_a_consistent_prefix(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    for run in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(run), "1000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # 1000 puts done
        assert first.strip(), "writer died before reaching 1000 puts"
        printed = [int(first)]
        reader = threading.Thread(target=lambda out=proc.stdout, into=printed: into.extend(int(x) for x in out))
        reader.start()
        time.sleep(0.2)  # still writing flat out
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        reader.join(timeout=10)

        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        conn.close()
        with Outbox(path, max_messages=1_000_000) as ob:
            msgs = ob.pending(limit=10_000_000)
            seqs = seqs_of(msgs)
            assert seqs == list(range(seqs[0], seqs[-1] + 1))  # contiguous: acks only removed the oldest
            assert seqs[-1] >= max(printed)  # every returned put survived SIGKILL
            assert ob.stats().last_seq == seqs[-1]
            assert ob.stats().depth == len(msgs)
            offsets = set()
            for m in msgs:
                body = orjson.loads(m.payload)
                assert body["seq"] == m.seq
                if body.get("run") == run:
                    offsets.add(m.seq - body["i"])
            assert len(offsets) == 1  # this run's messages: no gap, no duplicate
            assert ob.put("event", "t/events", {}) == seqs[-1] + 1  # the next run continues after it


# ---------------------------------------------------------------------------- bad files


def make_outbox(path: Path, n: int = 2_000) -> None:
    with Outbox(path) as ob:
        ob.put_many([("result", TOPIC, {"i": i, "pad": "x" * 200}) for i in range(n)])


def corrupt_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(page, len(data), page * 7):  # scribble over every 7th page after the header page
        data[start : start + page] = b"\xa5" * page
    path.write_bytes(bytes(data))


def scribble_index(path: Path) -> None:
    """Damage only the (kind, seq) index: the table itself still reads fine."""
    make_outbox(path)
    conn = sqlite3.connect(path)
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages_by_kind'").fetchone()
    conn.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * 4096)
        f.write(b"\x5a" * 4096)


def foreign_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()


def wrong_messages_table(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)")
    conn.commit()
    conn.close()


def newer_schema(path: Path) -> None:
    make_outbox(path, 1)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(b"this is not a database at all" * 200), "not a database"),
        (lambda p: (make_outbox(p), corrupt_pages(p)), "malformed|corrupt"),
        (lambda p: (make_outbox(p), p.write_bytes(p.read_bytes()[: 4096 * 20])), "malformed|corrupt"),
        (scribble_index, "corrupt|malformed"),
        (foreign_db, "not an outbox database"),
        (wrong_messages_table, "not an outbox database"),
        (newer_schema, "schema version 99"),
        (lambda p: p.mkdir(), "not a regular file"),
    ],
    ids=[
        "garbage",
        "scribbled-pages",
        "truncated",
        "scribbled-index",
        "foreign-db",
        "wrong-table",
        "newer-schema",
        "directory",
    ],
)
def test_bad_database_file_raises_outbox_error(tmp_path: Path, damage, reason: str) -> None:
    path = tmp_path / "o.db"
    damage(path)
    with pytest.raises(OutboxError, match=reason) as info:
        Outbox(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0, reason="root can read anything")
def test_unreadable_file_raises_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    make_outbox(path, 1)
    path.chmod(0)
    with pytest.raises(OutboxError, match=r"o\.db"):
        Outbox(path)


# ---------------------------------------------------------------------------- bulk paths (speed: bench/mqtt.py)


def test_put_pending_ack_and_put_many_in_bulk(tmp_path: Path) -> None:
    n = 2_000
    payload = {"stream": "cam0", "model": "face_detection@1", "ts": 1_700_000_000.123, "boxes": [[0.1, 0.2, 0.3, 0.4]]}
    with Outbox(tmp_path / "o.db") as ob:
        firsts = [ob.put("result", TOPIC, payload) for _ in range(n)]
        assert firsts == list(range(1, n + 1))
        msgs = ob.pending(limit=n // 2)
        assert seqs_of(msgs) == list(range(1, n // 2 + 1))
        ob.ack(seqs_of(msgs))
        ob.put_many([("telemetry", "t", payload)] * n)
        assert ob.stats().depth == n + n - n // 2
        assert seqs_of(ob.pending(limit=10 * n)) == list(range(n // 2 + 1, 2 * n + 1))


# ---------------------------------------------------------------------------- refusals and dead letters

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
                       qos INTEGER NOT NULL, retain INTEGER NOT NULL);
CREATE INDEX messages_by_kind ON messages (kind, seq);
INSERT INTO meta VALUES ('last_seq', 7), ('dropped.result', 3), ('dropped.telemetry', 0), ('dropped.event', 0);
INSERT INTO messages VALUES (5, 'result', 't/r', '{"seq":5}', 1, 0), (6, 'event', 't/e', '{"seq":6}', 1, 0);
PRAGMA user_version = 1;
"""


def test_schema_1_outbox_is_upgraded_in_place(tmp_path: Path) -> None:
    """A device updated from an agent with schema version 1 keeps its queue, counters and seqs."""
    path = tmp_path / "outbox.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()
    with Outbox(path) as ob:
        assert seqs_of(ob.pending()) == [5, 6]
        assert ob.stats().dropped["result"] == 3 and ob.stats().dead_lettered == 0
        assert ob.put("result", "t/r", {}) == 8
        assert ob.refuse(5, "Not authorized", max_attempts=1).dead is not None
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == outbox_module.SCHEMA_VERSION
    conn.close()


def test_refused_message_stays_counts_attempts_then_is_dead_lettered(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        seq = ob.put("result", "t/denied", {"n": 1})
        other = ob.put("result", "t/ok", {"n": 2})
        assert ob.refuse(seq, "Not authorized", max_attempts=3) == outbox_module.Refusal(1)
        assert seqs_of(ob.pending()) == [seq, other], "a refused message is not deleted"
    with Outbox(path) as ob:  # the count survives a restart
        assert ob.refuse(seq, "Not authorized", max_attempts=3).attempts == 2
        outcome = ob.refuse(seq, "Not authorized", max_attempts=3)
        assert outcome.attempts == 3 and outcome.dead is not None
        assert outcome.dead.topic == "t/denied" and orjson.loads(outcome.dead.payload) == {"seq": seq, "n": 1}
        assert seqs_of(ob.pending()) == [other]
        assert ob.stats().depth == 1 and ob.stats().dead_lettered == 1 and ob.stats().dead_letters == 1
        assert ob.refuse(seq, "again", max_attempts=3) == outbox_module.Refusal(0), "unknown seq"
        assert [d.seq for d in ob.dead_letters()] == [seq] and ob.dead_letters()[0].reason == "Not authorized"
        assert [m.seq for m in ob.get([other, seq, 999])] == [other]
    with Outbox(path) as ob:
        assert ob.stats().dead_lettered == 1 and ob.stats().last_seq == other
        assert ob.put("event", "t/e", {}) == other + 1, "a dead-lettered seq is never reused"


def test_dead_letter_table_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "DEAD_LETTER_KEEP", 5)
    with Outbox(tmp_path / "outbox.db") as ob:
        seqs = ob.put_many([("result", "t/denied", {"i": i}) for i in range(12)])
        for seq in seqs:
            ob.refuse(seq, "Not authorized", max_attempts=1)
        assert ob.stats().dead_lettered == 12 and ob.stats().dead_letters == 5
        assert [d.seq for d in ob.dead_letters()] == seqs[::-1][:5], "the newest are kept"
        assert ob.stats().depth == 0 and ob.stats().bytes == 0
