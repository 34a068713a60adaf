"""Retention: delete rows older than a table's ``max_age_s`` or beyond its newest ``max_rows``.

Deletes go in chunks of ``chunk_rows`` (each its own short transaction) so the ingest writer is
never locked out for long, on SQLite especially. Age is measured on the service's clock
(``received_at``, ``sent_at``, ``detected_at``), not on device clocks that may be wrong. Devices and
tokens are never pruned. Several instances may prune at once: the deletes are idempotent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
import structlog

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.config import RetentionSettings, TableRetention
from cloud_sync.fleet.server.db import Database

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Target:
    name: str
    table: sa.Table
    key: sa.Column[object]  # ordered by arrival: the primary key
    age: sa.Column[object]  # the service's time of arrival


def _targets() -> list[_Target]:
    return [_Target("results", s.results, s.results.c.id, s.results.c.received_at),
            _Target("telemetry", s.telemetry, s.telemetry.c.id, s.telemetry.c.received_at),
            _Target("events", s.events, s.events.c.id, s.events.c.received_at),
            _Target("commands", s.command_responses, s.command_responses.c.id, s.command_responses.c.received_at),
            _Target("gaps", s.gaps, s.gaps.c.id, s.gaps.c.detected_at)]


class Retention:
    def __init__(self, db: Database, settings: RetentionSettings) -> None:
        self.db = db
        self.settings = settings

    def prune(self, now: float | None = None) -> dict[str, int]:
        """One pass over every table; returns rows deleted per table. Blocks (run it in a thread)."""
        now = time.time() if now is None else now
        deleted: dict[str, int] = {}
        for target in _targets():
            policy: TableRetention = getattr(self.settings, target.name)
            n = 0
            if policy.max_age_s is not None:
                n += self._delete_while(target, target.age < now - policy.max_age_s)
            if policy.max_rows is not None:
                n += self._cap(target, policy.max_rows)
            if target.name == "commands" and policy.max_age_s is not None:  # the commands themselves too
                n += self._delete_while(_Target("commands", s.commands, s.commands.c.id, s.commands.c.sent_at),
                                        s.commands.c.sent_at < now - policy.max_age_s)
            if n:
                deleted[target.name] = n
        if deleted:
            log.info("fleet.retention.pruned", **deleted)
        return deleted

    def _delete_while(self, target: _Target, condition: sa.ColumnElement[bool]) -> int:
        total = 0
        chunk = self.settings.chunk_rows
        while True:
            ids = sa.select(target.key).where(condition).order_by(target.key).limit(chunk).scalar_subquery()
            with self.db.write() as conn:
                n = conn.execute(sa.delete(target.table).where(target.key.in_(ids))).rowcount
            total += n
            if n < chunk:
                return total

    def _cap(self, target: _Target, max_rows: int) -> int:
        with self.db.read() as conn:
            boundary = conn.execute(sa.select(target.key).order_by(target.key.desc()).offset(max_rows)
                                    .limit(1)).scalar()
        if boundary is None:
            return 0
        return self._delete_while(target, target.key <= boundary)
