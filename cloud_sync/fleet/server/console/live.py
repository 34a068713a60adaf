"""Live updates: Server-Sent Events that tell a page which of its parts changed, so it refetches them.

The database is the only thing every instance shares, so change is detected there: each page kind
has parts, each part a cheap *signature* query (index seeks, a few aggregates over one deployment or
the devices table) whose value changes when what the part shows does. A stream looks at its page's
signatures as soon as this instance's ingestion commits a batch (:meth:`LiveFeed.poke`), and every
``interval`` seconds anyway for what other instances and the rollout runner change; viewers of one
page looking within ``look_gap / 2`` of each other share one query. It sends ``event: <part>`` when a
signature differs from the one the page was rendered with (its ``d`` parameter, so nothing between
render and connect is lost), at most once per part per the part's ``min_gap``: a busy fleet refreshes
the devices table once a second and a busy rollout four times a second, not once per stored batch.
Streams end when the service stops (``closing``) or the browser goes away; ``EventSource``
reconnects by itself. The number of open streams is capped (503 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.console import views
from cloud_sync.fleet.server.db import Database

Signature = Callable[[sa.Connection, str], Any]


@dataclass(frozen=True)
class Part:
    signature: Signature
    min_gap: float  # seconds between two events of this part


def _overview(conn: sa.Connection, _key: str) -> Any:
    d, t = s.devices, s.deployments
    return (tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(d.c.last_seen), sa.func.max(d.c.state_at),
                                         sa.func.sum(sa.case((d.c.online, 1), else_=0)))).one()),
            conn.execute(sa.select(sa.func.max(t.c.updated_at))).scalar(),
            conn.execute(sa.select(sa.func.max(s.gaps.c.id))).scalar())


def _devices(conn: sa.Connection, _key: str) -> Any:
    d = s.devices
    row = conn.execute(sa.select(sa.func.count(), sa.func.max(d.c.last_seen), sa.func.max(d.c.state_at))).one()
    return tuple(row)


def _device(conn: sa.Connection, key: str) -> Any:
    d = s.devices
    row = conn.execute(sa.select(d.c.online, d.c.state_at, d.c.last_seen).where(d.c.id == key)).first()
    return tuple(row) if row else None


def _telemetry(conn: sa.Connection, key: str) -> Any:
    return conn.execute(sa.select(s.devices.c.telemetry_ts).where(s.devices.c.id == key)).scalar()


def _events(conn: sa.Connection, key: str) -> Any:
    e = s.events
    return conn.execute(sa.select(sa.func.max(e.c.id)).where(e.c.device_id == key)).scalar()


def _deployments(conn: sa.Connection, _key: str) -> Any:
    t = s.deployments
    return tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(t.c.updated_at))).one())


PAGES: dict[str, dict[str, Part]] = {
    "overview": {"overview": Part(_overview, 2.0)},
    "devices": {"devices": Part(_devices, 1.0)},
    "device": {"device": Part(_device, 1.0), "telemetry": Part(_telemetry, 2.0), "events": Part(_events, 0.25),
               "results": Part(views.results_signature, 0.25)},
    "deployments": {"deployments": Part(_deployments, 1.0)},
    # a busy 1,000-device rollout changes with every batch: the first change goes out at once, the next ones
    # at most four times a second (each makes the page read every device's state)
    "rollout": {"rollout": Part(views.rollout_signature, 0.25)},
}


def digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def encode_digests(digests: Mapping[str, str]) -> str:
    return ",".join(f"{k}:{v}" for k, v in digests.items())


def decode_digests(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(",")[:16]:
        key, _, value = item.partition(":")
        out[key] = value
    return out


class LiveFeed:
    """Signatures with a short shared cache, and the event streams built on them."""

    def __init__(self, db: Database, *, interval: float = 0.25, max_streams: int = 200,
                 closing: threading.Event | None = None, look_gap: float = 0.05) -> None:
        self.db = db
        self.interval = interval
        self.look_gap = look_gap  # between two looks of one stream, however often it is poked
        self.max_streams = max_streams
        self.closing = closing or threading.Event()
        self.streams = 0
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._wakers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def poke(self) -> None:
        """Something was stored (any thread): every stream looks now rather than at its next poll. Changes
        stored by other instances are still seen by polling."""
        for loop, event in list(self._wakers):
            with contextlib.suppress(RuntimeError):  # that loop is closing
                loop.call_soon_threadsafe(event.set)

    def digests(self, page: str, key: str, names: Iterable[str] | None = None) -> dict[str, str]:
        """Current signature digests of a page's parts (all, or ``names``); blocking: call from a thread.
        Viewers of one page within ``look_gap / 2`` share one query per part. Unknown page: {}."""
        parts = PAGES.get(page, {})
        wanted = [n for n in (parts if names is None else names) if n in parts]
        now = time.monotonic()
        out: dict[str, str] = {}
        with self._lock:
            for name in wanted:
                hit = self._cache.get((page, key, name))
                if hit is not None and now - hit[0] < self.look_gap / 2:
                    out[name] = hit[1]
        missing = [n for n in wanted if n not in out]
        if missing:
            with self.db.read() as conn:
                fresh = {name: digest(parts[name].signature(conn, key)) for name in missing}
            with self._lock:
                if len(self._cache) > 5000:
                    self._cache.clear()
                for name, value in fresh.items():
                    self._cache[(page, key, name)] = (now, value)
            out.update(fresh)
        return out

    async def stream(self, page: str, key: str, seen: Mapping[str, str],
                     disconnected: Callable[[], Any]) -> AsyncIterator[str]:
        """The SSE body: ``retry``, then an event per changed part, a comment every 15 s as keep-alive.
        A part is looked at only when its ``min_gap`` since its last event has passed."""
        parts = PAGES[page]
        sent: dict[str, str] = dict(seen)
        last_event = dict.fromkeys(parts, 0.0)
        quiet_since = last_look = time.monotonic()
        wake = asyncio.Event()
        entry = (asyncio.get_running_loop(), wake)
        self._wakers.add(entry)
        try:
            yield "retry: 1000\n\n"
            while not self.closing.is_set():
                if await disconnected():
                    return
                now = time.monotonic()
                due = [name for name, part in parts.items() if now - last_event[name] >= part.min_gap]
                current = await asyncio.to_thread(self.digests, page, key, due) if due else {}
                last_look = now = time.monotonic()
                for name, value in current.items():
                    if sent.get(name) != value:
                        sent[name] = value
                        last_event[name] = now
                        quiet_since = now
                        yield f"event: {name}\ndata: {value}\n\n"
                if now - quiet_since > 15:
                    quiet_since = now
                    yield ": keep-alive\n\n"
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.interval)
                await asyncio.sleep(max(0.0, last_look + self.look_gap - time.monotonic()))
        finally:
            self._wakers.discard(entry)
