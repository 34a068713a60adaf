"""Typed agent configuration: a TOML file, environment overrides, command-line flags.

Validated once at start-up. Every error names where the bad value came from (file or
environment variable), the dotted key, and the reason; nothing here touches the runtime.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from agent.errors import ConfigError
from agent.validation import ConfigPath, Deferred, error_key, error_reason, resolve_paths

if TYPE_CHECKING:
    from agent.pipelines.sources import Options as _SourceOptions
else:
    _SourceOptions = Any

# A stream's source, pre and post are validated by types built from the pipeline registries
# (agent.pipelines.catalog), imported with the first stream: a config without streams never
# imports the sources and processors (~2 MB).
SourceConfig = Annotated[_SourceOptions, Deferred("agent.pipelines.catalog", "SourceConfig")]
PreOverride = Annotated[dict[str, Any], Deferred("agent.pipelines.catalog", "PreOverride")]
PostOverride = Annotated[dict[str, Any], Deferred("agent.pipelines.catalog", "PostOverride")]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Jetson JetPack 6 ships Python 3.10
    import tomli as tomllib

ENV_PREFIX = "EDGE_AGENT_"
ENV_CONFIG_FILE = "EDGE_AGENT_CONFIG"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-agent"


def _default_runtime_dir() -> Path:
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "edge-agent"
    return Path("/tmp") / f"edge-agent-{os.getuid()}"


class AgentSection(_Section):
    device_id: str = Field(default_factory=socket.gethostname)
    profile: str = "auto"
    profiles_dir: ConfigPath | None = None  # extra device profiles (override packaged ones by name)
    hardware_root: ConfigPath = Path("/")
    state_dir: ConfigPath = Field(default_factory=_default_state_dir)
    runtime_dir: ConfigPath = Field(default_factory=_default_runtime_dir)
    shutdown_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # Python modules imported at start that add delegates, sources, processors or hooks (agent.plugins).
    plugins: tuple[str, ...] = ()


class ApiSection(_Section):
    """The local API's listeners and the limits of its HTTP server (docs/api.md, "Limits").

    The defaults are at least as strict as uvicorn's and h11's: a 16 KiB request head, a
    5 s keep-alive, a connection cap, flow control on writes; plus timeouts for heads and
    bodies and a budget for the request bodies held in memory at once.
    """

    socket: ConfigPath | None = None  # default: <runtime_dir>/agent.sock
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    tcp: str | None = None  # "HOST:PORT"; off by default
    # Bearer token for the control endpoints over TCP: a file only the service's user can read.
    # Without it, TCP serves health, metadata, predict, statistics and metrics only.
    tcp_token_file: ConfigPath | None = None
    # Triton's system shared-memory extension over TCP: off, since a TCP client could then map any
    # shared-memory object of the service's user. The Unix socket always serves it.
    tcp_shared_memory: bool = False
    shared_memory_max_regions: int = Field(default=64, ge=0, le=4096)  # registered regions at once
    shared_memory_max_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)  # mapped bytes, all regions together
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)  # one request's body (413 over it)
    # Request bodies held at once, every connection together (503 over it): a few clients sending
    # large bodies at the same time cannot take the device's memory.
    max_buffered_bytes: int = Field(default=128 * 1024 * 1024, gt=0)
    max_url_bytes: int = Field(default=8 * 1024, ge=64, le=1024 * 1024)  # request target (414 over it)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)  # request line + headers (431)
    max_headers: int = Field(default=100, ge=8, le=10_000)  # header fields (431 over it)
    max_connections: int = Field(default=256, ge=4, le=65_536)  # idle and stalled connections make room
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # first byte of a request to its last header
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600)  # last header to the body's last byte
    keep_alive_s: float = Field(default=5.0, gt=0, le=3600)  # idle between requests (and before the first)
    send_timeout_s: float = Field(default=60.0, gt=0, le=3600)  # a client that does not read its answers
    # Unsent answer bytes on a connection above which it is neither read nor answered until the
    # client reads (write backpressure).
    max_unsent_bytes: int = Field(default=1024 * 1024, ge=16 * 1024)
    # JSON predict bodies larger than this are decoded on a thread, not on the event loop (a 25 MB
    # body takes about a second to decode, and every other client would wait for it).
    json_offload_bytes: int = Field(default=128 * 1024, ge=0)

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parse_hostport(value)
        return value

    @model_validator(mode="after")
    def _limits(self) -> ApiSection:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least max_body_bytes "
                             f"({self.max_body_bytes})")
        if self.max_url_bytes > self.max_header_bytes:
            raise ValueError(f"max_url_bytes ({self.max_url_bytes}) must not exceed max_header_bytes "
                             f"({self.max_header_bytes})")
        return self


class BatchingSection(_Section):
    enabled: bool = False
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_queue_delay_us: int = Field(default=500, ge=0, le=1_000_000)
    # Wait (up to the delay) only for as many requests as the previous batch had: a lone client
    # never waits, concurrent clients keep their batches full.
    adaptive_delay: bool = True
    preferred_batch_sizes: tuple[int, ...] = ()
    # Batch axis of an output when the model's metadata leaves it ambiguous (all dims dynamic).
    output_batch_axes: dict[str, int] = Field(default_factory=dict)


class WarmupSection(_Section):
    enabled: bool = True
    shapes: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    values: dict[str, float] = Field(default_factory=dict)


class InstancesSection(_Section):
    """``[model.NAME] instances = { min = 1, max = 4 }``: the workers (each with its own runtime session)
    the scaler keeps this model between when ``[scaling] enabled``; ``max`` defaults to the CPU budget
    divided by the model's threads."""

    min: int = Field(default=1, ge=1, le=64)
    max: int | None = Field(default=None, ge=1, le=64)

    @model_validator(mode="after")
    def _order(self) -> InstancesSection:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


