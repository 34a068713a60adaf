"""Corrupt stores never stop the daemon: move the file aside, start fresh, say so once someone listens.

An SD card that lost power mid-write, a disk error or a downgrade can leave a store the agent
cannot read: the outbox, the command log, a deployment record, the config overrides. Its
owner moves the file aside as ``NAME.corrupt-YYYYmmddTHHMMSSZ`` (SQLite's ``-wal``, ``-shm``
and ``-journal`` companions go with it: an old WAL must never be replayed into a fresh
database), starts a fresh store, and reports it here. Reports wait in a small process-wide
list until the daemon attaches a sink (once the cloud link is up); each becomes one event
``store.corrupt``. The moved file is kept for inspection, never read again.

This module does not know any store's format and must not import ``agent``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from cloud_sync.errors import StoreError
from cloud_sync.fsutil import fsync_dir

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: SQLite files that belong to a database and must move with it.
COMPANIONS = ("-wal", "-shm", "-journal")
MAX_REASON = 500  # characters of a reason kept in logs and events


@dataclass(frozen=True)
class CorruptStore:
    """One store that was found unusable and moved aside."""

    store: str  # "outbox", "command_log", "deployment", "config_overrides"
    path: str
    moved_to: str
    reason: str
    at: float = field(default_factory=time.time)

    def event(self) -> dict[str, Any]:
        """The ``store.corrupt`` event that reports it upstream."""
        return {"type": "store.corrupt", "store": self.store, "path": self.path, "moved_to": self.moved_to,
                "reason": self.reason, "detected_at": self.at}


Sink = Callable[[Mapping[str, Any]], object]


class Quarantine:
    """Reports of corrupt stores: held until a sink is attached, then forwarded as they come."""

    def __init__(self, keep: int = 100) -> None:
        self._lock = threading.Lock()
        self._pending: collections.deque[CorruptStore] = collections.deque(maxlen=keep)
        self._sink: Sink | None = None
        self.reported: collections.deque[CorruptStore] = collections.deque(maxlen=keep)  # for status and tests

    def report(self, notice: CorruptStore) -> None:
        with self._lock:
            self.reported.append(notice)
            sink = self._sink
            if sink is None:
                self._pending.append(notice)
                return
        _send(sink, notice)

    def attach(self, sink: Sink | None) -> None:
        """Forward held and future reports to ``sink`` (None: hold them again)."""
        with self._lock:
            self._sink = sink
            pending = list(self._pending) if sink is not None else []
            if sink is not None:
                self._pending.clear()
        for notice in pending:
            _send(sink, notice)  # type: ignore[arg-type]


def _send(sink: Sink, notice: CorruptStore) -> None:
    try:
        sink(notice.event())
    except Exception:  # a report must never break the store's owner
        log.exception("store.report_failed", store=notice.store, path=notice.path)


QUARANTINE = Quarantine()


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = path.with_name(f"{path.name}.corrupt-{stamp}")
    target, n = base, 1
    while any(os.path.lexists(f"{target}{suffix}") for suffix in ("", *COMPANIONS)):
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    return target


def move_aside(path: Path, *, store: str, reason: str, quarantine: Quarantine = QUARANTINE) -> CorruptStore | None:
    """Rename ``path`` (and its SQLite companions) to ``NAME.corrupt-TIMESTAMP``; report it.

    Returns None when the file is already gone (another thread moved it first).

    Raises:
        OSError: the file exists but cannot be renamed (read-only file system, permissions).
    """
    path = Path(path)
    target = _aside_name(path)
    try:
        path.rename(target)
    except FileNotFoundError:
        return None
    for suffix in COMPANIONS:
        companion = Path(f"{path}{suffix}")
        if os.path.lexists(companion):
            with contextlib.suppress(FileNotFoundError):
                companion.rename(f"{target}{suffix}")
    try:
        fsync_dir(path.parent)
    except OSError:
        log.warning("store.fsync_failed", path=str(path.parent))
    notice = CorruptStore(store, str(path), str(target), reason[:MAX_REASON])
    log.error("store.corrupt", store=store, path=str(path), moved_to=str(target), reason=notice.reason)
    quarantine.report(notice)
    return notice


def open_or_replace(path: Path, store: str, opener: Callable[[], T], *, quarantine: Quarantine = QUARANTINE) -> T:
    """``opener()``; if it raises :class:`StoreError` for a file that exists, move the file aside and open a fresh one.

    Raises:
        StoreError: the fresh store cannot be opened either (then the problem is not the file:
            a directory that cannot be created, a full or read-only disk).
        OSError: the file cannot be moved aside.
    """
    try:
        return opener()
    except StoreError as exc:
        path = Path(path)
        if not any(os.path.lexists(f"{path}{suffix}") for suffix in ("", *COMPANIONS)):
            raise
        if os.path.lexists(path):
            move_aside(path, store=store, reason=exc.reason, quarantine=quarantine)
        else:  # only companions: an orphaned WAL cannot be trusted with a new database
            for suffix in COMPANIONS:
                if os.path.lexists(f"{path}{suffix}"):
                    move_aside(Path(f"{path}{suffix}"), store=store, reason=exc.reason, quarantine=quarantine)
        return opener()
