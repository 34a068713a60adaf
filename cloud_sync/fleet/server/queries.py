"""The read side: what the REST API answers, as SQLAlchemy Core queries over a connection.

Every list has a stable order (device id, or row id for message tables) and keyset paging: the
``next`` cursor of a page is passed back as ``cursor``. Filters are bound parameters only. The same
queries run on SQLite and PostgreSQL; the two places where SQL differs (JSON type test, floor) are
in :func:`_metric_value` and :func:`_bucket`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import NotFoundError, RequestError

Order = Literal["asc", "desc"]
METRIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$")


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "next": self.next}


@dataclass(frozen=True)
class RowFilter:
    """Filters shared by results, telemetry and events lists."""

    device: str | None = None
    stream: str | None = None  # results
    type: str | None = None  # events
    since: float | None = None  # device timestamp, inclusive
    until: float | None = None  # exclusive


def id_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    if not cursor.isdigit() or len(cursor) > 19:
        raise RequestError("cursor: expected the 'next' value of a previous page")
    return int(cursor)


# -- devices ------------------------------------------------------------------------------------------------
_DEVICE_COLUMNS = ("id", "online", "first_seen", "last_seen", "state_at", "started_at", "agent_version", "profile",
                   "health", "max_seq")
_COUNTERS = ("stored", "duplicates", "dropped", "rejected")


def groups_and_models(conn: sa.Connection, ids: list[str]) -> tuple[dict[str, list[str]],
                                                                    dict[str, list[dict[str, Any]]]]:
    """The groups and the models of each of ``ids`` (two queries, whatever their number)."""
    groups: dict[str, list[str]] = {i: [] for i in ids}
    models: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        g, m = s.device_groups, s.device_models
        for row in conn.execute(sa.select(g.c.device_id, g.c.group).where(g.c.device_id.in_(ids))
                                .order_by(g.c.device_id, g.c.group)):
            groups[row.device_id].append(row.group)
        for row in conn.execute(sa.select(m).where(m.c.device_id.in_(ids)).order_by(m.c.device_id, m.c.name,
                                                                                      m.c.version)):
            models[row.device_id].append({"name": row.name, "version": row.version, "runtime": row.runtime,
                                          "delegate": row.delegate})
    return groups, models


def _device_summaries(conn: sa.Connection, rows: list[Any]) -> list[dict[str, Any]]:
    groups, models = groups_and_models(conn, [r.id for r in rows])
    # by position, not name: a 1,000-device page reads 16,000 fields (getattr on a Row costs ~4x)
    if not rows:
        return []
    at = {k: i for i, k in enumerate(rows[0]._fields)}
    cols = [(k, at[k]) for k in _DEVICE_COLUMNS]
    counters = [(k, at[k]) for k in _COUNTERS]
    return [{**{k: r[i] for k, i in cols}, "groups": groups[r.id], "models": models[r.id],
             "counters": {k: r[i] for k, i in counters}} for r in rows]


def list_devices(conn: sa.Connection, *, group: str | None = None, online: bool | None = None,
                 model: str | None = None, version: str | None = None, cursor: str | None = None,
                 limit: int) -> Page:
    """Devices by id; ``model`` is ``NAME`` or ``NAME@VERSION``; ``version`` is the agent version."""
    d = s.devices
    # not the whole row: the last state and telemetry (JSON, possibly large) are for one device's page
    q = sa.select(*(d.c[name] for name in (*_DEVICE_COLUMNS, *_COUNTERS))).order_by(d.c.id).limit(limit + 1)
    if cursor:
        q = q.where(d.c.id > cursor)
    if group is not None:
        g = s.device_groups
        q = q.where(sa.exists().where(g.c.device_id == d.c.id, g.c.group == group))
    if online is not None:
        q = q.where(d.c.online.is_(online))
    if version is not None:
        q = q.where(d.c.agent_version == version)
    if model is not None:
        m = s.device_models
        name, sep, mversion = model.partition("@")
        cond = [m.c.device_id == d.c.id, m.c.name == name]
        if sep:
            if not mversion.isdigit() or len(mversion) > 18:
                raise RequestError("model: expected NAME or NAME@VERSION with a numeric version")
            cond.append(m.c.version == int(mversion))
        q = q.where(sa.exists().where(*cond))
    rows = list(conn.execute(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(_device_summaries(conn, rows), rows[-1].id if more else None)


def get_device(conn: sa.Connection, device_id: str) -> dict[str, Any]:
    """One device with its full state, latest telemetry and gap summary. Raises: NotFoundError."""
    d, g = s.devices, s.gaps
    row = conn.execute(sa.select(d).where(d.c.id == device_id)).first()
    if row is None:
        raise NotFoundError(f"no device {device_id!r}")
    gaps = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(g.c.last_seq - g.c.first_seq + 1), 0))
                        .where(g.c.device_id == device_id)).one()
    return {**_device_summaries(conn, [row])[0], "state": row.state,
            "telemetry": {"ts": row.telemetry_ts, "payload": row.telemetry} if row.telemetry is not None else None,
            "gaps": {"open": int(gaps[0]), "missing": int(gaps[1])}}


# -- results, telemetry, events -------------------------------------------------------------------------------
def _rows_query(table: sa.Table, f: RowFilter, cursor: int | None, order: Order) -> sa.Select[Any]:
    q = sa.select(table)
    if f.device is not None:
        q = q.where(table.c.device_id == f.device)
    if f.stream is not None and "stream" in table.c:
        q = q.where(table.c.stream == f.stream)
    if f.type is not None and "type" in table.c:
        q = q.where(table.c.type == f.type)
    if f.since is not None:
        q = q.where(table.c.ts >= f.since)
    if f.until is not None:
        q = q.where(table.c.ts < f.until)
    if cursor is not None:
        q = q.where(table.c.id > cursor if order == "asc" else table.c.id < cursor)
    return q.order_by(table.c.id.asc() if order == "asc" else table.c.id.desc())


def _row_dict(row: Any) -> dict[str, Any]:
    return {str(k): v for k, v in row._mapping.items()}  # plain str keys (SQLAlchemy's are a subclass)


def list_rows(conn: sa.Connection, table: sa.Table, f: RowFilter, *, cursor: str | None = None,
              limit: int, order: Order = "asc") -> Page:
    rows = list(conn.execute(_rows_query(table, f, id_cursor(cursor), order).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([_row_dict(r) for r in rows], str(rows[-1].id) if more else None)


def iter_rows(db: Database, table: sa.Table, f: RowFilter, *, max_rows: int, chunk: int = 1000,
              order: Order = "asc", start: str | None = None) -> Iterator[dict[str, Any]]:
    """Every matching row after ``start`` (a cursor) up to ``max_rows``, ``chunk`` rows per read."""
    cursor = id_cursor(start)
    sent = 0
    while sent < max_rows:
        with db.read() as conn:
            rows = list(conn.execute(_rows_query(table, f, cursor, order).limit(min(chunk, max_rows - sent))))
        for row in rows:
            yield _row_dict(row)
        sent += len(rows)
        if len(rows) < chunk:
            return
        cursor = int(rows[-1].id)


# -- telemetry series ------------------------------------------------------------------------------------------
def _path(metric: str) -> tuple[str | int, ...]:
    if not METRIC_RE.match(metric):
        raise RequestError("metric: expected a dotted path into the telemetry payload, e.g. system.cpu_percent")
    return tuple(int(p) if p.isdigit() else p for p in metric.split("."))


def _metric_value(dialect: str, path: tuple[str | int, ...]) -> sa.ColumnElement[Any]:
    """The metric as a float, NULL where the sample lacks it or it is not a number."""
    col = s.telemetry.c.payload
    if dialect == "postgresql":
        jsonb = sa.type_coerce(col, postgresql.JSONB())
        return sa.case((sa.func.jsonb_typeof(jsonb[path]) == "number", sa.cast(jsonb[path].astext, sa.Double)))
    text_path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f'."{p}"' for p in path)
    return sa.case((sa.func.json_type(col, text_path).in_(["integer", "real"]),
                    sa.func.json_extract(col, text_path)))


def _bucket(dialect: str, since: float, width: float) -> sa.ColumnElement[Any]:
    offset = (s.telemetry.c.ts - sa.literal(since, sa.Double)) / sa.literal(width, sa.Double)
    if dialect == "postgresql":
        return sa.cast(sa.func.floor(offset), sa.BigInteger)
    return sa.cast(offset, sa.Integer)  # non-negative here, so truncation is floor


def telemetry_series(conn: sa.Connection, device_id: str, metric: str, *, since: float, until: float,
                     points: int) -> dict[str, Any]:
    """``metric`` between ``since`` and ``until`` in at most ``points`` buckets of equal width
    (avg, min, max and count per non-empty bucket)."""
    if until <= since:
        raise RequestError("until: must be after since")
    path = _path(metric)
    dialect = conn.dialect.name
    width = (until - since) / points
    t = s.telemetry
    value = _metric_value(dialect, path).label("v")
    inner = (sa.select(_bucket(dialect, since, width).label("b"), value)
             .where(t.c.device_id == device_id, t.c.ts >= since, t.c.ts < until).subquery())
    q = (sa.select(inner.c.b, sa.func.avg(inner.c.v), sa.func.min(inner.c.v), sa.func.max(inner.c.v),
                   sa.func.count(inner.c.v))
         .where(inner.c.v.is_not(None)).group_by(inner.c.b).order_by(inner.c.b))
    out = [{"ts": since + int(b) * width, "avg": float(avg), "min": float(lo), "max": float(hi), "count": int(n)}
           for b, avg, lo, hi, n in conn.execute(q)]
    return {"device_id": device_id, "metric": metric, "since": since, "until": until, "bucket_s": width,
            "points": out}


# -- gaps, commands ---------------------------------------------------------------------------------------------
def list_gaps(conn: sa.Connection, *, device: str | None, cursor: str | None, limit: int) -> Page:
    g = s.gaps
    q = sa.select(g).order_by(g.c.id).limit(limit + 1)
    if device is not None:
        q = q.where(g.c.device_id == device)
    after = id_cursor(cursor)
    if after is not None:
        q = q.where(g.c.id > after)
    rows = list(conn.execute(q))
    more = len(rows) > limit
    rows = rows[:limit]
    items = [{**_row_dict(r), "missing": r.last_seq - r.first_seq + 1} for r in rows]
    return Page(items, str(rows[-1].id) if more else None)


def _command(row: Any) -> dict[str, Any]:
    return _row_dict(row)


def list_commands(conn: sa.Connection, *, device: str | None, cursor: str | None, limit: int) -> Page:
    """Newest first; the cursor is ``SENT_AT:ID`` (ids are random, so they alone do not order)."""
    c = s.commands
    q = sa.select(c).order_by(c.c.sent_at.desc(), c.c.id.desc()).limit(limit + 1)
    if device is not None:
        q = q.where(c.c.device_id == device)
    if cursor:
        sent_at, sep, cid = cursor.partition(":")
        try:
            at = float(sent_at)
        except ValueError:
            raise RequestError("cursor: expected the 'next' value of a previous page") from None
        if not sep:
            raise RequestError("cursor: expected the 'next' value of a previous page")
        q = q.where(sa.or_(c.c.sent_at < at, sa.and_(c.c.sent_at == at, c.c.id < cid)))
    rows = list(conn.execute(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([_command(r) for r in rows], f"{rows[-1].sent_at!r}:{rows[-1].id}" if more else None)


def get_command(conn: sa.Connection, command_id: str) -> dict[str, Any]:
    """Raises: NotFoundError."""
    row = conn.execute(sa.select(s.commands).where(s.commands.c.id == command_id)).first()
    if row is None:
        raise NotFoundError(f"no command {command_id!r}")
    return _command(row)


def default_range(since: float | None, until: float | None, *, hours: float = 24.0) -> tuple[float, float]:
    until = time.time() if until is None else until
    return (until - hours * 3600 if since is None else since), until