class ModelSection(_Section):
    default_version: int | None = Field(default=None, ge=1)
    versions: Literal["latest", "all"] | tuple[int, ...] = "latest"
    threads: int | None = Field(default=None, ge=1, le=256)
    # A CPU model whose calls take at most this long runs on the API's thread when its worker is
    # idle, saving the ~100 µs hop to the worker thread and back; 0 always uses the worker.
    inline_max_us: int = Field(default=2000, ge=0, le=100_000)
    # ... and only for requests whose input tensors total at most this many bytes: a quick model
    # given a large batch is not quick, and would hold the event loop (every client) meanwhile.
    inline_max_bytes: int = Field(default=256 * 1024, ge=0)
    batching: BatchingSection = Field(default_factory=BatchingSection)
    warmup: WarmupSection = Field(default_factory=WarmupSection)
    instances: InstancesSection = Field(default_factory=InstancesSection)
    # A version unused (no request, stream item or shadow mirror) this long is unloaded, and loaded
    # again by the next request or stream item; None: never.
    unload_after_s: float | None = Field(default=None, gt=0)


class ModelsSection(_Section):
    dir: ConfigPath | None = None  # default: <state_dir>/models
    versions: Literal["latest", "all"] = "latest"
    idle_check_s: float = Field(default=5.0, gt=0, le=3600)  # how often idle versions are looked for


class RuntimeSection(_Section):
    threads: int | None = Field(default=None, ge=1, le=256)  # overrides the profile
    inter_op_threads: int = Field(default=1, ge=1, le=64)
    # ONNX Runtime busy-waits between ops by default; off keeps an idle daemon near 0 % CPU.
    allow_spinning: bool = False
    # ONNX Runtime's CPU memory arena keeps peak buffers reserved; off returns them, at no
    # measurable latency cost for edge-sized models (measured: Silero VAD 113-136 µs either way).
    memory_arena: bool = False
    # Keep each ONNX model's optimised graph in ONNX Runtime's own format under
    # <state_dir>/cache/onnx and load that instead: no graph optimisation at start, ~4 MB less
    # resident memory for a small model; rebuilt when the model, ONNX Runtime or the CPU changes.
    optimized_cache: bool = True


