"""What the console's pages show, as SQLAlchemy Core queries over one connection (SQLite and PostgreSQL).

Pure reads: no writes, no HTTP. Each function answers one page or fragment with a bounded amount of
work whatever the fleet's size: the devices table is sorted and paged by the database (one page of
rows, then their groups and models by id), counters come from per-device totals and index seeks
(never a ``count(*)`` over results), and "latest per stream" walks the (device, stream, id) index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa

from cloud_sync.fleet.server import queries
from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.rollouts import FINAL
from cloud_sync.mqtt.contract import DEPLOY_FINAL, DEPLOY_STEPS, SHADOW_FINAL, SHADOW_STEPS, deploy_event

DEPLOY_TYPES = tuple(deploy_event(x) for x in (*DEPLOY_STEPS, *SHADOW_STEPS, *DEPLOY_FINAL, *SHADOW_FINAL))
FAILURE_TYPES = (deploy_event("failed"), deploy_event("rolled_back"))
PER_PAGE = (25, 50, 100, 200)


# -- overview ---------------------------------------------------------------------------------------------------
def overview(conn: sa.Connection, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    d, m, g, e, t = s.devices, s.device_models, s.device_groups, s.events, s.deployments
    totals = conn.execute(sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(sa.case((d.c.online, 1), else_=0)), 0),
        *(sa.func.coalesce(sa.func.sum(d.c[k]), 0) for k in ("stored", "duplicates", "dropped", "rejected")))).one()
    gaps = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(
        sa.func.sum(s.gaps.c.last_seq - s.gaps.c.first_seq + 1), 0))).one()
    profiles = conn.execute(sa.select(d.c.profile, sa.func.count()).group_by(d.c.profile)
                            .order_by(sa.func.count().desc(), d.c.profile)).all()
    delegates = conn.execute(sa.select(m.c.delegate, sa.func.count(sa.distinct(m.c.device_id)))
                             .group_by(m.c.delegate).order_by(sa.func.count(sa.distinct(m.c.device_id)).desc())).all()
    versions = conn.execute(sa.select(m.c.name, m.c.version, m.c.runtime, sa.func.count())
                            .group_by(m.c.name, m.c.version, m.c.runtime).order_by(m.c.name, m.c.version.desc())).all()
    groups = conn.execute(sa.select(g.c.group, sa.func.count()).group_by(g.c.group).order_by(g.c.group)).all()
    running = [r._mapping for r in conn.execute(
        sa.select(t).where(t.c.status == "running").order_by(t.c.created_at.desc()).limit(10))]
    counts = _deployment_counts(conn, [r["id"] for r in running])
    failures: list[dict[str, Any]] = []
    for kind in FAILURE_TYPES:  # one index seek per type, newest first
        failures += [dict(r._mapping) for r in conn.execute(
            sa.select(e.c.id, e.c.device_id, e.c.type, e.c.ts, e.c.payload).where(e.c.type == kind)
            .order_by(e.c.id.desc()).limit(10))]
    failures.sort(key=lambda r: -r["id"])
    stopped = [dict(r._mapping) for r in conn.execute(
        sa.select(t.c.id, t.c.model, t.c.version, t.c.status, t.c.reason, t.c.finished_at)
        .where(t.c.status.in_(("failed", "aborted"))).order_by(t.c.finished_at.desc()).limit(5))]
    return {
        "devices": int(totals[0]), "online": int(totals[1]), "offline": int(totals[0]) - int(totals[1]),
        "counters": dict(zip(("stored", "duplicates", "dropped", "rejected"), map(int, totals[2:]), strict=True)),
        "gaps": {"open": int(gaps[0]), "missing": int(gaps[1])},
        "results_last_minute": results_since(conn, now - 60),
        "profiles": [(p or "unknown", n) for p, n in profiles],
        "delegates": [(x or "unknown", n) for x, n in delegates],
        "versions": [{"name": n, "version": v, "runtime": r, "devices": c} for n, v, r, c in versions],
        "groups": groups,
        "rollouts": [{**r, "counts": counts.get(r["id"], {})} for r in running],
        "failures": failures[:10], "stopped": stopped,
    }


def results_since(conn: sa.Connection, since: float) -> int:
    """Results that arrived since ``since``: two index seeks (ids grow with arrival), not a count."""
    r = s.results
    first = conn.execute(sa.select(r.c.id).where(r.c.received_at >= since).order_by(r.c.received_at).limit(1)).scalar()
    if first is None:
        return 0
    return int(conn.execute(sa.select(sa.func.max(r.c.id))).scalar_one()) - int(first) + 1


def _deployment_counts(conn: sa.Connection, ids: list[str]) -> dict[str, dict[str, int]]:
    dd = s.deployment_devices
    out: dict[str, dict[str, int]] = {i: {} for i in ids}
    if ids:
        for dep, status, n in conn.execute(sa.select(dd.c.deployment_id, dd.c.status, sa.func.count())
                                           .where(dd.c.deployment_id.in_(ids))
                                           .group_by(dd.c.deployment_id, dd.c.status)):
            out[dep][status] = int(n)
    return out


def known_groups(conn: sa.Connection) -> list[str]:
    g = s.device_groups
    return list(conn.execute(sa.select(g.c.group).distinct().order_by(g.c.group)).scalars())


# -- devices table ----------------------------------------------------------------------------------------------
def _health(key: str) -> sa.ColumnElement[Any]:
    return s.devices.c.health[key].as_float()


def _first(column: sa.Column[Any], owner: sa.Column[Any]) -> sa.ScalarSelect[Any]:
    return sa.select(sa.func.min(column)).where(owner == s.devices.c.id).scalar_subquery()


SORTS: dict[str, Any] = {
    "id": lambda: s.devices.c.id, "online": lambda: s.devices.c.online,
    "group": lambda: _first(s.device_groups.c.group, s.device_groups.c.device_id),
    "model": lambda: _first(s.device_models.c.name, s.device_models.c.device_id),
    "profile": lambda: s.devices.c.profile, "agent": lambda: s.devices.c.agent_version,
    "cpu": lambda: _health("cpu_percent"), "memory": lambda: _health("memory_percent"),
    "temperature": lambda: _health("max_temperature_c"), "last_seen": lambda: s.devices.c.last_seen,
}


@dataclass(frozen=True)
class DeviceQuery:
    """The devices table's filters, sort and page, from and back to a query string."""

    group: str = ""
    online: str = ""  # "" | "yes" | "no"
    model: str = ""  # NAME or NAME@VERSION
    agent: str = ""
    profile: str = ""
    q: str = ""  # part of the id
    sort: str = "id"
    desc: bool = False
    page: int = 1
    per_page: int = 50

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> DeviceQuery:
        """Unknown or malformed values fall back to the defaults: a table, not an error page."""
        def text(key: str, limit: int = 128) -> str:
            return str(params.get(key, "")).strip()[:limit]

        page = text("page", 9)
        per_page = text("per_page", 4)
        return cls(group=text("group"), online=text("online") if text("online") in ("yes", "no") else "",
                   model=text("model", 200), agent=text("agent", 64), profile=text("profile"), q=text("q"),
                   sort=text("sort") if text("sort") in SORTS else "id", desc=text("dir") == "desc",
                   page=int(page) if page.isdigit() and int(page) > 0 else 1,
                   per_page=int(per_page) if per_page.isdigit() and int(per_page) in PER_PAGE else 50)

    def params(self, **changes: Any) -> str:
        q = replace(self, **changes)
        defaults = DeviceQuery()
        values = {k: v for k, v in asdict(q).items() if v != getattr(defaults, k) and k != "desc"}
        if q.desc:
            values["dir"] = "desc"
        return urlencode(values)

    def sorted_by(self, column: str) -> str:
        """The query string of a click on ``column``'s header: that column, flipped if it is the current one."""
        return self.params(sort=column, desc=not self.desc if self.sort == column else False, page=1)

    @property
    def filtered(self) -> bool:
        return any((self.group, self.online, self.model, self.agent, self.profile, self.q))


