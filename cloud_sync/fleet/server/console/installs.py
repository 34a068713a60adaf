"""Each rollout's devices' newest install events, kept up to date by reading only what arrived since the last look.

A 1,000-device rollout page is refreshed several times a second while its devices install; reading
every install event of every device each time would grow with the rollout. The tracker remembers,
per deployment, each device's newest event (by id, i.e. by arrival) and the highest event id in the
table at its last look, and next reads only the events above it. Ids follow commit order on SQLite
(one writer at a time); on PostgreSQL concurrent instances may commit a lower id later, so the read
also starts no later than the first event stamped ``overlap_s`` before the last look. Every
``rescan_s`` it reads the whole deployment again, so nothing missed survives for long. The database
stays the only truth: a cold tracker (another instance, a restart) starts with a full read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.console.views import DEPLOY_TYPES, Install


@dataclass
class _Tracked:
    newest: dict[str, Install]
    top_id: int  # the highest event id when it last looked
    looked_at: float  # service clock of the last look
    full_at: float  # ... of the last full read


class InstallTracker:
    def __init__(self, *, overlap_s: float = 5.0, rescan_s: float = 30.0, max_deployments: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        self.overlap_s = overlap_s
        self.rescan_s = rescan_s
        self.max_deployments = max_deployments
        self.clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, _Tracked] = OrderedDict()

    def newest(self, conn: sa.Connection, dep: Mapping[str, Any]) -> dict[str, Install]:
        """device id -> its newest install event of this deployment's model and version since it began."""
        now = self.clock()
        with self._lock:
            tracked = self._items.get(dep["id"])
            if tracked is not None:
                self._items.move_to_end(dep["id"])
        top = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(s.events.c.id), 0))).scalar_one())
        if tracked is None or now - tracked.full_at >= self.rescan_s:
            first, newest, full_at = first_id_since(conn, dep["created_at"]), {}, now
        else:
            late = first_id_since(conn, max(dep["created_at"], tracked.looked_at - self.overlap_s))
            first = tracked.top_id + 1 if late is None else min(tracked.top_id + 1, late)
            newest, full_at = dict(tracked.newest), tracked.full_at
        for install in read_installs(conn, dep, first) if first is not None else ():
            known = newest.get(install.device_id)
            if known is None or install.event_id > known.event_id:
                newest[install.device_id] = install
        with self._lock:
            self._items[dep["id"]] = _Tracked(newest, top, now, full_at)
            while len(self._items) > self.max_deployments:
                self._items.popitem(last=False)
        return newest


def first_id_since(conn: sa.Connection, since: float) -> int | None:
    """The id of the first event stamped at or after ``since`` (one seek on the ``received_at`` index)."""
    e = s.events
    found = conn.execute(sa.select(e.c.id).where(e.c.received_at >= since).order_by(e.c.received_at).limit(1)).scalar()
    return None if found is None else int(found)


def read_installs(conn: sa.Connection, dep: Mapping[str, Any], first_id: int) -> list[Install]:
    """Each device's newest install event of this deployment among the events from ``first_id`` on, read per
    device of the deployment on the (device, id) index: a busy fleet's other events are never scanned, and
    the database picks the newest per device (one row per device comes back)."""
    e, dd = s.events, s.deployment_devices
    newest = (sa.select(sa.func.max(e.c.id).label("id"))
              .join(dd, sa.and_(dd.c.device_id == e.c.device_id, dd.c.deployment_id == dep["id"]))
              .where(e.c.id >= first_id, e.c.received_at >= dep["created_at"], e.c.type.in_(DEPLOY_TYPES),
                     e.c.payload["model"].as_string() == dep["model"],
                     e.c.payload["version"].as_integer() == int(dep["version"]))
              .group_by(e.c.device_id).subquery())
    rows = conn.execute(sa.select(e.c.id, e.c.device_id, e.c.type, e.c.ts, e.c.payload["error"])
                        .join(newest, newest.c.id == e.c.id))
    return [Install(int(i), d, kind.removeprefix("deploy."), ts, err if isinstance(err, dict) else None)
            for i, d, kind, ts, err in rows]
