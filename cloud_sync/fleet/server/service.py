"""``edge-fleet server``: wires the parts and runs them until SIGTERM/SIGINT.

Start order: migrate the database, start ingestion (MQTT), serve the API and the web console; their
addresses are printed once the socket listens. Stop order (either signal): end the console's live
streams, stop accepting requests and finish those in flight, stop ingestion (the batch in hand is
committed and acknowledged if it can be; the rest stays with the broker), close the database. This
is the only module that knows every part.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn
from fastapi import APIRouter
from pydantic import ValidationError

from cloud_sync.fleet.server.api import create_app
from cloud_sync.fleet.server.auth import Role, TokenStore, require
from cloud_sync.fleet.server.commands import CommandService
from cloud_sync.fleet.server.config import ServerSettings, with_client_id
from cloud_sync.fleet.server.console import console_url
from cloud_sync.fleet.server.console import mount as mount_console
from cloud_sync.fleet.server.context import ServerContext
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import ConfigError
from cloud_sync.fleet.server.ingest import Ingestor
from cloud_sync.fleet.server.retention import Retention
from cloud_sync.fleet.server.rollouts import RolloutRunner

if TYPE_CHECKING:
    from cloud_sync.fleet.publishing import PublishSettings

log = structlog.get_logger(__name__)


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    """Whatever ``sys.stderr`` is when the line is logged (not the stream of the moment of configuring)."""
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """structlog to stderr (JSON unless a terminal); stdlib loggers (uvicorn, alembic) at WARNING."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer(colors=False)
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger, cache_logger_on_first_use=False)
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s %(message)s")
    for name in ("uvicorn", "uvicorn.error", "alembic", "paho"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM/SIGINT (uvicorn would re-raise
    them after its shutdown, before ingestion has stopped)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bound here so a busy port is our error (uvicorn would exit the process), and port 0 works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP; without
    # it a keep-alive client waits 40 ms (delayed ACK) for every response sent in two writes
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}", key="server.listen") from None
    sock.set_inheritable(True)
    return sock


def _url(settings: ServerSettings, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.tls.certfile else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


async def _rollouts(runner: RolloutRunner, interval: float = 0.5) -> None:
    while True:
        try:
            await asyncio.to_thread(runner.tick)
        except Exception:  # the database may be away: the next tick tries again
            log.exception("fleet.rollout.tick_failed")
            await asyncio.sleep(2.0)
        await asyncio.sleep(interval)


async def _retention(retention: Retention, interval: float) -> None:
    while True:
        try:
            await asyncio.to_thread(retention.prune)
        except Exception:  # a failed pass is retried at the next interval
            log.exception("fleet.retention.failed")
        await asyncio.sleep(interval)


def publish_settings(settings: ServerSettings) -> PublishSettings | None:
    """What uploads (API and console) and the console's catalogue need, when ``[server.publish]`` is
    configured, checked now: the repository must exist and the online keys must be able to sign.

    Raises:
        ConfigError: bad limits, no repository at ``repo_dir``, or keys that cannot sign.
    """
    pub = settings.publish
    if not pub.enabled:
        return None
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.fleet.publishing import PublishSettings, UploadLimits

    try:
        limits = UploadLimits(**pub.limits)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(err["msg"], key="server.publish.limits." + ".".join(str(p) for p in err["loc"])) from None
    assert pub.repo_dir is not None and pub.keys_dir is not None
    publish = PublishSettings(repo_dir=pub.repo_dir, keys_dir=pub.keys_dir, work_dir=pub.work_dir, limits=limits,
                              expiry_days=pub.expiry_days)
    try:
        publish.check()
    except CloudSyncError as exc:
        raise ConfigError(str(exc), key="server.publish.repo_dir") from None
    log.info("fleet.server.uploads", repo=str(pub.repo_dir))
    return publish


def upload_routers(settings: ServerSettings, publish: PublishSettings | None = None) -> list[APIRouter]:
    """The ``POST /api/models`` router (admin role) when ``[server.publish]`` is configured.

    Raises:
        ConfigError: see :func:`publish_settings`.
    """
    publish = publish or publish_settings(settings)
    if publish is None:
        return []
    from cloud_sync.fleet.upload_api import models_router

    return [models_router(publish, require(Role.admin))]


def build(settings: ServerSettings, db: Database) -> ServerContext:
    """The parts, unstarted: ingestor, commands, tokens, in one context for the API."""
    ingestor = Ingestor(settings, db)
    commands = CommandService(settings, db, ingestor)
    ingestor.on_response = commands.on_response
    return ServerContext(settings=settings, db=db, tokens=TokenStore(db), ingestor=ingestor, commands=commands)


async def run_server(settings: ServerSettings, *, ready: Callable[[str], None] | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). ``ready`` gets the API base URL once listening.

    Raises:
        ConfigError: the listen address cannot be bound; the upload repository or keys are unusable.
        StorageError: the database cannot be reached or migrated.
    """
    settings = with_client_id(settings)
    publish = publish_settings(settings)
    uploads = upload_routers(settings, publish)
    db = Database(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms, pool_size=settings.db_pool_size)
    try:
        await asyncio.to_thread(db.migrate)
        sock = _listen_socket(*settings.listen_address)
        ctx = build(settings, db)
        assert ctx.ingestor is not None
        tls = settings.tls
        app = create_app(ctx, extra=uploads)
        console = mount_console(app, ctx, publish=publish, closing=ctx.closing)
        ctx.ingestor.on_stored = console.live.poke  # live views look at once instead of at their next poll
        config = uvicorn.Config(app, log_config=None, access_log=settings.api.access_log,
                                lifespan="off", server_header=False, timeout_keep_alive=5,
                                limit_concurrency=settings.api.max_connections,
                                ssl_certfile=str(tls.certfile) if tls.certfile else None,
                                ssl_keyfile=str(tls.keyfile) if tls.keyfile else None,
                                ssl_keyfile_password=tls.keyfile_password,
                                ssl_ca_certs=str(tls.ca_certs) if tls.ca_certs else None)
        server = _Server(config)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, stop.set)
        gc.collect()
        gc.freeze()  # what start-up made lives as long as the process: keep it out of every later collection
        ctx.ingestor.start()
        api = asyncio.create_task(server.serve(sockets=[sock]), name="fleet-api")
        pruner = asyncio.create_task(_retention(Retention(db, settings.retention), settings.retention.interval_s),
                                     name="fleet-retention")
        assert ctx.commands is not None
        rollouts = asyncio.create_task(_rollouts(RolloutRunner(db, ctx.commands, ctx.ingestor.client_id)),
                                       name="fleet-rollouts")
        while not server.started and not api.done():
            await asyncio.sleep(0.02)
        if server.started:
            url = _url(settings, sock)
            log.info("fleet.server.started", api=f"{url}/api", console=console_url(url), db=repr(db),
                     broker=settings.broker.url,
                     client_id=ctx.ingestor.client_id)
            if ready is not None:
                ready(url)
            waiter = asyncio.create_task(stop.wait(), name="fleet-stop")
            await asyncio.wait({api, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        log.info("fleet.server.stopping")
        ctx.closing.set()  # ends the console's live streams, which would keep uvicorn waiting
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(api), 10)
        for task in (pruner, rollouts):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(ctx.ingestor.stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        if api.done() and not api.cancelled() and api.exception() is not None:
            raise api.exception()  # type: ignore[misc]
        log.info("fleet.server.stopped")
    finally:
        db.dispose()