def _device_filters(q: DeviceQuery) -> list[sa.ColumnElement[bool]]:
    d = s.devices
    where: list[sa.ColumnElement[bool]] = []
    if q.group:
        g = s.device_groups
        where.append(sa.exists().where(g.c.device_id == d.c.id, g.c.group == q.group))
    if q.online:
        where.append(d.c.online.is_(q.online == "yes"))
    if q.model:
        m = s.device_models
        name, sep, version = q.model.partition("@")
        cond = [m.c.device_id == d.c.id, m.c.name == name]
        if sep and version.isdigit() and len(version) < 18:
            cond.append(m.c.version == int(version))
        where.append(sa.exists().where(*cond))
    if q.agent:
        where.append(d.c.agent_version == q.agent)
    if q.profile:
        where.append(d.c.profile == q.profile)
    if q.q:
        where.append(d.c.id.contains(q.q, autoescape=True))
    return where


def devices_page(conn: sa.Connection, q: DeviceQuery) -> tuple[list[dict[str, Any]], int]:
    """One page of the devices table (sorted, filtered) and how many devices match."""
    d = s.devices
    where = _device_filters(q)
    total = int(conn.execute(sa.select(sa.func.count()).select_from(d).where(*where)).scalar_one())
    key = SORTS[q.sort]()
    order = [(key.desc() if q.desc else key.asc()).nulls_last(), d.c.id.desc() if q.desc else d.c.id.asc()]
    rows = list(conn.execute(sa.select(d.c.id, d.c.online, d.c.last_seen, d.c.state_at, d.c.agent_version,
                                       d.c.profile, d.c.health).where(*where).order_by(*order)
                             .limit(q.per_page).offset((q.page - 1) * q.per_page)))
    groups, models = queries.groups_and_models(conn, [r.id for r in rows])
    return [{**r._mapping, "health": r.health or {}, "groups": groups[r.id], "models": models[r.id]}
            for r in rows], total


