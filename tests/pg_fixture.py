"""A throwaway PostgreSQL cluster for the fleet-service tests, and the ``db_url`` fixture.

``pg_server`` (session) runs Debian's ``initdb``/``pg_ctl`` in a fresh directory under /tmp on a
free loopback port, with its Unix socket in that directory, and stops and deletes it at the end
(:func:`pg_cluster`, which the benchmarks use too).
``initdb`` refuses to run as root, so as root every command runs as the ``postgres`` user that the
``postgresql`` package creates (``runuser -u postgres --``), in a directory that user owns.

``db_url`` is parametrised over ``sqlite`` and ``postgresql``: each test gets an empty database (a
file in ``tmp_path``, or a new database in the shared cluster, dropped afterwards). The cluster is
started only when a PostgreSQL case runs. Set ``EDGE_TEST_NO_POSTGRES=1`` to skip those cases on a
machine without the package (``scripts/test`` installs it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mqtt_broker import free_port

HOST = "127.0.0.1"


def pg_bin() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/N/bin`` holding initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    socket_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @contextlib.contextmanager
    def database(self, prefix: str = "t") -> Iterator[str]:
        """A new, empty database (its URL), dropped on exit."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


#: The test cluster trades durability for speed; ``pg_cluster(durable=True)`` keeps fsync (benchmarks).
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
#: Durable storage, commits not waiting for their WAL flush: the guarantee of SQLite's WAL with
#: ``synchronous=NORMAL`` (a power cut may lose the last commits, never corrupt the database).
DURABLE = "-c synchronous_commit=off"


@contextlib.contextmanager
def pg_cluster(*, durable: bool = False) -> Iterator[PgServer]:
    """A new cluster in a temp dir on a free loopback port, stopped and deleted on exit.

    Raises:
        RuntimeError: PostgreSQL is not installed or did not start (with its log).
    """
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql, or run scripts/test)")
    root = Path(tempfile.mkdtemp(prefix="edge-fleet-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, logfile = root / "data", root / "server.log"
    port = free_port()
    user = "postgres" if os.geteuid() == 0 else (os.environ.get("USER") or "postgres")
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "-E",
                                     "UTF8", "--locale=C", "--no-sync"]), check=True, capture_output=True)
        options = (f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories={root} "
                   f"{DURABLE if durable else FAST} -c max_connections=200")
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", options,
                                     "-w", "-t", "30", "start"]), check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        log = logfile.read_text(errors="replace") if logfile.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')}\n{log}") from exc
    try:
        yield PgServer(HOST, port, user, root)
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if os.environ.get("EDGE_TEST_NO_POSTGRES"):
        pytest.skip("EDGE_TEST_NO_POSTGRES is set")
    with pg_cluster() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend: ``sqlite:///...`` or ``postgresql://...``."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    with server.database() as url:
        yield url
