"""Typed settings of the fleet service, validated once at start.

Sources, later ones winning: the ``[server]`` table of the TOML file (``--config``), environment
variables ``EDGE_FLEET_SERVER__KEY`` (``__`` separates nesting: ``EDGE_FLEET_SERVER__INGEST__BATCH_MS``),
then command-line flags. Broker settings and the topic prefix are resolved exactly as for every other
``edge-fleet`` command (``cloud_sync.fleet.cli.broker_settings``) and passed in. Errors name the
source, the dotted key and the reason (:class:`~.errors.ConfigError`).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from cloud_sync.fleet.server.errors import ConfigError
from cloud_sync.fsutil import write_atomic
from cloud_sync.mqtt.settings import BrokerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "EDGE_FLEET_SERVER__"
DEFAULT_PORT = 8080
_TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DAY = 86400.0


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` (first entry), else ``$XDG_STATE_HOME`` or ``~/.local/state``."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-fleet"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT}), got {value!r}")
    return host.strip("[]"), int(port)


def normalize_db_url(value: str) -> URL:
    """``sqlite:///path`` or ``postgresql://...``; plain PostgreSQL URLs get the psycopg 3 driver."""
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL: {value!r}") from exc
    backend, _, driver = url.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql" and driver in ("", "psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if not url.database or url.database == ":memory:":
            raise ValueError("sqlite needs a file (sqlite:///path/fleet.db): an in-memory database is per connection")
        return url.set(drivername="sqlite")
    raise ValueError(f"unsupported database {url.drivername!r}: use sqlite:///FILE or postgresql://USER@HOST/DB")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSettings(_Section):
    """MQTT ingestion: shared subscription, persistent session, batching, input bounds."""

    shared: bool = True  # $share/<share_group>/...: instances split the load (see docs: broker restarts)
    share_group: str = "edge-fleet"
    session_expiry_s: int = Field(default=7 * 86400, ge=0, le=2**32 - 1)
    receive_maximum: int = Field(default=4000, ge=1, le=65535)
    batch_max: int = Field(default=1000, ge=1, le=20000)
    batch_ms: float = Field(default=50.0, gt=0, le=5000)
    max_payload_bytes: int = Field(default=256 * 1024, ge=64, le=16 * 1024 * 1024)
    flood_rate: float = Field(default=1000.0, ge=0)  # messages/s per device per instance; 0 = no limit
    flood_burst: int = Field(default=20000, ge=1)
    retry_max_s: float = Field(default=5.0, gt=0, le=300)

    @field_validator("share_group")
    @classmethod
    def _level(cls, value: str) -> str:
        if not _TOPIC_LEVEL.match(value):
            raise ValueError("must be one topic level of letters, digits, '_', '.', '-'")
        return value


class TableRetention(_Section):
    """Rows older than ``max_age_s`` (by arrival time) or beyond the newest ``max_rows`` are deleted."""

    max_age_s: float | None = Field(default=None, gt=0)
    max_rows: int | None = Field(default=None, ge=1)


class RetentionSettings(_Section):
    interval_s: float = Field(default=300.0, gt=0)
    chunk_rows: int = Field(default=5000, ge=1, le=1_000_000)
    results: TableRetention = TableRetention(max_age_s=30 * _DAY, max_rows=50_000_000)
    telemetry: TableRetention = TableRetention(max_age_s=30 * _DAY, max_rows=20_000_000)
    events: TableRetention = TableRetention(max_age_s=90 * _DAY, max_rows=10_000_000)
    commands: TableRetention = TableRetention(max_age_s=90 * _DAY, max_rows=1_000_000)
    gaps: TableRetention = TableRetention(max_age_s=90 * _DAY, max_rows=1_000_000)


class ApiSettings(_Section):
    max_limit: int = Field(default=1000, ge=1, le=100_000)
    default_limit: int = Field(default=100, ge=1, le=100_000)
    max_export_rows: int = Field(default=1_000_000, ge=1)
    command_timeout_s: float = Field(default=30.0, gt=0)
    max_command_timeout_s: float = Field(default=600.0, gt=0)
    max_series_points: int = Field(default=2000, ge=1, le=100_000)
    max_connections: int = Field(default=1000, ge=1)  # uvicorn's limit_concurrency: 503 beyond it
    access_log: bool = False


class TlsSettings(_Section):
    """HTTPS served by uvicorn itself (else put a reverse proxy in front); uvicorn's ``--ssl-*``."""

    certfile: Path | None = None
    keyfile: Path | None = None
    keyfile_password: str | None = None
    ca_certs: Path | None = None


