"""The write side: one batch of parsed device messages -> one transaction.

Exactly-once storage rests on the unique ``(device_id, seq)`` of each message table and
``INSERT ... ON CONFLICT DO NOTHING RETURNING``: a redelivered message inserts nothing and is counted
as a duplicate. The seqs that did insert drive the per-device gap bookkeeping (:func:`open_gaps`,
:func:`fill_gaps`, pure). Several instances can write at once on PostgreSQL: the device rows are
locked (``FOR UPDATE``, in id order) before their ``max_seq`` and gaps change.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.messages import Record, ResponseRecord, SeqRecord, StateRecord

Range = tuple[int, int]


def open_gaps(max_seq: int, new_seqs: Iterable[int], *, first_contact: bool) -> tuple[list[Range], int]:
    """Gaps opened by seqs above ``max_seq``; returns (ranges, new max_seq).

    On first contact nothing below the first seq counts as missing: the device may have talked long
    before this service existed.
    """
    ranges: list[Range] = []
    prev = max_seq
    for seq in sorted(x for x in set(new_seqs) if x > max_seq):
        if seq > prev + 1 and not (first_contact and prev == max_seq):
            ranges.append((prev + 1, seq - 1))
        prev = seq
    return ranges, prev


def fill_gaps(gaps: Sequence[Range], seqs: Iterable[int]) -> list[Range]:
    """What remains of ``gaps`` once ``seqs`` arrived (ranges split around each filled seq)."""
    filled = sorted(set(seqs))
    out: list[Range] = []
    for first, last in gaps:
        start = first
        for seq in filled:
            if seq < start or seq > last:
                continue
            if seq > start:
                out.append((start, seq - 1))
            start = seq + 1
        if start <= last:
            out.append((start, last))
    return out


@dataclass
class DeviceCounters:
    """Per-device tallies that are not rows: kept with the batch so they land in the same transaction."""

    rejected: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dropped: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __bool__(self) -> bool:
        return bool(self.rejected or self.dropped)


@dataclass
class BatchOutcome:
    stored: int = 0
    duplicates: int = 0
    gaps_opened: int = 0
    gaps_filled: int = 0
    unknown_responses: int = 0
    #: (command id, device id, response payload) for every response stored, in arrival order.
    responses: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


class Store:
    """Writes batches; every method is one transaction and blocks (call it from a thread)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert

    def write_batch(self, records: Sequence[Record], now: float,
                    counters: DeviceCounters | None = None) -> BatchOutcome:
        """Store ``records`` (in arrival order) and per-device counters in one transaction.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: nothing was stored; ``db.TRANSIENT`` ones are worth a retry.
        """
        out = BatchOutcome()
        counters = counters or DeviceCounters()
        seq_records = [r for r in records if isinstance(r, SeqRecord)]
        states = {r.device_id: r for r in records if isinstance(r, StateRecord)}  # the last one wins
        responses = [r for r in records if isinstance(r, ResponseRecord)]
        touched = {r.device_id for r in seq_records} | set(states) | set(counters.rejected) | set(counters.dropped)
        touched |= {r.device_id for r in responses if r.device_id is not None}
        with self.db.write() as conn:
            if touched:
                conn.execute(self._insert(s.devices).on_conflict_do_nothing(index_elements=["id"]),
                             [{"id": d, "first_seen": now, "last_seen": now} for d in sorted(touched)])
            new = self._insert_seq_rows(conn, seq_records, now)
            self._update_devices(conn, touched, seq_records, new=new, counters=counters, now=now, out=out)
            completions = [r for r in seq_records if r.kind == "event" and r.type == "command.completed"
                           and (r.device_id, r.seq) in new and isinstance(r.payload.get("id"), str)]
            if completions:
                self._complete_commands(conn, completions, now, out)
            for state in states.values():
                self._apply_state(conn, state, now)
            if responses:
                self._store_responses(conn, responses, now, out)
        return out

    # -- pieces of the transaction ------------------------------------------------------------------
    def _insert_seq_rows(self, conn: sa.Connection, records: Sequence[SeqRecord], now: float) -> set[tuple[str, int]]:
        """Insert; returns the (device, seq) pairs that were new."""
        by_kind: dict[str, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
        for r in records:
            row: dict[str, Any] = {"device_id": r.device_id, "seq": r.seq, "ts": r.ts, "received_at": now,
                                   "payload": r.payload}
            if r.kind == "result":
                row["stream"], row["model"] = r.stream, r.model
            elif r.kind == "event":
                row["type"] = r.type
            by_kind[r.kind].setdefault((r.device_id, r.seq), row)  # redelivered within the batch: once
        new: set[tuple[str, int]] = set()
        for kind, rows in by_kind.items():
            table = s.SEQ_TABLES[kind]
            stmt = (self._insert(table).on_conflict_do_nothing(index_elements=["device_id", "seq"])
                    .returning(table.c.device_id, table.c.seq))
            new.update((d, q) for d, q in conn.execute(stmt, list(rows.values())))
        return new

    def _update_devices(self, conn: sa.Connection, touched: set[str], records: Sequence[SeqRecord], *,
                        new: set[tuple[str, int]], counters: DeviceCounters, now: float, out: BatchOutcome) -> None:
        if not touched:
            return
        d = s.devices
        current = {row.id: row for row in conn.execute(
            sa.select(d.c.id, d.c.max_seq, d.c.stored, d.c.telemetry_ts).where(d.c.id.in_(sorted(touched)))
            .order_by(d.c.id).with_for_update())}
        new_by_device: dict[str, list[int]] = defaultdict(list)
        for device_id, seq in new:
            new_by_device[device_id].append(seq)
        seen_by_device: dict[str, int] = defaultdict(int)
        latest_telemetry: dict[str, SeqRecord] = {}
        for r in records:
            seen_by_device[r.device_id] += 1
            if r.kind == "telemetry" and (r.device_id, r.seq) in new:
                best = latest_telemetry.get(r.device_id)
                if best is None or r.ts >= best.ts:
                    latest_telemetry[r.device_id] = r
        gap_rows: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for device_id in sorted(touched):
            row = current[device_id]
            seqs = new_by_device.get(device_id, [])
            max_seq = int(row.max_seq)
            opened, new_max = open_gaps(max_seq, seqs, first_contact=max_seq == 0 and row.stored == 0)
            gap_rows += [{"device_id": device_id, "first_seq": a, "last_seq": b, "detected_at": now} for a, b in opened]
            out.gaps_opened += len(opened)
            fills = [q for q in seqs if q <= max_seq]
            if fills:
                out.gaps_filled += self._fill(conn, device_id, fills)
            out.stored += len(seqs)
            duplicates = seen_by_device.get(device_id, 0) - len(seqs)
            out.duplicates += duplicates
            updates.append({"b_id": device_id, "b_max": new_max, "b_seen": now, "b_stored": len(seqs),
                            "b_dup": duplicates, "b_rej": counters.rejected.get(device_id, 0),
                            "b_drop": counters.dropped.get(device_id, 0)})
        if gap_rows:
            conn.execute(sa.insert(s.gaps), gap_rows)
        conn.execute(sa.update(d).where(d.c.id == sa.bindparam("b_id")).values(
            max_seq=sa.bindparam("b_max"), last_seen=sa.bindparam("b_seen"),
            stored=d.c.stored + sa.bindparam("b_stored"), duplicates=d.c.duplicates + sa.bindparam("b_dup"),
            rejected=d.c.rejected + sa.bindparam("b_rej"), dropped=d.c.dropped + sa.bindparam("b_drop")), updates)
        tele = [{"b_id": r.device_id, "b_t": r.payload, "b_ts": r.ts} for r in latest_telemetry.values()
                if current[r.device_id].telemetry_ts is None or r.ts >= current[r.device_id].telemetry_ts]
        if tele:
            conn.execute(sa.update(d).where(d.c.id == sa.bindparam("b_id")).values(
                telemetry=sa.bindparam("b_t", type_=s.Json), telemetry_ts=sa.bindparam("b_ts")), tele)

    def _fill(self, conn: sa.Connection, device_id: str, seqs: list[int]) -> int:
        """Shrink or split the device's gaps that ``seqs`` fall in; returns how many seqs filled one."""
        g = s.gaps
        rows = conn.execute(sa.select(g.c.id, g.c.first_seq, g.c.last_seq, g.c.detected_at).where(
            g.c.device_id == device_id, g.c.first_seq <= max(seqs), g.c.last_seq >= min(seqs))).all()
        filled = 0
        for row in rows:
            inside = [q for q in seqs if row.first_seq <= q <= row.last_seq]
            if not inside:
                continue
            filled += len(set(inside))
            conn.execute(sa.delete(g).where(g.c.id == row.id))
            rest = fill_gaps([(row.first_seq, row.last_seq)], inside)
            if rest:
                conn.execute(sa.insert(g), [{"device_id": device_id, "first_seq": a, "last_seq": b,
                                             "detected_at": row.detected_at} for a, b in rest])
        return filled

    def _apply_state(self, conn: sa.Connection, record: StateRecord, now: float) -> None:
        st = record.state
        values: dict[str, Any] = {"online": st.online, "state": record.payload, "state_at": now}
        if st.online:  # an offline state may be the broker speaking (Last Will), not the device
            values["last_seen"] = now
        for key in ("agent_version", "profile", "health", "started_at"):
            value = getattr(st, key)
            if value is not None:
                values[key] = value
        conn.execute(sa.update(s.devices).where(s.devices.c.id == record.device_id).values(**values))
        if st.groups is not None:
            conn.execute(sa.delete(s.device_groups).where(s.device_groups.c.device_id == record.device_id))
            if st.groups:
                conn.execute(sa.insert(s.device_groups),
                             [{"device_id": record.device_id, "group": g} for g in sorted(set(st.groups))])
        if st.models is not None:
            conn.execute(sa.delete(s.device_models).where(s.device_models.c.device_id == record.device_id))
            models = {(m.name, m.version): m for m in st.models}
            if models:
                conn.execute(sa.insert(s.device_models), [
                    {"device_id": record.device_id, "name": m.name, "version": m.version, "runtime": m.runtime,
                     "delegate": m.delegate} for m in models.values()])

    def _complete_commands(self, conn: sa.Connection, events: Sequence[SeqRecord], now: float,
                           out: BatchOutcome) -> None:
        """A ``command.completed`` event (outbox: reliable, any instance stores it) finishes the command
        even when its response went to another instance's response topic, or was lost with it."""
        c = s.commands
        for r in events:
            response = {"id": r.payload["id"], "ok": r.payload.get("ok") is True, "status": "done",
                        "error": r.payload.get("error"), "via": "event"}
            done = conn.execute(sa.update(c).where(c.c.id == r.payload["id"], c.c.device_id == r.device_id,
                                                   c.c.status != "done")
                                .values(status="done", ok=response["ok"], response=response, responded_at=now))
            if done.rowcount:
                out.responses.append((r.payload["id"], r.device_id, response))

    def _store_responses(self, conn: sa.Connection, responses: Sequence[ResponseRecord], now: float,
                         out: BatchOutcome) -> None:
        c = s.commands
        ids = sorted({r.command_id for r in responses})
        sent = {row.id: row.device_id for row in conn.execute(sa.select(c.c.id, c.c.device_id).where(c.c.id.in_(ids)))}
        rows: list[dict[str, Any]] = []
        for r in responses:
            # On our response topic the device is the one we sent the command to; on a device's own
            # topic it is that device, and it may only answer commands sent to it.
            device_id = r.device_id if r.device_id is not None else sent.get(r.command_id)
            if device_id is None:
                out.unknown_responses += 1
                continue
            rows.append({"command_id": r.command_id, "device_id": device_id, "status": r.status, "ok": r.ok,
                         "payload": r.payload, "received_at": now})
            out.responses.append((r.command_id, device_id, r.payload))
            if sent.get(r.command_id) != device_id:
                continue
            if r.status == "accepted":
                conn.execute(sa.update(c).where(c.c.id == r.command_id, c.c.status == "sent")
                             .values(status="accepted"))
            else:
                conn.execute(sa.update(c).where(c.c.id == r.command_id).values(
                    status="done", ok=r.ok, response=r.payload, responded_at=now))
        if rows:
            conn.execute(self._insert(s.command_responses).on_conflict_do_nothing(
                index_elements=["command_id", "device_id", "status"]), rows)