def pages(total: int, per_page: int) -> int:
    return max(1, math.ceil(total / per_page))


# -- one device -------------------------------------------------------------------------------------------------
_STREAMS = sa.text("""
WITH RECURSIVE streams(name) AS (
    SELECT MIN(stream) FROM results WHERE device_id = :d
    UNION ALL
    SELECT (SELECT MIN(stream) FROM results WHERE device_id = :d AND stream > streams.name)
    FROM streams WHERE streams.name IS NOT NULL
)
SELECT name FROM streams WHERE name IS NOT NULL LIMIT 64
""")


def device_streams(conn: sa.Connection, device_id: str) -> list[str]:
    """The device's result streams: one index seek per stream (a skip scan), however many results."""
    return list(conn.execute(_STREAMS, {"d": device_id}).scalars())


def latest_results(conn: sa.Connection, device_id: str, per_stream: int = 5) -> dict[str, list[dict[str, Any]]]:
    r = s.results
    out: dict[str, list[dict[str, Any]]] = {}
    for stream in device_streams(conn, device_id):
        out[stream] = [dict(row._mapping) for row in conn.execute(
            sa.select(r.c.id, r.c.seq, r.c.ts, r.c.received_at, r.c.model, r.c.payload)
            .where(r.c.device_id == device_id, r.c.stream == stream).order_by(r.c.id.desc()).limit(per_stream))]
    return out


def results_signature(conn: sa.Connection, device_id: str) -> tuple[Any, ...]:
    r = s.results
    return tuple(conn.execute(sa.select(sa.func.max(r.c.id)).where(r.c.device_id == device_id, r.c.stream == name))
                 .scalar() for name in device_streams(conn, device_id))


