"""Commands to devices: publish on the device's command topic, wait for the final response.

The command is recorded (``commands`` table) before it is published, with an MQTT 5 response topic
that belongs to this instance and the command id as correlation data, so the answer comes back here;
the ingestor stores every response and then calls :meth:`CommandService.on_response`. A device that
answers on its own ``responses`` topic (MQTT 3.1.1) may reach another instance through the shared
subscription: the wait therefore also looks at the database once a second. A timeout is an error for
the caller only; a late answer is still stored against the command.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.dialects import postgresql, sqlite

from cloud_sync.fleet.server import queries
from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.config import ServerSettings
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import BrokerUnavailableError, CommandTimeoutError, NotFoundError, RequestError
from cloud_sync.fleet.server.ingest import Ingestor
from cloud_sync.fleet.server.messages import NAME_RE
from cloud_sync.mqtt.topics import device_topic

COMMAND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_COMMAND_BYTES = 256 * 1024  # what a device accepts by default (mqtt.max_command_bytes)


def _resolve(future: asyncio.Future[dict[str, Any]], payload: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(payload)


class CommandService:
    """Sends commands through the ingestor's MQTT connection. ``send`` is a coroutine; the rest is
    called from the ingest thread."""

    def __init__(self, settings: ServerSettings, db: Database, ingestor: Ingestor) -> None:
        self.settings = settings
        self.db = db
        self.ingestor = ingestor
        self._lock = threading.Lock()
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[dict[str, Any]]]] = {}

    def on_response(self, command_id: str, _device_id: str, payload: dict[str, Any]) -> None:
        """Ingest thread, after the response is committed: wake the request waiting for it."""
        if payload.get("status") == "accepted":
            return
        with self._lock:
            waiter = self._waiters.get(command_id)
        if waiter is not None:
            loop, future = waiter
            loop.call_soon_threadsafe(_resolve, future, payload)

    async def send(self, device_id: str, name: str, args: dict[str, Any], *, timeout: float,
                   sent_by: str | None = None) -> dict[str, Any]:
        """Publish and wait for the final response; returns the stored command (status ``done``).

        Raises:
            RequestError: bad device id, name or arguments (too large).
            NotFoundError: the device has never been seen.
            BrokerUnavailableError: not connected to the broker.
            CommandTimeoutError: no final response within ``timeout`` seconds.
        """
        if not NAME_RE.match(device_id):
            raise RequestError("device_id: letters, digits, '_', '.', '-' (at most 128)")
        if not COMMAND_RE.match(name):
            raise RequestError("name: lower-case letters, digits, '_', '-' (at most 64)")
        cid = uuid.uuid4().hex
        body = orjson.dumps({"id": cid, "name": name, "args": args})
        if len(body) > MAX_COMMAND_BYTES:
            raise RequestError(f"args: the command is larger than {MAX_COMMAND_BYTES} bytes")
        if not self.ingestor.connected:
            raise BrokerUnavailableError("not connected to the MQTT broker; try again shortly")
        await asyncio.to_thread(self._record_new, cid, device_id, name, args, sent_by)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        with self._lock:
            self._waiters[cid] = (loop, future)
        try:
            info = self.publish(device_id, cid, name, args)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerUnavailableError(f"cannot publish the command: {info.rc}")
            await self._wait(cid, device_id, future, timeout)
        finally:
            with self._lock:
                self._waiters.pop(cid, None)
        return await asyncio.to_thread(self.get, cid)

    async def _wait(self, cid: str, device_id: str, future: asyncio.Future[dict[str, Any]], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CommandTimeoutError(f"no final response from {device_id} within {timeout:g} s; a later answer "
                                          f"is stored: GET /api/commands/{cid}", command_id=cid)
            try:
                await asyncio.wait_for(asyncio.shield(future), min(remaining, 1.0))
                return
            except asyncio.TimeoutError:
                if (await asyncio.to_thread(self.get, cid))["status"] == "done":
                    return

    def publish(self, device_id: str, cid: str, name: str, args: dict[str, Any]) -> mqtt.MQTTMessageInfo:
        """Publish one command (QoS 1) with this instance's response topic; thread-safe, does not wait."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.settings.response_topic
        props.CorrelationData = cid.encode()
        body = orjson.dumps({"id": cid, "name": name, "args": args})
        return self.ingestor.publish(device_topic(self.settings.prefix, device_id, "commands"), body, props)

    def record(self, conn: sa.Connection, cid: str, device_id: str, name: str, args: dict[str, Any], *,
               sent_by: str | None) -> None:
        """Record a command about to be sent (once: recording the same id again changes nothing), so that
        its responses are matched to its device."""
        insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
        conn.execute(insert(s.commands).on_conflict_do_nothing(index_elements=["id"]), [
            {"id": cid, "device_id": device_id, "name": name, "args": args, "sent_at": time.time(),
             "sent_by": sent_by, "status": "sent"}])

    def _record_new(self, cid: str, device_id: str, name: str, args: dict[str, Any], sent_by: str | None) -> None:
        with self.db.write() as conn:
            if conn.execute(sa.select(s.devices.c.id).where(s.devices.c.id == device_id)).first() is None:
                raise NotFoundError(f"no device {device_id!r}")
            self.record(conn, cid, device_id, name, args, sent_by=sent_by)

    def get(self, cid: str) -> dict[str, Any]:
        with self.db.read() as conn:
            return queries.get_command(conn, cid)