class MqttSection(_Section):
    """The cloud link; off unless ``url`` is set."""

    url: str | None = None  # mqtt://HOST:PORT or mqtts://HOST:PORT
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None  # default: agent.device_id
    username: str | None = None
    password: str | None = None
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    prefix: str = "edge/v1"
    groups: tuple[str, ...] = ()
    backoff_min_s: float = Field(default=0.5, gt=0, le=60)
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600)
    max_command_bytes: int = Field(default=256 * 1024, ge=1024)
    telemetry_interval_s: float = Field(default=60.0, ge=1, le=86400)
    publish_window: int = Field(default=100, ge=1, le=10000)
    refused_max_attempts: int = Field(default=5, ge=1, le=100)  # publishes the broker refuses, then dead-lettered
    refused_backoff_s: float = Field(default=1.0, gt=0, le=3600)  # first retry of a refused publish; doubles
    outbox_max_messages: int = Field(default=100_000, ge=100)
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    # NORMAL survives a crash or SIGKILL; FULL also survives power loss, at an fsync per message.
    outbox_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {value!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#"):
            raise ValueError("must be a topic path without leading/trailing '/' or wildcards")
        return value


class UpdatesSection(_Section):
    """Signed bundle installation (TUF); off unless ``repo_url`` and ``trusted_root`` are set."""

    repo_url: str | None = None  # base URL holding metadata/ and targets/
    trusted_root: ConfigPath | None = None  # root.json pinned at provisioning
    metadata_dir: ConfigPath | None = None  # default <state_dir>/tuf
    cache_dir: ConfigPath | None = None  # default $CACHE_DIRECTORY or <state_dir>/cache
    max_bundle_bytes: int = Field(default=1 << 30, ge=1024)
    max_member_bytes: int = Field(default=1 << 30, ge=1024)
    max_members: int = Field(default=256, ge=1)
    bandwidth_bytes_s: int | None = Field(default=None, ge=1024)
    # Slow retrieval (TUF): each file's download must finish within the deadline and, once the grace
    # period is over, keep this average rate; otherwise it fails (download_failed) and resumes next time.
    download_deadline_s: float = Field(default=3600.0, gt=0, le=7 * 86400)
    download_min_rate_bytes_s: int = Field(default=1024, ge=1)
    download_rate_grace_s: float = Field(default=10.0, ge=0, le=3600)
    min_free_bytes: int = Field(default=64 * 1024 * 1024, ge=0)  # kept free on top of the bundle
    keep_versions: int = Field(default=2, ge=2, le=100)  # on disk per model, current and previous included
    require_test_vectors: bool = False  # refuse bundles without test vectors (test_vectors_failed)
    health_window_s: float = Field(default=30.0, ge=0, le=86400)
    health_min_requests: int = Field(default=20, ge=1)
    health_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    health_max_latency_ratio: float = Field(default=2.0, ge=1)
    health_latency_floor_ms: float = Field(default=2.0, ge=0)  # a slowdown smaller than this is never a regression

    @field_validator("download_min_rate_bytes_s")
    @classmethod
    def _rate_under_bandwidth(cls, value: int, info: ValidationInfo) -> int:
        bandwidth = info.data.get("bandwidth_bytes_s")
        if bandwidth is not None and value > bandwidth // 2:
            raise ValueError(f"must be at most half of bandwidth_bytes_s ({bandwidth}): the bandwidth limit alone "
                             "would fail downloads")
        return value


class ShadowSection(_Section):
    """Shadow deployments (docs/shadow.md): how much live traffic a candidate sees, its worker's
    share of the CPU, and the defaults of the optional policy (a deploy command may override them)."""

    sample: float = Field(default=0.1, gt=0, le=1)  # fraction of answered requests and stream items mirrored
    queue_size: int = Field(default=8, ge=1, le=4096)  # samples waiting for the shadow; more are dropped
    threads: int = Field(default=1, ge=1, le=256)  # the candidate's runtime threads (it runs on its own thread)
    # Run the candidate (and the comparison) in a child process: it then shares no GIL with serving.
    process: bool = True
    nice: int = Field(default=10, ge=0, le=19)  # added to the shadow thread's nice value (Linux)
    # The child process in Linux's SCHED_IDLE class: it runs only on CPU time nothing else wants, so
    # serving never waits behind it (under full load its samples are dropped, and counted). Else: ``nice``.
    idle_class: bool = True
    # The child process is paused (SIGSTOP) while any serving runtime call runs: it only uses the
    # time serving leaves, never slowing a serving call by sharing the CPU's caches with it.
    yield_to_serving: bool = True
    min_samples: int = Field(default=200, ge=1)  # the policy judges after this many compared samples
    min_agreement: float | None = Field(default=None, ge=0, le=1)  # under it: discarded (None: no policy)
    max_latency_ratio: float | None = Field(default=None, gt=0)  # shadow p50 / serving p50 over it: discarded


class ScalingSection(_Section):
    """Elastic instances (docs/configuration.md, "Elastic instances"); off unless ``enabled``."""

    enabled: bool = False
    interval_s: float = Field(default=1.0, gt=0, le=60)  # how often the scaler looks
    window_s: float = Field(default=5.0, gt=0, le=3600)  # queue waits judged over this window
    scale_up_wait_ms: float = Field(default=5.0, gt=0)  # p95 queue wait over it adds an instance
    min_requests: int = Field(default=20, ge=1)  # ... if the window holds at least this many requests
    idle_s: float = Field(default=60.0, gt=0)  # no queueing for this long removes an instance
    max_temp_c: float | None = None  # hot past this (or a thermal zone's own trip point): back to min
    memory_budget_mb: int | None = Field(default=None, ge=1)  # process RSS within 90 % of it: no growth
    # Runtime threads of all instances together; default: the device profile's threads, else the CPU count.
    cpu_threads: int | None = Field(default=None, ge=1, le=1024)


class WatchdogSection(_Section):
    enabled: bool = True
    stuck_after_s: float = Field(default=10.0, gt=0, le=3600)  # one inference call longer than this is stuck
    failures_before_recovery: int = Field(default=3, ge=1)  # runtime failures in a row
    max_recoveries: int = Field(default=3, ge=1)
    window_s: float = Field(default=600.0, gt=0)


class ResultsSection(_Section):
    mode: Literal["every", "on_change", "over_threshold"] = "every"
    threshold: float | None = Field(default=None, ge=0, le=1)
    max_per_s: float | None = Field(default=None, gt=0)


class StreamSection(_Section):
    """A streaming pipeline: source → model (with the bundle's pre/post-processing) → results.

    ``source`` is validated in full here. ``pre``/``post`` override the bundle manifest's processing
    key by key, so they may be partial: each key is checked here, the merged result when the
    stream starts (it needs the model).
    """

    source: SourceConfig  # one of the registered sources' options, by ``type``
    model: str  # NAME or NAME@VERSION
    pre: PreOverride | None = None  # overrides the manifest's preprocess, key by key
    post: PostOverride | None = None
    results: ResultsSection = Field(default_factory=ResultsSection)
    autostart: bool = True
    snapshot_dir: ConfigPath | None = None  # save the frame of each published result here (JPEG)
    snapshot_max_bytes: int = Field(default=50 * 1024 * 1024, ge=0)
    stall_after_s: float = Field(default=10.0, gt=0, le=86400)  # an open source silent this long is "stalled"

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        name, _, version = value.partition("@")
        if not _NAME_RE.match(name) or (version and not version.isdigit()):
            raise ValueError(f"expected NAME or NAME@VERSION, got {value!r}")
        return value


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Section):
    agent: AgentSection = Field(default_factory=AgentSection)
    api: ApiSection = Field(default_factory=ApiSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    model: dict[str, ModelSection] = Field(default_factory=dict)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    mqtt: MqttSection = Field(default_factory=MqttSection)
    updates: UpdatesSection = Field(default_factory=UpdatesSection)
    watchdog: WatchdogSection = Field(default_factory=WatchdogSection)
    shadow: ShadowSection = Field(default_factory=ShadowSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    stream: dict[str, StreamSection] = Field(default_factory=dict)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    source: str | None = None

    @field_validator("model")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSection]) -> dict[str, ModelSection]:
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(f"invalid model name {name!r}")
        return value

    @property
    def socket_path(self) -> Path:
        return self.api.socket or self.agent.runtime_dir / "agent.sock"

    @property
    def models_dir(self) -> Path:
        return self.models.dir or self.agent.state_dir / "models"

    @property
    def cache_dir(self) -> Path:
        """Downloads in progress and runtime caches: ``[updates] cache_dir``, systemd's
        ``CacheDirectory`` (``$CACHE_DIRECTORY``), else ``<state_dir>/cache``."""
        if self.updates.cache_dir is not None:
            return self.updates.cache_dir
        if os.environ.get("CACHE_DIRECTORY"):
            return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
        return self.agent.state_dir / "cache"

    def model_options(self, name: str) -> ModelSection:
        return self.model.get(name) or _DEFAULT_MODEL


