"""The persistent outbox: store-and-forward queue for device-originated MQTT messages.

Every result, telemetry sample and event is written to SQLite (WAL) before it is sent and
deleted only when the broker acknowledges it (PUBACK), so nothing is lost across broker
outages, agent restarts or SIGKILL, and replay is in ``seq`` order. The queue is bounded on
disk; when full it drops the least valuable, oldest messages first (results, then
telemetry, then events) and counts every drop per kind in a persisted counter. A message
the broker refuses (an MQTT 5 PUBACK with a failure reason code) is kept and retried; after
too many refusals it moves to a bounded dead-letter table, counted as well.

This module owns one SQLite file and nothing else: it does not speak MQTT and must not
import from ``agent``. One ``Outbox`` object per file; it is safe to share between threads.
Schema, drop policy and durability modes are described in ``docs/outbox.md``.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import orjson
import structlog

from cloud_sync.errors import OutboxError

log = structlog.get_logger(__name__)

Kind = Literal["result", "telemetry", "event"]

#: Every kind, in drop order: results go first, events last.
KINDS: Final[tuple[Kind, ...]] = ("result", "telemetry", "event")
#: Returned instead of a seq when the new message itself was dropped (queue or disk full).
DROPPED: Final = -1
#: ``Outbox(MEMORY)`` keeps the queue in memory only: for the fleet simulator, never a device.
MEMORY: Final = ":memory:"
SCHEMA_VERSION: Final = 2
#: Refused messages kept in the dead-letter table (the oldest beyond go; the counter keeps counting).
DEAD_LETTER_KEEP: Final = 1000

_RANK: Final[dict[str, int]] = {kind: rank for rank, kind in enumerate(KINDS)}
_SYNC_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_SQLITE_FULL: Final = 13
_LOG_INTERVAL_S: Final = 5.0
_WAL_SIZE_LIMIT: Final = 8 * 1024 * 1024
# ack() deletes through one constant statement with this many placeholders, padded with
# seq 0 (never assigned), so it is prepared once and stays under the 999-variable limit
# of older SQLite builds.
_ACK_CHUNK: Final = 500
_IN_CHUNK: Final = ",".join("?" * _ACK_CHUNK)
_ORJSON_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    seq      INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    qos      INTEGER NOT NULL,
    retain   INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_kind ON messages (kind, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq      INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    reason   TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    at       REAL NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES
    ('last_seq', 0), ('dropped.result', 0), ('dropped.telemetry', 0), ('dropped.event', 0), ('dead_lettered', 0);
"""
# Version 1 had no refusal count and no dead letters.
_MIGRATE_FROM_1: Final = "ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;"
_OUR_TABLES: Final = frozenset({"meta", "messages", "messages_by_kind", "dead_letters"})
_MESSAGE_COLUMNS: Final = {1: ["seq", "kind", "topic", "payload", "qos", "retain"],
                           2: ["seq", "kind", "topic", "payload", "qos", "retain", "attempts"]}

_INSERT: Final = "INSERT INTO messages (seq, kind, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?, ?)"
_SET_META: Final = "UPDATE meta SET value = ? WHERE key = ?"
_SELECT_PENDING: Final = (
    "SELECT seq, kind, topic, payload, qos, retain FROM messages WHERE seq > ? ORDER BY seq LIMIT ?"
)
_INSERT_DEAD: Final = (
    "INSERT OR REPLACE INTO dead_letters (seq, kind, topic, payload, reason, attempts, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_ONE: Final = "SELECT seq, kind, topic, payload, qos, retain, attempts FROM messages WHERE seq = ?"
_OLDEST_OF_KIND: Final = "SELECT seq, length(payload) FROM messages WHERE kind = ? ORDER BY seq"
_DELETE_OLDEST: Final = "DELETE FROM messages WHERE kind = ? AND seq <= ?"
# Only a constant run of "?" placeholders is interpolated here: no data ever reaches the SQL text.
_SIZE_OF_SEQS: Final = f"SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM messages WHERE seq IN ({_IN_CHUNK})"  # noqa: S608
_DELETE_SEQS: Final = f"DELETE FROM messages WHERE seq IN ({_IN_CHUNK})"  # noqa: S608


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message, as handed to the sender."""

    seq: int
    kind: Kind
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class DeadLetter:
    """A message the broker kept refusing, moved out of the queue (``dead_letters`` table)."""

    seq: int
    kind: Kind
    topic: str
    payload: bytes
    reason: str
    attempts: int
    at: float


@dataclass(frozen=True)
class Refusal:
    """What :meth:`Outbox.refuse` did: the message's refusals so far, and its dead letter if it moved."""

    attempts: int
    dead: DeadLetter | None = None


@dataclass(frozen=True)
class OutboxStats:
    """A snapshot of the queue for telemetry and ``status``."""

    depth: int
    bytes: int
    last_seq: int
    dropped: dict[str, int]
    dead_lettered: int = 0  # messages ever moved to the dead-letter table
    dead_letters: int = 0  # of those, still kept there (at most DEAD_LETTER_KEEP)

    def to_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "bytes": self.bytes, "last_seq": self.last_seq, "dropped": dict(self.dropped),
                "dead_lettered": self.dead_lettered, "dead_letters": self.dead_letters}


