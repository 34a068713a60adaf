"""The operations facade: every control operation, once, for every transport.

The HTTP routes (``agent.api``) and the MQTT command handlers (``agent.link``) both call
these methods and nothing else; each edge maps the typed errors raised here to its own
answer exactly once (an HTTP status in ``agent.api.errors``, an MQTT ``error.code`` in the
command dispatcher). Arguments arrive validated in shape by the edge (types, ranges); what
only the agent can judge (does the stream exist, is a deployment running) is checked here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from agent.config import OVERRIDES_FILE, SETTABLE, Config, load_config, load_overrides
from agent.core.ports import ModelSwapper
from agent.core.uplink import Uplink
from agent.errors import (
    ConfigError,
    DeploymentNotFoundError,
    InvalidArgumentError,
    LinkNotConfiguredError,
    OutboxFullError,
    RequestError,
)
from agent.health.monitor import SystemMonitor
from agent.logs import recent
from cloud_sync.fsutil import write_atomic

if TYPE_CHECKING:
    from agent.deploy.installer import Deployer
    from agent.deploy.state import Deployment
    from agent.pipelines.manager import StreamManager
    from agent.pipelines.results import Broadcaster

log = structlog.get_logger(__name__)


@dataclass
class AgentInfo:
    """Who this agent is, for status, the birth message and telemetry."""

    version: str
    device_id: str
    models_dir: Path
    config_source: str | None
    profile: str
    profile_reason: str
    threads: int | None
    hardware: dict[str, Any]
    started_at: float = field(default_factory=time.time)
    listeners: list[str] = field(default_factory=list)


class Operations:
    """What an operator or a local application can ask of the agent, whatever the transport."""

    def __init__(self, info: AgentInfo, *, models: ModelSwapper, deployer: Deployer, streams: StreamManager,
                 monitor: SystemMonitor, uplink: Uplink, state_dir: Path,
                 stuck_after_s: float,
                 on_settings: Callable[[Config, Mapping[str, Any]], None] | None = None) -> None:
        self.info = info
        self.models = models
        self.deployer = deployer
        self.streams = streams
        self.monitor = monitor
        self.uplink = uplink
        self.state_dir = state_dir
        self.stuck_after_s = stuck_after_s
        self.on_settings = on_settings or (lambda _config, _changed: None)
        self.stopping = False

    # -- reading ------------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"pong": True, "ts": time.time(), "device_id": self.info.device_id}

    def describe_models(self) -> list[dict[str, Any]]:
        """Every loaded or failed version, with which one is the default."""
        models = [m.describe() for m in self.models.served()] + [f.describe() for f in self.models.failures()]
        for m in models:
            if m["state"] == "AVAILABLE":
                m["default"] = self.models.default_version(m["name"]) == m["version"]
        return sorted(models, key=lambda m: (m["name"], -m["version"]))

    def inventory(self) -> list[dict[str, Any]]:
        """The served models as the birth message lists them."""
        return [{"name": m.name, "version": m.version, "runtime": m.runtime, "delegate": m.session.delegate}
                for m in self.models.served()]

    def model_counters(self) -> list[dict[str, Any]]:
        """Per-model counters for telemetry, with the latency of the calls since the previous sample
        (taking it starts the next interval: telemetry is its one caller)."""
        return [{"name": m.name, "version": m.version, "requests": m.stats.requests, "errors": m.stats.errors,
                 "delegate": m.session.delegate, "latency_ms": m.stats.latency_window()}
                for m in self.models.served()]

    def stuck_workers(self, threshold_s: float | None = None) -> list[str]:
        """Models whose inference call has run longer than the in-process watchdog can fix
        (three times its threshold): then systemd's watchdog should restart the process."""
        threshold_s = threshold_s if threshold_s is not None else self.stuck_after_s * 3
        now = time.monotonic()
        return [m.key for m in self.models.served()
                if m.worker.busy_since is not None and now - m.worker.busy_since > threshold_s]

    async def status(self) -> dict[str, Any]:
        """The agent's whole state (``GET /v1/agent/status``, the ``status`` command). Never blocks the loop."""
        info = self.info
        system, deployments = await asyncio.gather(self.monitor.snapshot(), asyncio.to_thread(self.deployer.store.all))
        link = self.uplink.status()
        return {
            "agent": {"version": info.version, "device_id": info.device_id, "started_at": info.started_at,
                      "uptime_s": round(time.time() - info.started_at, 3), "listeners": list(info.listeners),
                      "models_dir": str(info.models_dir), "config": info.config_source},
            "profile": {"name": info.profile, "reason": info.profile_reason, "threads": info.threads},
            "hardware": info.hardware,
            "models": self.describe_models(),
            "link": link["link"] if link else None,
            "outbox": link["outbox"] if link else None,
            "system": system.to_dict(),
            "deployments": [r.to_dict() for r in deployments],
            "streams": self.streams.status(),
            "shadows": self.shadows(),
        }

    # -- models -------------------------------------------------------------------------------------------
    async def reload(self) -> dict[str, list[str]]:
        """Re-read the models directory (models copied in by hand or by other tools)."""
        changes = await self.models.reload()
        self.uplink.inventory_changed()
        return changes

    async def deploy(self, name: str, version: int | None, mode: str = "swap",
                     shadow: Mapping[str, Any] | None = None) -> Deployment:
        """Start installing a signed bundle; it runs on in the background. ``mode`` ``shadow``: run it
        beside the serving version (``shadow`` overrides ``[shadow]``'s sample and policy).

        Raises:
            DeployError: one is already running for this model, or a shadow of it (``busy``).
        """
        policy = self.deployer.policy(dict(shadow or {})) if mode == "shadow" else None
        return await self.deployer.start(name, version, mode, policy)

    async def deploy_and_wait(self, name: str, version: int | None, mode: str = "swap",
                              shadow: Mapping[str, Any] | None = None) -> Deployment:
        """Install a signed bundle and return its committed record (a shadow's once it mirrors).

        Raises:
            DeployError: it could not start, failed, or was rolled back (``code`` says why).
        """
        await self.deploy(name, version, mode, shadow)
        return await self.deployer.wait(name)

    # -- shadows ------------------------------------------------------------------------------------------
    def shadows(self) -> list[dict[str, Any]]:
        """Every running shadow with its agreement, latency and drop figures (``GET /v1/agent/shadows``)."""
        return self.deployer.shadows.describe()

    def shadow_summary(self) -> list[dict[str, Any]]:
        """The birth message's short form."""
        return self.deployer.shadows.summary()

    def promote(self, name: str, version: int | None = None) -> Deployment:
        """Swap the shadow in (the normal swap and health window), in the background; ``version``:
        only if the shadow is that version.

        Raises:
            ShadowNotFoundError: no shadow of ``name`` (of ``version``); DeployError (``busy``): already
                being promoted.
        """
        return self.deployer.promote_start(name, version=version)

    async def promote_and_wait(self, name: str, version: int | None = None) -> Deployment:
        """Promote the shadow and return the committed record.

        Raises:
            ShadowNotFoundError: no shadow of ``name`` (of ``version``); DeployError: it was rolled back
                (``code`` says why).
        """
        self.deployer.promote_start(name, version=version)
        return await self.deployer.wait(name)

    async def discard(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Stop the shadow and remove its files; returns its last figures.

        Raises:
            ShadowNotFoundError: no shadow of ``name`` (of ``version``); DeployError (``busy``): being promoted.
        """
        return await self.deployer.discard(name, version=version)

    async def deployment(self, name: str) -> dict[str, Any]:
        """The latest deployment record of ``name`` and whether it is still running.

        Raises:
            DeploymentNotFoundError: ``name`` was never deployed here.
        """
        record = await asyncio.to_thread(self.deployer.store.load, name)
        if record is None:
            raise DeploymentNotFoundError(f"no deployment of '{name}'")
        return {**record.to_dict(), "running": self.deployer.running(record.model)}

    async def rollback(self, name: str) -> dict[str, Any]:
        """Serve the previous version again. Raises DeployError (``not_found``, ``no_previous``)."""
        return await self.deployer.rollback(name)

    # -- streams ------------------------------------------------------------------------------------------
    def stream_status(self) -> list[dict[str, Any]]:
        return self.streams.status()

    def stream_start(self, name: str) -> dict[str, Any]:
        """Raises StreamError: unknown, or already running."""
        return self.streams.start(name)

    async def stream_stop(self, name: str) -> dict[str, Any]:
        """Raises StreamError: not running."""
        return await self.streams.stop(name)

    def stream_feed(self, name: str) -> Broadcaster:
        """Live results of one stream. Raises StreamError for an unknown stream."""
        return self.streams.feed(name)

    def push_result(self, stream: str, body: Any) -> int:
        """A local application's own result, sent upstream through the outbox; returns its seq.

        Raises:
            LinkNotConfiguredError: no cloud link.
            RequestError: the result is not a JSON object.
            OutboxFullError: the outbox is full and could not make room.
        """
        if self.uplink.link is None:
            failure = self.uplink.failure
            raise LinkNotConfiguredError(f"the cloud link could not start: {failure}" if failure
                                         else "the cloud link is not configured (set [mqtt] url)")
        if not isinstance(body, dict):
            raise RequestError("result must be a JSON object")
        seq = self.uplink.result(stream, body)
        if seq is None or seq < 0:
            raise OutboxFullError("the outbox is full and could not make room")
        return seq

    # -- settings and logs --------------------------------------------------------------------------------
    async def set_config(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Change and persist the remotely settable settings (``SETTABLE``); applied at once.

        Raises:
            InvalidArgumentError: a key that is not settable, or a value that fails validation.
        """
        unknown = sorted(set(values) - SETTABLE)
        if unknown:
            raise InvalidArgumentError(f"values.{unknown[0]}: not settable remotely "
                                       f"(settable: {', '.join(sorted(SETTABLE))})")
        path = self.state_dir / OVERRIDES_FILE
        merged = {**await asyncio.to_thread(load_overrides, self.state_dir), **values}
        try:
            checked = await asyncio.to_thread(load_config, self.info.config_source, overrides=merged)
        except ConfigError as exc:
            raise InvalidArgumentError(f"values.{exc.key}: {exc.reason}") from None
        await asyncio.to_thread(write_atomic, path, orjson.dumps(merged))
        self.on_settings(checked, values)
        log.info("config.changed", values=dict(values))
        return {"applied": dict(values), "persisted": str(path)}

    @staticmethod
    def logs(lines: int) -> list[str]:
        return recent(lines)
