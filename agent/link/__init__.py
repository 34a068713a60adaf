"""The agent's end of the cloud link: builds the MQTT session, outbox and command dispatcher
from the ``[mqtt]`` section, publishes birth and telemetry, and hands commands to the
operations facade (``agent.link.commands``).

The transport lives in ``cloud_sync``; this package only knows what the agent reports. It is
the ``Link`` the daemon attaches to the components' event sink once it has started.

A corrupt outbox or command log is moved aside and replaced by a fresh one
(``cloud_sync.stores``); the daemon reports it as an event once the link is attached. Sending
never raises into the caller (a stream thread, the API): a store that fails while running is
logged and the message counted as not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from agent.config import MqttSection
from agent.link.commands import command_specs
from cloud_sync.errors import OutboxError
from cloud_sync.mqtt.commands import CommandLog, Dispatcher
from cloud_sync.mqtt.session import DeviceSession, IncomingMessage
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.outbox import DeadLetter, Outbox
from cloud_sync.stores import open_or_replace

if TYPE_CHECKING:
    from agent.operations import Operations

log = structlog.get_logger(__name__)


def link_settings(mqtt: MqttSection, device_id: str) -> LinkSettings:
    assert mqtt.url is not None
    broker = BrokerSettings(
        url=mqtt.url, client_id=mqtt.client_id or device_id, protocol=mqtt.protocol,
        username=mqtt.username, password=mqtt.password, ca_file=str(mqtt.ca_file) if mqtt.ca_file else None,
        cert_file=str(mqtt.cert_file) if mqtt.cert_file else None,
        key_file=str(mqtt.key_file) if mqtt.key_file else None,
        keepalive_s=mqtt.keepalive_s, backoff_min_s=mqtt.backoff_min_s, backoff_max_s=mqtt.backoff_max_s)
    return LinkSettings(device_id=device_id, prefix=mqtt.prefix, groups=mqtt.groups,
                        max_command_bytes=mqtt.max_command_bytes, telemetry_interval_s=mqtt.telemetry_interval_s,
                        publish_window=mqtt.publish_window, refused_max_attempts=mqtt.refused_max_attempts,
                        refused_backoff_s=mqtt.refused_backoff_s, broker=broker)


DEAD_LETTER_EVENT = "outbox.dead_lettered"


class CloudLink:
    """Session, outbox and commands of one device. ``event``/``result``/``inventory_changed`` are thread-safe."""

    def __init__(self, mqtt: MqttSection, device_id: str, state_dir: Path, ops: Operations) -> None:
        self.ops = ops
        self.settings = link_settings(mqtt, device_id)
        state = state_dir / "cloud"
        outbox_path, log_path = state / "outbox.db", state / "commands.db"
        self.outbox = open_or_replace(outbox_path, "outbox", lambda: Outbox(
            outbox_path, max_messages=mqtt.outbox_max_messages, max_bytes=mqtt.outbox_max_bytes,
            synchronous=mqtt.outbox_synchronous))
        try:
            self.commands_log = open_or_replace(log_path, "command_log", lambda: CommandLog(log_path))
            self.loop: asyncio.AbstractEventLoop | None = None
            self.session = DeviceSession(self.settings, self.outbox, on_message=self._incoming,
                                         on_dead_letter=self._dead_letter, on_connected=self._restored)
        except BaseException:
            self.outbox.close()
            raise
        self._store_failures = 0
        self._last_store_log = -math.inf
        topics = self.session.topics
        own = {topics.commands} | {topics.group_commands(g) for g in self.settings.groups}
        self.dispatcher = Dispatcher(command_specs(ops), self.commands_log, self._reply, self.event,
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
        await asyncio.to_thread(self.outbox.close)
        await asyncio.to_thread(self.commands_log.close)

    def set_telemetry_interval(self, seconds: float) -> None:
        self.telemetry_interval = seconds
        self._wake_telemetry.set()

    # -- device-originated messages (any thread) ----------------------------------------------------
    def birth(self) -> dict[str, Any]:
        info = self.ops.info
        return {"agent_version": info.version, "profile": info.profile, "health": self.health,
                "started_at": info.started_at, "groups": list(self.settings.groups), "models": self.ops.inventory(),
                "shadows": self.ops.shadow_summary()}

    def inventory_changed(self) -> None:
        self.session.set_birth(self.birth())

    def event(self, payload: Mapping[str, Any]) -> None:
        self._enqueue("event", self.session.topics.events, {"ts": time.time(), **payload})

    def result(self, stream: str, payload: Mapping[str, Any]) -> int | None:
        """The result's seq; -1 (``DROPPED``) when the outbox is full, None when it failed (logged)."""
        return self._enqueue("result", self.session.topics.results(stream),
                             {"ts": time.time(), "stream": stream, **payload})

    def _enqueue(self, kind: Any, topic: str, payload: Mapping[str, Any]) -> int | None:
        try:
            return self.session.enqueue(kind, topic, payload)
        except OutboxError as exc:  # a disk error while running: the caller (a stream, the API) carries on
            self._store_failures += 1
            now = time.monotonic()
            if now - self._last_store_log > 5:
                self._last_store_log = now
                log.error("cloud.outbox_failed", reason=exc.reason, failures=self._store_failures)
            return None

    def _dead_letter(self, dead: DeadLetter) -> None:
        """Sender thread: the broker kept refusing a message; tell the fleet (unless that was such a notice)."""
        if dead.topic == self.session.topics.events:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                if orjson.loads(dead.payload).get("type") == DEAD_LETTER_EVENT:
                    return  # never a notice about a notice: refused events would feed themselves
        self.event({"type": DEAD_LETTER_EVENT, "message_seq": dead.seq, "kind": dead.kind, "topic": dead.topic,
                    "reason": dead.reason, "attempts": dead.attempts})

    def _restored(self, outage: Mapping[str, Any]) -> None:
        """Net thread: connected again after failed attempts or a lost connection."""
        self.event({"type": "link.restored", **outage})

    def status(self) -> dict[str, Any]:
        return {"link": self.session.stats(), "outbox": self.outbox.stats().to_dict()}

    def telemetry(self, system: Mapping[str, Any] | None = None) -> dict[str, Any]:
        info = self.ops.info
        return {"ts": time.time(), "uptime_s": round(time.time() - info.started_at, 3), "system": system,
                "models": self.ops.model_counters(), **self.status(), "streams": self.ops.stream_status(),
                "shadows": self.ops.shadows()}

    async def _telemetry(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_telemetry.wait(), self.telemetry_interval)
            self._wake_telemetry.clear()
            try:
                snapshot = await self.ops.monitor.snapshot(max_age_s=1.0)
                body = self.telemetry(snapshot.to_dict())
                await asyncio.to_thread(self.session.enqueue, "telemetry", self.session.topics.telemetry, body)
                # The retained state carries the latest health summary, so `edge-fleet devices` shows it.
                self.health = {**snapshot.summary(), "ts": time.time(), "stuck": self.ops.stuck_workers(),
                               "outbox_depth": body["outbox"]["depth"]}
                self.session.set_birth(self.birth())
            except Exception:
                log.exception("cloud.telemetry_failed")

    # -- commands -------------------------------------------------------------------------------------
    def _incoming(self, message: IncomingMessage) -> None:
        """Net thread -> event loop."""
        loop = self.loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: loop.create_task(self.dispatcher.handle(message)))

    def _reply(self, topic: str, payload: Mapping[str, Any], correlation: bytes | None) -> None:
        if not self.session.publish_now(topic, payload, correlation=correlation):
            log.warning("command.reply_not_sent", topic=topic, id=payload.get("id"), reason="not connected")
