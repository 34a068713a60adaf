"""The database handle: one SQLAlchemy engine with the dialect quirks settled, and migrations.

SQLite: WAL (readers never wait for the writer), ``synchronous=NORMAL``, a busy timeout, and
SQLAlchemy - not the ``sqlite3`` module - emitting ``BEGIN`` so transactions mean what they say
(``BEGIN IMMEDIATE`` for writers: a writer waits for the lock up front instead of failing on
upgrade). PostgreSQL: psycopg 3, ``lock_timeout`` from the same setting, pre-ping after outages.
Every call here blocks: async callers use a thread (``asyncio.to_thread`` or FastAPI's threadpool).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from cloud_sync.fleet.server.config import normalize_db_url
from cloud_sync.fleet.server.errors import StorageError

log = structlog.get_logger(__name__)

_MIGRATION_LOCK = 0x45_46_4C_54  # pg_advisory_xact_lock key: one migrating instance at a time
#: Errors worth retrying: the database is locked, restarting or unreachable.
TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "cloud_sync.fleet.server:migrations")
    return cfg


class Database:
    """Owns the engine. ``write()`` and ``read()`` hand out connections inside a transaction."""

    def __init__(self, url: URL | str, *, busy_timeout_ms: int = 5000, pool_size: int = 10) -> None:
        """Raises: ValueError for an unsupported URL (nothing is opened yet)."""
        self.url = normalize_db_url(url if isinstance(url, str) else url.render_as_string(hide_password=False))
        self.dialect = self.url.get_backend_name()
        self.busy_timeout_ms = busy_timeout_ms
        kwargs: dict[str, Any] = {"json_serializer": _dumps, "json_deserializer": orjson.loads,
                                  "pool_size": pool_size, "max_overflow": pool_size, "pool_timeout": 30}
        if self.dialect == "sqlite":
            assert self.url.database is not None
            Path(self.url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            self.engine = sa.create_engine(self.url, **kwargs)
            sa.event.listen(self.engine, "connect", self._sqlite_connect)
            sa.event.listen(self.engine, "begin", self._sqlite_begin)
        else:
            kwargs["connect_args"] = {"options": f"-c lock_timeout={busy_timeout_ms}", "connect_timeout": 10}
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, **kwargs)

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    def _sqlite_connect(self, dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN (see _sqlite_begin)
        for pragma in ("journal_mode=WAL", f"busy_timeout={self.busy_timeout_ms}", "synchronous=NORMAL",
                       "foreign_keys=ON"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @staticmethod
    def _sqlite_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fleet_write") else "BEGIN")

    @contextlib.contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A connection in a write transaction, committed on exit (rolled back on an exception)."""
        with self.engine.connect() as conn:
            conn.execution_options(fleet_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection for reads (one consistent snapshot per call)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def migrate(self) -> str:
        """Bring the schema to the newest revision; returns it. Safe with several instances starting.

        Raises:
            StorageError: the database cannot be reached or a migration failed.
        """
        cfg = _alembic_config()
        head = self.head()
        try:
            if self.revision() == head:  # the usual case: no write lock needed
                return head
            with self.write() as conn:
                if self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                before = MigrationContext.configure(conn).get_current_revision()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                after = MigrationContext.configure(conn).get_current_revision()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"cannot migrate {self!r}: {exc.__class__.__name__}: {exc}") from exc
        if before != after:
            log.info("fleet.db.migrated", db=repr(self), revision_from=before, revision_to=after)
        return str(after)

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head() -> str:
        return str(ScriptDirectory.from_config(_alembic_config()).get_current_head())

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return False
        return True

    def dispose(self) -> None:
        self.engine.dispose()