_DEFAULT_MODEL = ModelSection()  # frozen: shared; validating a new one per request costs ~10 µs


OVERRIDES_FILE = "config-overrides.json"  # under the state dir, written by the set-config command
SETTABLE = {"mqtt.telemetry_interval_s", "logging.level"}


def load_overrides(state_dir: Path) -> dict[str, Any]:
    """Settings changed by ``set-config``, persisted across restarts.

    A file that cannot be read or is not a JSON object is moved aside (``cloud_sync.stores``:
    ``config-overrides.json.corrupt-TIMESTAMP``, reported as an event once the link is up) and
    the agent runs on its own configuration. Keys that are not settable are ignored.
    """
    path = state_dir / OVERRIDES_FILE
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        discard_overrides(state_dir, f"unreadable: {exc.strerror or exc}")
        return {}
    except orjson.JSONDecodeError as exc:
        discard_overrides(state_dir, f"not JSON: {exc}")
        return {}
    if not isinstance(data, dict):
        discard_overrides(state_dir, f"not a JSON object but {type(data).__name__}")
        return {}
    return {k: v for k, v in data.items() if k in SETTABLE}


def discard_overrides(state_dir: Path, reason: str) -> None:
    """Move an unusable overrides file aside (never raises: the agent must start without it)."""
    import structlog

    from cloud_sync.stores import move_aside

    path = state_dir / OVERRIDES_FILE
    try:
        move_aside(path, store="config_overrides", reason=reason)
    except OSError as exc:
        structlog.get_logger(__name__).error("config.overrides_unusable", path=str(path), reason=reason,
                                             move_failed=str(exc))