# (kind, topic, JSON body without "seq", qos, retain), validated and serialized outside the lock.
_Item = tuple[str, str, bytes, int, bool]


class Outbox:
    """A bounded, durable FIFO of device-originated messages in one SQLite file.

    ``put`` stores a message and returns its ``seq``; the sender reads ``pending`` and calls
    ``ack`` once the broker has acknowledged. Calls are serialized by one lock, so the
    asyncio thread and a sender thread can share the object.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_messages: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        synchronous: str = "NORMAL",
        max_pages: int | None = None,
    ) -> None:
        """Open (or create) the outbox at ``path``; its parent directory is created.

        ``path`` may be :data:`MEMORY` (``":memory:"``): same queue, nothing survives the
        process. The fleet simulator uses it; a device never does.

        ``synchronous="NORMAL"`` survives process crashes and SIGKILL; ``"FULL"`` also
        survives power loss at the cost of an fsync per ``put``. ``max_pages`` caps the
        database file (``PRAGMA max_page_count``): a knob for tests and operators to make
        "disk full" happen early.

        Raises:
            ValueError: a bound or ``synchronous`` is invalid.
            OutboxError: the file cannot be created or opened, is not an outbox database,
                or is corrupt. The file is left untouched for the daemon to decide.
        """
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be positive")
        sync = synchronous.upper()
        if sync not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {sorted(_SYNC_MODES)}, not {synchronous!r}")
        if max_pages is not None and max_pages < 1:
            raise ValueError("max_pages must be positive")
        self.path = Path(path)
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        # Make room in chunks so a full queue costs one DELETE per ~1% of traffic, not per put.
        self._chunk = max(1, max_messages // 100)
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._dropped_dirty = False  # counted in memory, not yet persisted (disk was full)
        self._unlogged: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._last_drop_log = -math.inf
        self._last_full_log = -math.inf
        self._dead_lettered = 0
        self._dead_letters = 0
        self._conn: sqlite3.Connection | None = self._open(sync, max_pages)
        log.info(
            "outbox.opened",
            path=str(self.path),
            depth=self._depth,
            bytes=self._bytes,
            last_seq=self._last_seq,
            dropped=dict(self._dropped),
            dead_lettered=self._dead_lettered,
            synchronous=sync,
        )

    # ------------------------------------------------------------------ public API

    def put(self, kind: Kind, topic: str, payload: Mapping[str, Any], *, qos: int = 1, retain: bool = False) -> int:
        """Store one message; return its seq, or ``DROPPED`` (-1) if it had to be dropped.

        The stored JSON is ``payload`` plus ``"seq"`` (a ``"seq"`` key in ``payload`` is
        replaced). Never raises for a full queue or a full disk.

        Raises:
            ValueError: unknown kind, bad qos or empty topic.
            TypeError: ``payload`` is not JSON-serializable (numpy values are fine).
            OutboxError: the outbox is closed or SQLite failed for another reason.
        """
        return self._write([_prepare(kind, topic, payload, qos, retain)])[0]

    def put_many(self, items: Iterable[tuple[Kind, str, Mapping[str, Any]]], *, qos: int = 1) -> list[int]:
        """Store ``(kind, topic, payload)`` items in one transaction; return their seqs (``DROPPED`` for drops).

        Raises:
            ValueError, TypeError, OutboxError: as ``put``; on error nothing is stored.
        """
        batch = [_prepare(kind, topic, payload, qos, False) for kind, topic, payload in items]
        return self._write(batch) if batch else []

    def pending(self, after_seq: int = 0, limit: int = 500) -> list[OutboxMessage]:
        """Return up to ``limit`` stored messages with ``seq > after_seq``, oldest first.

        Raises:
            OutboxError: the outbox is closed or the database cannot be read.
        """
        if limit <= 0:
            return []
        with self._lock:
            conn = self._require_open()
            try:
                rows = conn.execute(_SELECT_PENDING, (after_seq, limit)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read pending messages: {exc}", path=str(self.path)) from exc
        return [
            OutboxMessage(seq, kind, topic, payload, qos, bool(retain))
            for seq, kind, topic, payload, qos, retain in rows
        ]

    def ack(self, seqs: Iterable[int]) -> None:
        """Delete acknowledged messages in one transaction; unknown seqs are ignored.

        If the disk is too full even to delete, the messages stay and will be sent again
        after a restart (at-least-once); this is logged, not raised.

        Raises:
            OutboxError: the outbox is closed or SQLite failed for a reason other than disk full.
        """
        wanted = sorted({int(s) for s in seqs if s > 0})
        if not wanted:
            return
        with self._lock:
            conn = self._require_open()
            removed = removed_bytes = 0
            try:
                conn.execute("BEGIN IMMEDIATE")
                for start in range(0, len(wanted), _ACK_CHUNK):
                    chunk = wanted[start : start + _ACK_CHUNK]
                    chunk += [0] * (_ACK_CHUNK - len(chunk))
                    n, size = conn.execute(_SIZE_OF_SEQS, chunk).fetchone()
                    if n:
                        conn.execute(_DELETE_SEQS, chunk)
                        removed += n
                        removed_bytes += size
                if removed:
                    conn.execute(_SET_META, (self._last_seq, "last_seq"))
                if self._dropped_dirty:
                    self._save_dropped(conn, self._dropped)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                if not _is_full(exc):
                    raise OutboxError(f"ack failed: {exc}", path=str(self.path)) from exc
                self._log_disk_full(exc, during="ack")
                return
            self._dropped_dirty = False
            self._depth -= removed
            self._bytes -= removed_bytes

    def stats(self) -> OutboxStats:
        """Return depth, payload bytes, last seq and per-kind drop counters (in memory, no I/O)."""
        with self._lock:
            return OutboxStats(self._depth, self._bytes, self._last_seq, dict(self._dropped), self._dead_lettered,
                               self._dead_letters)

    def get(self, seqs: Iterable[int]) -> list[OutboxMessage]:
        """The stored messages among ``seqs``, oldest first (unknown seqs are left out).

        Raises:
            OutboxError: the outbox is closed or the database cannot be read.
        """
        out = []
        with self._lock:
            conn = self._require_open()
            try:
                for seq in sorted(set(seqs)):
                    row = conn.execute(_SELECT_ONE, (seq,)).fetchone()
                    if row is not None:
                        out.append(OutboxMessage(row[0], row[1], row[2], row[3], row[4], bool(row[5])))
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read messages: {exc}", path=str(self.path)) from exc
        return out

    def refuse(self, seq: int, reason: str, *, max_attempts: int) -> Refusal:
        """The broker refused message ``seq``: count it; at ``max_attempts`` move it to the dead letters.

        The count is persisted, so refusals add up across reconnects and restarts. An unknown
        seq (acknowledged or dropped meanwhile) gives ``Refusal(0)``. A full disk is logged and
        the refusal not counted (the message stays and is retried).

        Raises:
            OutboxError: the outbox is closed or SQLite failed for a reason other than disk full.
        """
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute(_SELECT_ONE, (seq,)).fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    return Refusal(0)
                attempts = int(row[6]) + 1
                dead = None
                if attempts < max_attempts:
                    conn.execute("UPDATE messages SET attempts = ? WHERE seq = ?", (attempts, seq))
                else:
                    dead = DeadLetter(seq, row[1], row[2], row[3], reason, attempts, time.time())
                    conn.execute(_INSERT_DEAD, (seq, dead.kind, dead.topic, dead.payload, reason, attempts, dead.at))
                    conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                    conn.execute("DELETE FROM dead_letters WHERE seq NOT IN "
                                 "(SELECT seq FROM dead_letters ORDER BY seq DESC LIMIT ?)", (DEAD_LETTER_KEEP,))
                    conn.execute(_SET_META, (self._dead_lettered + 1, "dead_lettered"))
                    conn.execute(_SET_META, (self._last_seq, "last_seq"))
                    kept = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                if not _is_full(exc):
                    raise OutboxError(f"refuse failed: {exc}", path=str(self.path)) from exc
                self._log_disk_full(exc, during="refuse")
                return Refusal(0)
            if dead is not None:
                self._dead_lettered += 1
                self._dead_letters = int(kept)
                self._depth -= 1
                self._bytes -= len(dead.payload)
                log.warning("outbox.dead_lettered", path=str(self.path), seq=seq, kind=dead.kind, topic=dead.topic,
                            reason=reason, attempts=attempts)
            return Refusal(attempts, dead)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first.

        Raises:
            OutboxError: the outbox is closed or the database cannot be read.
        """
        with self._lock:
            conn = self._require_open()
            try:
                rows = conn.execute("SELECT seq, kind, topic, payload, reason, attempts, at FROM dead_letters "
                                    "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read dead letters: {exc}", path=str(self.path)) from exc
        return [DeadLetter(*row) for row in rows]

    def close(self) -> None:
        """Flush the drop log and close the database; idempotent."""
        with self._lock:
            if self._conn is None:
                return
            self._flush_drop_log(time.monotonic())
            conn, self._conn = self._conn, None
            self._try_save_meta(conn)  # tidy for inspection; correctness does not depend on it
            conn.close()
        log.info("outbox.closed", path=str(self.path), depth=self._depth, last_seq=self._last_seq)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ opening

    def _open(self, sync: str, max_pages: int | None) -> sqlite3.Connection:
        where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create directory: {exc}", path=where) from exc
        if self.path.exists() and not self.path.is_file():
            raise OutboxError("not a regular file", path=where)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            # In memory (the simulator: thousands of queues) no statement cache: the 500-placeholder ack
            # statements would hold ~200 KiB per queue; a device keeps them prepared.
            cached = 0 if str(self.path) == MEMORY else 128
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False,
                                   cached_statements=cached)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open: {exc}", path=where) from exc
        try:
            self._prepare_db(conn, sync, max_pages)
        except OutboxError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError(f"unreadable or corrupt database: {exc}", path=where) from exc
        return conn

    def _prepare_db(self, conn: sqlite3.Connection, sync: str, max_pages: int | None) -> None:
        where = str(self.path)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal" and not (str(self.path) == MEMORY and str(mode).lower() == "memory"):
            raise OutboxError(f"cannot switch to WAL mode (got {mode!r})", path=where)
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(f"schema version {version} is newer than this agent ({SCHEMA_VERSION})", path=where)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
        if names - _OUR_TABLES:
            raise OutboxError(f"not an outbox database (has {sorted(names - _OUR_TABLES)})", path=where)
        migrate = ""
        if "messages" in names:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
            shapes = [_MESSAGE_COLUMNS[version]] if version in _MESSAGE_COLUMNS else list(_MESSAGE_COLUMNS.values())
            if columns not in shapes:
                raise OutboxError(f"not an outbox database (messages has columns {columns})", path=where)
            if columns == _MESSAGE_COLUMNS[1]:
                migrate = _MIGRATE_FROM_1
        conn.executescript(f"BEGIN IMMEDIATE; {migrate} {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        # Catch corruption now, when the daemon can still move the file aside, rather than
        # in the middle of sending. Measured at ~0.1 s for a full 64 MiB outbox.
        # (A new in-memory queue cannot be corrupt, and the check's statement holds ~100 KiB.)
        problems = ["ok"] if str(self.path) == MEMORY else [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise OutboxError(f"corrupt database: {'; '.join(problems)}", path=where)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        depth, size, max_seq = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0), COALESCE(MAX(seq), 0) FROM messages"
        ).fetchone()
        self._depth, self._bytes = int(depth), int(size)
        # meta.last_seq is written by every transaction that deletes rows (ack, drops), so
        # together with the highest stored seq it covers every seq ever committed; a put
        # does not need to write it (that costs ~25% of put throughput).
        self._last_seq = max(int(meta.get("last_seq", 0)), int(max_seq))
        for kind in KINDS:
            self._dropped[kind] = int(meta.get(f"dropped.{kind}", 0))
        self._dead_lettered = int(meta.get("dead_lettered", 0))
        self._dead_letters = int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        if max_pages is not None:
            # SQLite never sets it below the current size of the file.
            conn.execute(f"PRAGMA max_page_count={int(max_pages)}")

    # ------------------------------------------------------------------ writing

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("closed", path=str(self.path))
        return self._conn

    def _write(self, batch: list[_Item]) -> list[int]:
        with self._lock:
            conn = self._require_open()
            try:
                return self._insert(conn, batch)
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise OutboxError(f"write failed: {exc}", path=str(self.path)) from exc
                self._log_disk_full(exc, during="put")
            # Disk full: drop the oldest droppable messages (same policy), then retry once.
            try:
                kind = max(batch, key=lambda item: _RANK[item[0]])[0]
                self._free_space(conn, kind, sum(len(item[2]) for item in batch))
                return self._insert(conn, batch)
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise OutboxError(f"write failed: {exc}", path=str(self.path)) from exc
            delta: dict[str, int] = dict.fromkeys(KINDS, 0)
            for item in batch:
                delta[item[0]] += 1
            self._count_drops(delta)
            self._try_save_meta(conn)
            return [DROPPED] * len(batch)

    def _insert(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[int]:
        """Insert ``batch`` in one transaction, making room first when a bound would be exceeded."""
        depth, size, last = self._depth, self._bytes, self._last_seq
        delta: dict[str, int] = dict.fromkeys(KINDS, 0)
        seqs: list[int] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind, topic, body, qos, retain in batch:
                seq = last + 1
                payload = _with_seq(body, seq)
                need_n = depth + 1 - self._max_messages
                need_b = size + len(payload) - self._max_bytes
                if need_n > 0 or need_b > 0:
                    freed = None if len(payload) > self._max_bytes else self._make_room(conn, kind, need_n, need_b)
                    if freed is None:
                        delta[kind] += 1
                        seqs.append(DROPPED)
                        continue
                    for k, (n, b) in freed.items():
                        delta[k] += n
                        depth -= n
                        size -= b
                conn.execute(_INSERT, (seq, kind, topic, payload, qos, retain))
                last, depth, size = seq, depth + 1, size + len(payload)
                seqs.append(seq)
            if any(delta.values()):
                # Rows may have been deleted: record last_seq so it can never go back.
                conn.execute(_SET_META, (last, "last_seq"))
            if self._dropped_dirty or any(delta.values()):
                self._save_dropped(conn, {k: self._dropped[k] + delta[k] for k in KINDS})
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._depth, self._bytes, self._last_seq = depth, size, last
        self._dropped_dirty = False
        if any(delta.values()):
            self._count_drops(delta)
        return seqs

    def _make_room(
        self, conn: sqlite3.Connection, kind: str, need_n: int, need_b: int, *, best_effort: bool = False
    ) -> dict[str, tuple[int, int]] | None:
        """Delete the oldest droppable messages so ``need_n`` messages and ``need_b`` bytes fit.

        A new message may only push out kinds that are dropped no later than its own
        (a result never evicts telemetry or events). Deletes at least a chunk when it can,
        one statement per kind. Returns ``{kind: (count, bytes)}`` deleted, or None (and
        deletes nothing) when the room cannot be made: the new message must be dropped.
        With ``best_effort`` it deletes what it can instead of nothing.
        """
        want_n = max(need_n, self._chunk)
        got_n = got_b = 0
        plan: list[tuple[str, int, int, int]] = []  # kind, up to seq, count, bytes
        for victim in KINDS[: _RANK[kind] + 1]:
            if got_n >= want_n and got_b >= need_b:
                break
            upto, n, b = 0, 0, 0
            cur = conn.execute(_OLDEST_OF_KIND, (victim,))
            try:
                for seq, length in cur:
                    upto, n, b = seq, n + 1, b + length
                    if got_n + n >= want_n and got_b + b >= need_b:
                        break
            finally:
                cur.close()
            if n:
                plan.append((victim, upto, n, b))
                got_n, got_b = got_n + n, got_b + b
        if not best_effort and (got_n < need_n or got_b < need_b):
            return None
        for name, upto, _, _ in plan:
            conn.execute(_DELETE_OLDEST, (name, upto))
        return {name: (n, b) for name, _, n, b in plan}

    def _free_space(self, conn: sqlite3.Connection, kind: str, size: int) -> None:
        """After SQLITE_FULL: delete the oldest messages droppable for ``kind`` to make ``size`` bytes fit.

        Deleting a row frees space inside its page, but only emptied pages can hold new rows
        at the end of the table, so free a chunk and at least a few pages more than needed.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            freed = self._make_room(conn, kind, 1, size + 8 * self._page_size, best_effort=True) or {}
            delta: dict[str, int] = {k: freed.get(k, (0, 0))[0] for k in KINDS}
            conn.execute(_SET_META, (self._last_seq, "last_seq"))
            self._save_dropped(conn, {k: self._dropped[k] + delta[k] for k in KINDS})
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._dropped_dirty = False
        for n, b in freed.values():
            self._depth -= n
            self._bytes -= b
        self._count_drops(delta)

    # ------------------------------------------------------------------ counters and logs

    def _save_dropped(self, conn: sqlite3.Connection, totals: Mapping[str, int]) -> None:
        conn.executemany(_SET_META, [(totals[kind], f"dropped.{kind}") for kind in KINDS])

    def _try_save_meta(self, conn: sqlite3.Connection) -> None:
        """Persist last_seq and the counters on their own; if that fails they are saved with the next write."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_SET_META, (self._last_seq, "last_seq"))
            self._save_dropped(conn, self._dropped)
            conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(conn)
            self._dropped_dirty = True
        else:
            self._dropped_dirty = False

    def _count_drops(self, delta: Mapping[str, int]) -> None:
        for kind, n in delta.items():
            self._dropped[kind] += n
            self._unlogged[kind] += n
        now = time.monotonic()
        if now - self._last_drop_log >= _LOG_INTERVAL_S:
            self._flush_drop_log(now)

    def _flush_drop_log(self, now: float) -> None:
        if not any(self._unlogged.values()):
            return
        log.warning(
            "outbox.dropped",
            path=str(self.path),
            dropped={k: n for k, n in self._unlogged.items() if n},
            total=dict(self._dropped),
            depth=self._depth,
            bytes=self._bytes,
        )
        self._unlogged = dict.fromkeys(KINDS, 0)
        self._last_drop_log = now

    def _log_disk_full(self, exc: sqlite3.Error, *, during: str) -> None:
        now = time.monotonic()
        if now - self._last_full_log >= _LOG_INTERVAL_S:
            self._last_full_log = now
            log.warning("outbox.disk_full", path=str(self.path), during=during, error=str(exc), depth=self._depth)


def _prepare(kind: str, topic: str, payload: Mapping[str, Any], qos: int, retain: bool) -> _Item:
    """Validate and serialize outside the lock; ``seq`` is spliced in later (see ``_with_seq``)."""
    if kind not in _RANK:
        raise ValueError(f"unknown outbox kind {kind!r}; expected one of {KINDS}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
    if not topic:
        raise ValueError("topic must not be empty")
    if not isinstance(payload, dict) or "seq" in payload:
        payload = {k: v for k, v in payload.items() if k != "seq"}
    return kind, topic, orjson.dumps(payload, option=_ORJSON_OPTS), qos, bool(retain)


def _with_seq(body: bytes, seq: int) -> bytes:
    """Turn the serialized object ``{...}`` into ``{"seq":N,...}`` without serializing again."""
    if body == b"{}":
        return b'{"seq":%d}' % seq
    return b'{"seq":%d,' % seq + body[1:]


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return bool(code & 0xFF == _SQLITE_FULL)
    return "database or disk is full" in str(exc)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (SQLITE_FULL among them).
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("outbox.rollback_failed")
