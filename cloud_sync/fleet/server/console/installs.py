"""Each rollout's devices' newest install events, kept up to date by reading only what arrived since the last look.

A 1,000-device rollout page is refreshed several times a second while its devices install; reading
every install event of every device each time would grow with the rollout. The tracker remembers,
per deployment, each device's newest event (by id, i.e. by arrival) and reads only the events that
arrived since its last look, from the ``received_at`` index, with an overlap of ``overlap_s`` because
a batch is stamped before it commits (and on PostgreSQL concurrent instances commit out of id order).
Every ``rescan_s`` it reads the whole deployment again, so nothing missed survives for long. The
database stays the only truth: a cold tracker (another instance, a restart) starts with a full read.
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
    looked_at: float  # service clock of the last read
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
        full = tracked is None or now - tracked.full_at >= self.rescan_s
        since = dep["created_at"] if full or tracked is None else max(dep["created_at"],
                                                                       tracked.looked_at - self.overlap_s)
        newest: dict[str, Install] = {} if full or tracked is None else dict(tracked.newest)
        for install in read_installs(conn, dep, since):
            known = newest.get(install.device_id)
            if known is None or install.event_id > known.event_id:
                newest[install.device_id] = install
        with self._lock:
            self._items[dep["id"]] = _Tracked(newest, now, now if full or tracked is None else tracked.full_at)
            while len(self._items) > self.max_deployments:
                self._items.popitem(last=False)
        return newest


def read_installs(conn: sa.Connection, dep: Mapping[str, Any], since: float) -> list[Install]:
    """Each device's newest install event of this deployment among those that arrived since ``since``. Ids grow
    with arrival, so those are the events from the first one that arrived since then (one seek on
    ``received_at``), read per device of the deployment on the (device, id) index: a busy fleet's other events
    are never scanned, and the database picks the newest per device (one row per device comes back)."""
    e, dd = s.events, s.deployment_devices
    first = (sa.select(e.c.id).where(e.c.received_at >= since).order_by(e.c.received_at).limit(1)
             .scalar_subquery())
    newest = (sa.select(sa.func.max(e.c.id).label("id"))
              .join(dd, sa.and_(dd.c.device_id == e.c.device_id, dd.c.deployment_id == dep["id"]))
              .where(e.c.id >= first, e.c.received_at >= dep["created_at"], e.c.type.in_(DEPLOY_TYPES),
                     e.c.payload["model"].as_string() == dep["model"],
                     e.c.payload["version"].as_integer() == int(dep["version"]))
              .group_by(e.c.device_id).subquery())
    rows = conn.execute(sa.select(e.c.id, e.c.device_id, e.c.type, e.c.ts, e.c.payload["error"])
                        .join(newest, newest.c.id == e.c.id))
    return [Install(int(i), d, kind.removeprefix("deploy."), ts, err if isinstance(err, dict) else None)
            for i, d, kind, ts, err in rows]