def with_overrides(config: Config, build: Callable[[Mapping[str, Any]], Config]) -> Config:
    """``config`` rebuilt by ``build(overrides)`` with the persisted ``set-config`` overrides.

    Overrides whose values no longer validate (a hand edit, a damaged file) are moved aside and
    ``config`` is returned unchanged: a remote setting never stops the daemon from starting.
    """
    remote = load_overrides(config.agent.state_dir)
    if not remote:
        return config
    try:
        return build(remote)
    except ConfigError as exc:
        discard_overrides(config.agent.state_dir, f"invalid values: {exc}")
        return config



def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8500`` for IPv6)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_env_value(raw: str) -> Any:
    """Interpret an environment value as a TOML literal when it is one, else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``EDGE_AGENT_API__SOCKET=/x`` -> {"api.socket": ("EDGE_AGENT_API__SOCKET", "/x")}."""
    found: dict[str, tuple[str, Any]] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG_FILE or "__" not in var:
            continue
        key = ".".join(part.lower() for part in var[len(ENV_PREFIX) :].split("__"))
        found[key] = (var, _parse_env_value(raw))
    return found


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{part}' is not a table", key=key)
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the config from file, then environment, then ``overrides`` (CLI flags).

    Raises:
        ConfigError: unreadable or malformed file, or a value that fails validation; the
            message names the file (or environment variable), the key and the reason.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_CONFIG_FILE):
        path = environ[ENV_CONFIG_FILE]
    tree: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            with Path(path).open("rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("file not found", file=source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", file=source) from None
        # Relative paths in a config file are relative to that file, not to the cwd: every field
        # typed ConfigPath / PathStr / PathOrUrl (agent.validation) says so itself.
        resolve_paths(Config, tree, Path(path).resolve().parent)
    origin: dict[str, str] = {}
    for key, (var, value) in _env_overrides(environ).items():
        _set_dotted(tree, key, value)
        origin[key] = f"environment {var}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
            origin[key] = "command line"
    tree["source"] = source
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        key, reason = _explain(exc.errors()[0], tree)
        where = next((o for k, o in origin.items() if key == k or key.startswith(k + ".")), source)
        raise ConfigError(reason, key=key, file=where) from None


def _explain(err: ErrorDetails, tree: dict[str, Any]) -> tuple[str, str]:
    """(dotted key as written in the file, reason) for the first validation error."""
    key = error_key(err["loc"], tree)
    ctx = err.get("ctx", {})
    if err["type"] == "union_tag_invalid":  # a table chosen by its ``type`` (stream source, pre, post)
        known = ", ".join(sorted(re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))))
        return f"{key}.type", f"unknown type {ctx.get('tag')!r} (known: {known})"
    if err["type"] == "union_tag_not_found":
        return f"{key}.type", "required"
    return key, "unknown key" if err["type"] == "extra_forbidden" else error_reason(err)