class PublishSection(_Section):
    """Model upload (``POST /api/models``): on when ``repo_dir`` and ``keys_dir`` are set. ``keys_dir``
    holds only the online keys (``edge-fleet keys export-online``); ``limits`` are the fields of
    ``cloud_sync.fleet.publishing.UploadLimits`` (docs/model-upload.md)."""

    repo_dir: Path | None = None
    keys_dir: Path | None = None
    work_dir: Path | None = None
    limits: dict[str, Any] = Field(default_factory=dict)
    expiry_days: dict[str, float] = Field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.repo_dir is not None and self.keys_dir is not None


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    db: str | None = None  # default: sqlite:///<state_dir>/fleet.db
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    state_dir: Path = Field(default_factory=default_state_dir)
    client_id: str | None = None  # default: edge-fleet-server-<host>-<port>
    db_busy_timeout_ms: int = Field(default=5000, ge=0, le=600_000)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    log_level: str = "info"
    log_format: str = "auto"
    ingest: IngestSettings = IngestSettings()
    retention: RetentionSettings = RetentionSettings()
    api: ApiSettings = ApiSettings()
    tls: TlsSettings = TlsSettings()
    publish: PublishSection = PublishSection()
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    prefix: str = "edge/v1"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("db")
    @classmethod
    def _db(cls, value: str | None) -> str | None:
        if value:
            normalize_db_url(value)
        return value or None

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str | None) -> str | None:
        if value and not _TOPIC_LEVEL.match(value):
            raise ValueError("must be one topic level of letters, digits, '_', '.', '-' (it names a topic)")
        return value or None

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("expected debug, info, warning or error")
        return value.lower()

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("expected auto, json or console")
        return value

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def db_url(self) -> URL:
        return normalize_db_url(self.db or f"sqlite:///{self.state_dir / 'fleet.db'}")

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def mqtt_client_id(self) -> str:
        """The MQTT client id; it names the broker session, so it must stay the same across restarts
        (see :func:`with_client_id`, which the service applies at start)."""
        if self.client_id:
            return self.client_id
        if self.broker.client_id and _TOPIC_LEVEL.match(self.broker.client_id):
            return self.broker.client_id
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
        return f"edge-fleet-server-{host}"

    @property
    def response_topic(self) -> str:
        """Where devices answer this instance's commands (the device ACL lets them write it)."""
        return f"{self.prefix}/console/{self.mqtt_client_id}/responses"


def with_client_id(settings: ServerSettings) -> ServerSettings:
    """Settings with a client id that survives restarts and config changes.

    Unless ``client_id`` (or ``[broker] client_id``) is set, one is made up once and kept in
    ``<state_dir>/mqtt-client-id``: a changed id would leave the old session, and the messages the
    broker queued in it, behind. Instances need distinct ids, so each needs its own state directory
    (or an explicit ``client_id``).

    Raises:
        ConfigError: the state directory cannot be written.
    """
    if settings.client_id or (settings.broker.client_id and _TOPIC_LEVEL.match(settings.broker.client_id)):
        return settings
    path = settings.state_dir / "mqtt-client-id"
    try:
        value = path.read_text().strip() if path.exists() else ""
        if not _TOPIC_LEVEL.match(value):
            host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:30] or "host"
            value = f"edge-fleet-server-{host}-{secrets.token_hex(4)}"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, value.encode() + b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot keep the MQTT client id in {path}: {exc.strerror}", key="server.state_dir") from None
    return settings.model_copy(update={"client_id": value})


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("is not a table", key=".".join(parts[: parts.index(part) + 1]))
        node = child
    node[parts[-1]] = value


def load_settings(path: str | os.PathLike[str] | None = None, *, overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None, broker: BrokerSettings | None = None,
                  prefix: str | None = None) -> ServerSettings:
    """Build the settings from the ``[server]`` table, the environment, then ``overrides`` (flags).

    Raises:
        ConfigError: unreadable or malformed file, or a value that fails validation; the message names
            the file (or environment variable / command line), the key (``server.ingest.batch_ms``) and why.
    """
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    source = str(path) if path is not None else None
    if path is not None:
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("file not found", source=source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=source) from None
        server = data.get("server", {})
        if not isinstance(server, dict):
            raise ConfigError("must be a table", key="server", source=source)
        tree.update(server)
        base = Path(path).resolve().parent  # relative paths in the file are relative to the file
        if isinstance(tree.get("state_dir"), str):
            tree["state_dir"] = str((base / tree["state_dir"]).resolve())
        publish = tree.get("publish")
        if isinstance(publish, dict):
            for key in ("repo_dir", "keys_dir", "work_dir"):
                if isinstance(publish.get(key), str):
                    publish[key] = str((base / publish[key]).resolve())
    for var, value in environ.items():
        if var.startswith(ENV_PREFIX) and len(var) > len(ENV_PREFIX):
            key = var[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_dotted(tree, key, value)
            origin[key] = f"environment {ENV_PREFIX}{key.upper().replace('.', '__')}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
            origin[key] = "command line"
    for key in ("broker", "prefix"):
        if key in tree:
            raise ConfigError("unknown key (broker settings go in [broker], the prefix in [fleet])",
                              key=f"server.{key}", source=source)
    if broker is not None:
        tree["broker"] = broker
    if prefix is not None:
        tree["prefix"] = prefix
    try:
        settings = ServerSettings.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        where = next((o for k, o in origin.items() if key == k or key.startswith(k + ".")), source)
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(reason, key=f"server.{key}", source=where) from None
    if (settings.publish.repo_dir is None) != (settings.publish.keys_dir is None):
        raise ConfigError("repo_dir and keys_dir go together (uploads need both)", key="server.publish.keys_dir",
                          source=source)
    if settings.broker.protocol != "5":
        raise ConfigError("the fleet server needs MQTT 5 (shared subscriptions, session expiry, response topics)",
                          key="broker.protocol", source=source)
    return settings
