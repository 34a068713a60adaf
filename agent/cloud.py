"""The agent's end of the cloud link: builds the MQTT session, outbox and command dispatcher
from the config, implements the command handlers, and publishes birth and telemetry.

The transport lives in ``cloud_sync``; this module only knows what the agent can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field

from agent.config import OVERRIDES_FILE, SETTABLE, load_overrides
from agent.deploy.installer import DeployError
from agent.errors import AgentError, ConfigError
from agent.logs import recent
from cloud_sync.fsutil import write_atomic
from cloud_sync.mqtt.commands import Command, CommandLog, Dispatcher, Spec
from cloud_sync.mqtt.errors import CommandError
from cloud_sync.mqtt.session import DeviceSession, IncomingMessage
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.outbox import Outbox

if TYPE_CHECKING:
    from agent.daemon import Agent

log = structlog.get_logger(__name__)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelArgs(_Args):
    model: str = Field(min_length=1, max_length=128)
    version: int | None = Field(default=None, ge=1)


class RollbackArgs(_Args):
    model: str = Field(min_length=1, max_length=128)


class LogsArgs(_Args):
    lines: int = Field(default=100, ge=1, le=1000)


class SetConfigArgs(_Args):
    values: dict[str, Any] = Field(min_length=1)


class StreamArgs(_Args):
    stream: str = Field(min_length=1, max_length=128)


def link_settings(agent: Agent) -> LinkSettings:
    m = agent.config.mqtt
    assert m.url is not None
    broker = BrokerSettings(
        url=m.url, client_id=m.client_id or agent.config.agent.device_id, protocol=m.protocol,
        username=m.username, password=m.password, ca_file=str(m.ca_file) if m.ca_file else None,
        cert_file=str(m.cert_file) if m.cert_file else None, key_file=str(m.key_file) if m.key_file else None,
        keepalive_s=m.keepalive_s, backoff_min_s=m.backoff_min_s, backoff_max_s=m.backoff_max_s)
    return LinkSettings(device_id=agent.config.agent.device_id, prefix=m.prefix, groups=m.groups,
                        max_command_bytes=m.max_command_bytes, telemetry_interval_s=m.telemetry_interval_s,
                        publish_window=m.publish_window, broker=broker)


class CloudLink:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.settings = link_settings(agent)
        state = agent.config.agent.state_dir / "cloud"
        m = agent.config.mqtt
        self.outbox = Outbox(state / "outbox.db", max_messages=m.outbox_max_messages, max_bytes=m.outbox_max_bytes,
                             synchronous=m.outbox_synchronous)
        self.commands_log = CommandLog(state / "commands.db")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session = DeviceSession(self.settings, self.outbox, on_message=self._incoming)
        topics = self.session.topics
        own = {topics.commands} | {topics.group_commands(g) for g in self.settings.groups}
        self.dispatcher = Dispatcher(self._specs(), self.commands_log, self._reply, self.event,
                                     default_reply_topic=topics.responses, own_topics=own,
                                     max_bytes=self.settings.max_command_bytes, device_id=self.settings.device_id)
        self.telemetry_interval = self.settings.telemetry_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self.health: dict[str, Any] | None = None
        self._wake_telemetry = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.session.set_birth(self.birth())
        self.session.start()
        self._tasks.append(self.loop.create_task(self._telemetry(), name="telemetry"))
        log.info("cloud.started", broker=self.settings.broker.url, device_id=self.settings.device_id)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in list(self.dispatcher.running.values()):
            task.cancel()
        for task in [*self._tasks, *self.dispatcher.running.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        await asyncio.to_thread(self.session.stop)
        self.outbox.close()
        self.commands_log.close()

    # -- device-originated messages -----------------------------------------------------------------
    def birth(self) -> dict[str, Any]:
        agent = self.agent
        return {"agent_version": agent.version, "profile": agent.profile.profile.name, "health": self.health,
                "started_at": agent.started_at, "groups": list(self.settings.groups),
                "models": [{"name": m.name, "version": m.version, "runtime": m.runtime, "delegate": m.session.delegate}
                           for m in agent.registry.served()]}

    def inventory_changed(self) -> None:
        self.session.set_birth(self.birth())

    def event(self, payload: Mapping[str, Any]) -> int:
        return self.session.enqueue("event", self.session.topics.events, {"ts": time.time(), **payload})

    def result(self, stream: str, data: Mapping[str, Any]) -> int:
        return self.session.enqueue("result", self.session.topics.results(stream),
                                    {"ts": time.time(), "stream": stream, **data})

    def telemetry(self, system: Mapping[str, Any] | None = None) -> dict[str, Any]:
        agent = self.agent
        return {"ts": time.time(), "uptime_s": round(time.time() - agent.started_at, 3), "system": system,
                "models": [{"name": m.name, "version": m.version, "requests": m.requests, "errors": m.errors,
                            "delegate": m.session.delegate} for m in agent.registry.served()],
                "link": self.session.stats(), "outbox": self.outbox.stats().to_dict(),
                "streams": agent.streams.status()}

    async def _telemetry(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_telemetry.wait(), self.telemetry_interval)
            self._wake_telemetry.clear()
            try:
                snapshot = await asyncio.to_thread(self.agent.system)
                self.session.enqueue("telemetry", self.session.topics.telemetry, self.telemetry(snapshot.to_dict()))
                # The retained state carries the latest health summary, so `edge-fleet devices` shows it.
                self.health = {**snapshot.summary(), "ts": time.time(),
                               "stuck": self.agent.stuck_workers(), "outbox_depth": self.outbox.stats().depth}
                self.session.set_birth(self.birth())
            except Exception:
                log.exception("cloud.telemetry_failed")

    # -- commands -------------------------------------------------------------------------------------
    def _incoming(self, message: IncomingMessage) -> None:
        """Net thread -> event loop."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.dispatcher.handle(message)))  # type: ignore[union-attr]

    def _reply(self, topic: str, payload: Mapping[str, Any], correlation: bytes | None) -> None:
        if not self.session.publish_now(topic, payload, correlation=correlation):
            log.warning("command.reply_not_sent", topic=topic, id=payload.get("id"), reason="not connected")

    def _specs(self) -> dict[str, Spec]:
        return {
            "ping": Spec(self._ping),
            "status": Spec(self._status),
            "reload": Spec(self._reload, long_running=True),
            "deploy": Spec(self._deploy, ModelArgs, long_running=True),
            "rollback": Spec(self._rollback, RollbackArgs, long_running=True),
            "set-config": Spec(self._set_config, SetConfigArgs),
            "stream-start": Spec(self._stream, StreamArgs),
            "stream-stop": Spec(self._stream, StreamArgs),
            "logs": Spec(self._logs, LogsArgs),
        }

    async def _ping(self, _command: Command) -> dict[str, Any]:
        return {"pong": True, "ts": time.time(), "device_id": self.settings.device_id}

    async def _status(self, _command: Command) -> dict[str, Any]:
        status = self.agent.status()
        status["link"] = self.session.stats()
        status["outbox"] = self.outbox.stats().to_dict()
        return status

    async def _reload(self, _command: Command) -> dict[str, Any]:
        changes = await self.agent.registry.reload()
        self.inventory_changed()
        return changes

    async def _deploy(self, command: Command) -> dict[str, Any]:
        args = ModelArgs.model_validate(command.args)
        try:
            _record, task = self.agent.start_deploy(args.model, args.version)
            record = await task
        except DeployError as exc:
            raise CommandError(exc.code, exc.message) from None
        return dict(record.to_dict())

    async def _rollback(self, command: Command) -> dict[str, Any]:
        args = RollbackArgs.model_validate(command.args)
        try:
            return await self.agent.deployer.rollback(args.model)
        except DeployError as exc:
            raise CommandError(exc.code, exc.message) from None

    async def _stream(self, command: Command) -> dict[str, Any]:
        from agent.pipelines.base import PipelineError

        args = StreamArgs.model_validate(command.args)
        try:
            if command.name == "stream-start":
                return self.agent.streams.start(args.stream)
            return await asyncio.to_thread(self.agent.streams.stop, args.stream)
        except PipelineError as exc:
            raise CommandError("bad_stream", str(exc)) from None

    async def _logs(self, command: Command) -> dict[str, Any]:
        args = LogsArgs.model_validate(command.args)
        return {"lines": recent(args.lines)}

    async def _set_config(self, command: Command) -> dict[str, Any]:
        from agent.config import load_config
        from agent.logs import configure_logging

        values = SetConfigArgs.model_validate(command.args).values
        unknown = sorted(set(values) - SETTABLE)
        if unknown:
            raise CommandError("bad_args", f"args.values.{unknown[0]}: not settable remotely "
                                            f"(settable: {', '.join(sorted(SETTABLE))})")
        state_dir = self.agent.config.agent.state_dir
        merged = {**load_overrides(state_dir), **values}
        try:
            checked = load_config(self.agent.config.source, overrides=merged)
        except ConfigError as exc:
            raise CommandError("bad_args", f"args.values.{exc.key}: {exc.reason}") from None
        except AgentError as exc:
            raise CommandError("bad_args", str(exc)) from None
        write_atomic(state_dir / OVERRIDES_FILE, orjson.dumps(merged))
        if "mqtt.telemetry_interval_s" in values:
            self.telemetry_interval = checked.mqtt.telemetry_interval_s
            self._wake_telemetry.set()
        if "logging.level" in values:
            configure_logging(checked.logging.level, checked.logging.format)
        log.info("config.changed", values=values)
        return {"applied": values, "persisted": str(state_dir / OVERRIDES_FILE)}