def device_events(conn: sa.Connection, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    return queries.list_rows(conn, s.events, queries.RowFilter(device=device_id), limit=limit, order="desc").items


def device_commands(conn: sa.Connection, device_id: str, limit: int = 10) -> list[dict[str, Any]]:
    return queries.list_commands(conn, device=device_id, cursor=None, limit=limit).items


def last_status(conn: sa.Connection, device_id: str) -> dict[str, Any] | None:
    """The newest successful ``status`` answer (profile and its reason, each model's delegate fallbacks)."""
    c = s.commands
    row = conn.execute(sa.select(c.c.response, c.c.responded_at).where(
        c.c.device_id == device_id, c.c.name == "status", c.c.ok.is_(True))
        .order_by(c.c.sent_at.desc()).limit(1)).first()
    if row is None or not isinstance(row.response, dict) or not isinstance(row.response.get("result"), dict):
        return None
    return {"at": row.responded_at, **row.response["result"]}


# -- rollouts ---------------------------------------------------------------------------------------------------
_SHOWN = {"succeeded": "committed", "failed": "failed", "timeout": "timeout", "skipped": "skipped"}
#: A shadow rollout's device has succeeded in ``shadowing``; a promote then ends it ``committed``, a discard
#: ``discarded``: those steps are the device's own, shown as they arrive.
_SHOWN_SHADOW = {**_SHOWN, "succeeded": "shadowing"}
_SHADOW_AFTER = (*SHADOW_STEPS, "swapped", "health", *DEPLOY_FINAL, *SHADOW_FINAL)


@dataclass(frozen=True)
class DeviceState:
    """One row of a rollout page: the device's newest install step, or the rollout's own verdict."""

    device_id: str
    wave: int
    state: str
    code: str | None  # error code, when there is one
    message: str | None
    ts: float | None  # when the shown state was reached (device clock for steps)

    def compact(self) -> list[Any]:
        return [self.device_id, self.state, self.code, self.message, self.ts]


def shown_state(status: str, step: str | None, mode: str = "swap") -> str:
    """The newest install step (``downloading`` ... ``committed``, or ``shadowing``); the rollout's verdict when
    the device said nothing (pending, sent, timeout, skipped) or the verdict is final and the device's last step
    is not."""
    if status in FINAL and step not in (_SHADOW_AFTER if mode == "shadow" else DEPLOY_FINAL):
        return (_SHOWN_SHADOW if mode == "shadow" else _SHOWN)[status]
    return step or status


def _error(value: Any) -> tuple[str | None, str | None]:
    if not isinstance(value, dict):
        return None, None
    code, message = value.get("code"), value.get("message")
    return (str(code) if code is not None else None), (str(message)[:300] if message is not None else None)


@dataclass(frozen=True)
class Install:
    """A device's install event: its step (``downloading``, ..., ``committed``, ``failed``) and error."""

    event_id: int
    device_id: str
    step: str
    ts: float
    error: dict[str, Any] | None


def rollout_states(conn: sa.Connection, dep: Mapping[str, Any], newest: Mapping[str, Install]) -> list[DeviceState]:
    """Every device of the deployment with what its page row shows, from its rollout status and ``newest``,
    its newest install event (see :class:`~.installs.InstallTracker`)."""
    dd = s.deployment_devices
    rows = conn.execute(sa.select(dd.c.device_id, dd.c.wave, dd.c.status, dd.c.error, dd.c.sent_at, dd.c.finished_at)
                        .where(dd.c.deployment_id == dep["id"]).order_by(dd.c.wave, dd.c.device_id))
    out = []
    for device_id, wave, status, dd_error, sent_at, finished_at in rows:
        install = newest.get(device_id)
        step = install.step if install else None
        state = shown_state(status, step, dep.get("mode", "swap"))
        code, message = _error(install.error) if install and install.error else _error(dd_error)
        when = install.ts if install and state == step else (finished_at or sent_at)
        out.append(DeviceState(device_id, int(wave), state, code, message, when))
    return out


def rollout_view(dep: dict[str, Any], states: list[DeviceState]) -> dict[str, Any]:
    """The deployment with its devices grouped by wave, and a tally of the states shown."""
    waves: list[list[DeviceState]] = [[] for _ in range(int(dep["waves"]))]
    tally: dict[str, int] = {}
    for st in states:
        waves[st.wave].append(st)
        tally[st.state] = tally.get(st.state, 0) + 1
    return {**dep, "wave_devices": waves, "tally": dict(sorted(tally.items()))}


def rollout_signature(conn: sa.Connection, dep_id: str) -> tuple[Any, ...]:
    """Changes when the deployment, one of its devices, or any install event does (one seek per type)."""
    t, dd, e = s.deployments, s.deployment_devices, s.events
    head = conn.execute(sa.select(t.c.status, t.c.updated_at, t.c.current_wave).where(t.c.id == dep_id)).first()
    counts = tuple(conn.execute(sa.select(dd.c.status, sa.func.count()).where(dd.c.deployment_id == dep_id)
                                .group_by(dd.c.status).order_by(dd.c.status)).all())
    newest = conn.execute(sa.select(*(sa.select(sa.func.max(e.c.id)).where(e.c.type == kind).scalar_subquery()
                                      for kind in DEPLOY_TYPES))).one()
    return (tuple(head) if head else None, counts, max((x for x in newest if x is not None), default=None))
