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
#: Devices per gap lookup (an OR of per-device seq ranges; SQLite parses a chain of ORs as a tree at most
#: 1,000 deep).
FILL_LOOKUP_DEVICES = 100
#: A JSON parameter whose None is SQL NULL (the column type writes None as JSON ``null``), for COALESCE.
_JSON_OR_NULL = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


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
            if states:
                self._apply_states(conn, [states[d] for d in sorted(states)], now)
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
        fills: dict[str, list[int]] = {}
        for device_id in sorted(touched):
            row = current[device_id]
            seqs = new_by_device.get(device_id, [])
            max_seq = int(row.max_seq)
            opened, new_max = open_gaps(max_seq, seqs, first_contact=max_seq == 0 and row.stored == 0)
            gap_rows += [{"device_id": device_id, "first_seq": a, "last_seq": b, "detected_at": now} for a, b in opened]
            out.gaps_opened += len(opened)
            late = [q for q in seqs if q <= max_seq]
            if late:
                fills[device_id] = late
            out.stored += len(seqs)
            duplicates = seen_by_device.get(device_id, 0) - len(seqs)
            out.duplicates += duplicates
            updates.append({"b_id": device_id, "b_max": new_max, "b_seen": now, "b_stored": len(seqs),
                            "b_dup": duplicates, "b_rej": counters.rejected.get(device_id, 0),
                            "b_drop": counters.dropped.get(device_id, 0)})
        if fills:
            out.gaps_filled += self._fill(conn, fills)
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

    def _fill(self, conn: sa.Connection, fills: dict[str, list[int]]) -> int:
        """Shrink or split the gaps that late seqs (``fills``: device -> seqs at or below its max_seq) fall in;
        returns how many seqs filled one.

        A few statements per batch whatever the number of devices: with several instances on a shared
        subscription each gets every other message of a device, so most batches fill gaps of most devices,
        and all of it runs under the devices' row locks, which the other instances are waiting for.
        """
        g = s.gaps
        devices = sorted(fills)
        found: list[Any] = []
        for i in range(0, len(devices), FILL_LOOKUP_DEVICES):
            ranges = [sa.and_(g.c.device_id == dev, g.c.first_seq <= max(fills[dev]), g.c.last_seq >= min(fills[dev]))
                      for dev in devices[i:i + FILL_LOOKUP_DEVICES]]
            found += conn.execute(sa.select(g.c.id, g.c.device_id, g.c.first_seq, g.c.last_seq, g.c.detected_at)
                                  .where(sa.or_(*ranges))).all()
        filled = 0
        stale: list[int] = []
        rest: list[dict[str, Any]] = []
        for row in found:
            inside = [q for q in fills[row.device_id] if row.first_seq <= q <= row.last_seq]
            if not inside:
                continue
            filled += len(set(inside))
            stale.append(row.id)
            rest += [{"device_id": row.device_id, "first_seq": a, "last_seq": b, "detected_at": row.detected_at}
                     for a, b in fill_gaps([(row.first_seq, row.last_seq)], inside)]
        if stale:
            conn.execute(sa.delete(g).where(g.c.id.in_(stale)))
        if rest:
            conn.execute(sa.insert(g), rest)
        return filled

    def _apply_states(self, conn: sa.Connection, records: Sequence[StateRecord], now: float) -> None:
        """Each device's last state of the batch, in five statements whatever the number of devices: every
        instance writes every state (the state topic is not shared) and devices republish it with each
        telemetry sample. A field the state leaves out keeps its value (the Last Will has none)."""
        d, g, m = s.devices, s.device_groups, s.device_models
        conn.execute(sa.update(d).where(d.c.id == sa.bindparam("b_id")).values(
            online=sa.bindparam("b_online"), state=sa.bindparam("b_state", type_=s.Json), state_at=now,
            # an offline state may be the broker speaking (Last Will), not the device: last_seen stays
            last_seen=sa.func.coalesce(sa.bindparam("b_seen", type_=s.Time), d.c.last_seen),
            agent_version=sa.func.coalesce(sa.bindparam("b_version", type_=sa.String()), d.c.agent_version),
            profile=sa.func.coalesce(sa.bindparam("b_profile", type_=sa.String()), d.c.profile),
            health=sa.func.coalesce(sa.bindparam("b_health", type_=_JSON_OR_NULL), d.c.health),
            started_at=sa.func.coalesce(sa.bindparam("b_started", type_=s.Time), d.c.started_at)), [
            {"b_id": r.device_id, "b_online": r.state.online, "b_state": r.payload,
             "b_seen": now if r.state.online else None, "b_version": r.state.agent_version,
             "b_profile": r.state.profile, "b_health": r.state.health, "b_started": r.state.started_at}
            for r in records])
        grouped = [r for r in records if r.state.groups is not None]
        if grouped:
            conn.execute(sa.delete(g).where(g.c.device_id.in_([r.device_id for r in grouped])))
            members = [{"device_id": r.device_id, "group": name}
                       for r in grouped for name in sorted(set(r.state.groups or ()))]
            if members:
                conn.execute(sa.insert(g), members)
        listed = [r for r in records if r.state.models is not None]
        if listed:
            conn.execute(sa.delete(m).where(m.c.device_id.in_([r.device_id for r in listed])))
            served: list[dict[str, Any]] = [
                {"device_id": r.device_id, "name": x.name, "version": x.version, "runtime": x.runtime,
                 "delegate": x.delegate}
                for r in listed for x in {(x.name, x.version): x for x in r.state.models or ()}.values()]
            if served:
                conn.execute(sa.insert(m), served)

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

