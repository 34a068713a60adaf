"""The fleet console's MQTT client: device inventory from retained state, commands with
responses, staged rollouts and watching a device's streams.

Blocking API (paho's own network thread) because its users are a CLI and tests.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.mqtt.session import connect, make_client
from cloud_sync.mqtt.settings import BrokerSettings


class FleetError(Exception):
    """The console could not do what was asked (broker unreachable, timeout, no such device)."""


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retained: bool
    correlation: bytes | None
    received: float

    def json(self) -> Any:
        try:
            return orjson.loads(self.payload)
        except orjson.JSONDecodeError:
            return None


@dataclass
class Device:
    id: str
    online: bool
    state: dict[str, Any]
    seen: float | None  # the state message's own timestamp

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.state.get("models") or [])

    @property
    def groups(self) -> list[str]:
        return list(self.state.get("groups") or [])


class FleetClient:
    def __init__(self, broker: BrokerSettings, prefix: str = "edge/v1") -> None:
        self.broker = broker
        self.prefix = prefix
        self.client_id = broker.client_id or f"edge-fleet-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"{prefix}/console/{self.client_id}/responses"
        self._client = make_client(broker, self.client_id)
        self._messages: queue.Queue[Message] = queue.Queue()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._subacks: set[int] = set()
        self._subacked = threading.Condition()
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # -- connection ------------------------------------------------------------------------------------
    def __enter__(self) -> FleetClient:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        """Raises FleetError if the broker cannot be reached or refuses us within ``timeout``."""
        try:
            connect(self._client, self.broker)
        except (OSError, ValueError) as exc:
            raise FleetError(f"cannot connect to the broker at {self.broker.url}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            self.close()
            raise FleetError(f"broker at {self.broker.url} refused or did not answer: {self._refused or 'timeout'}")
        if self.broker.protocol == "5":
            self.subscribe([self.reply_topic])

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        self._messages.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain), correlation, time.time()))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with self._subacked:  # the SUBACK may arrive before subscribe() has returned the mid to us
            self._subacks.add(mid)
            self._subacked.notify_all()

    def subscribe(self, topics: Sequence[str], timeout: float = 15.0) -> None:
        """Raises FleetError if the broker refuses or has not acknowledged within ``timeout`` s (a busy
        broker or machine can take seconds: a SUBACK after 5 s was seen on a loaded 2-core machine)."""
        result, mid = self._client.subscribe([(t, 1) for t in topics])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise FleetError(f"subscribe failed: {result}")
        with self._subacked:
            if not self._subacked.wait_for(lambda: mid in self._subacks, timeout):
                raise FleetError(f"no SUBACK from the broker within {timeout:g} s")
            self._subacks.discard(mid)

    def messages(self, timeout: float, *, quiet: float | None = None) -> Iterator[Message]:
        """Messages until ``timeout`` s pass (or ``quiet`` s pass without any)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                yield self._messages.get(timeout=min(remaining, quiet) if quiet else remaining)
            except queue.Empty:
                if quiet:
                    return

    # -- inventory -------------------------------------------------------------------------------------
    def devices(self, wait: float = 1.0) -> list[Device]:
        """Devices that have a retained state message, read within ``wait`` seconds."""
        self.subscribe([f"{self.prefix}/devices/+/state"])
        found: dict[str, Device] = {}
        head = f"{self.prefix}/devices/"
        for msg in self.messages(wait * 5, quiet=wait):
            device_id, _, leaf = msg.topic[len(head):].partition("/")
            state = msg.json()
            if not msg.topic.startswith(head) or leaf != "state" or not isinstance(state, dict):
                continue  # other subscriptions of this client (results, events) share the queue
            found[device_id] = Device(device_id, bool(state.get("online")), state, state.get("ts"))
        return sorted(found.values(), key=lambda d: d.id)

    def members(self, group: str, wait: float = 1.0) -> list[Device]:
        return [d for d in self.devices(wait) if group in d.groups]

    # -- commands -------------------------------------------------------------------------------------
    def send(self, device: str | None, name: str, args: dict[str, Any] | None = None, *, group: str | None = None,
             cid: str | None = None) -> str:
        """Publish a command; returns its id. With MQTT 3.1.1, answers come on the device's responses topic."""
        cid = cid or uuid.uuid4().hex
        topic = (f"{self.prefix}/groups/{group}/commands" if group else f"{self.prefix}/devices/{device}/commands")
        properties = None
        if self.broker.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = self.reply_topic
            properties.CorrelationData = cid.encode()
        elif device:
            self.subscribe([f"{self.prefix}/devices/{device}/responses"])
        payload = orjson.dumps({"id": cid, "name": name, "args": args or {}})
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(10)
        return cid

    def responses(self, cid: str, timeout: float, *, expect: int = 1,
                  on_response: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Final responses to ``cid`` (``accepted`` ones are reported through ``on_response`` only)."""
        finals: list[dict[str, Any]] = []
        for msg in self.messages(timeout):
            body = msg.json()
            if not isinstance(body, dict) or body.get("id") != cid:
                continue  # an answer to some other (or an earlier) command: not ours to report
            body.setdefault("device_id", msg.topic.split("/")[-2] if "/devices/" in msg.topic else None)
            if on_response is not None:
                on_response(body)
            if body.get("status") != "accepted":
                finals.append(body)
                if len(finals) >= expect:
                    break
        return finals

    def command(self, device: str, name: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
                on_response: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send and wait for the final response. Raises FleetError on timeout."""
        cid = self.send(device, name, args)
        finals = self.responses(cid, timeout, on_response=on_response)
        if not finals:
            raise FleetError(f"no response from {device} to '{name}' within {timeout:g} s")
        return finals[0]


@dataclass
class RolloutReport:
    waves: list[list[str]]
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    aborted: bool = False

    @property
    def ok(self) -> bool:
        return not self.aborted and not self.failed


def plan_waves(targets: Sequence[str], canary: str, wave_size: int | None) -> list[list[str]]:
    """``canary`` is a count ("1") or a percentage ("10%"); the rest go in waves of ``wave_size``."""
    targets = list(targets)
    count = max(1, round(len(targets) * float(canary[:-1]) / 100)) if canary.endswith("%") else int(canary)
    count = min(max(count, 0), len(targets))
    waves = [targets[:count]] if count else []
    rest = targets[count:]
    size = wave_size or len(rest) or 1
    waves += [rest[i:i + size] for i in range(0, len(rest), size)]
    return [w for w in waves if w]


def rollout(client: FleetClient, targets: Sequence[str], name: str, args: dict[str, Any], *, canary: str = "1",
            wave_size: int | None = None, abort_after: int = 1, timeout: float = 600.0,
            progress: Callable[[str, dict[str, Any]], None] | None = None) -> RolloutReport:
    """Send ``name`` wave by wave; stop before the next wave once ``abort_after`` devices failed."""
    report = RolloutReport(plan_waves(targets, canary, wave_size))
    notify = progress or (lambda _kind, _info: None)
    for index, wave in enumerate(report.waves):
        if len(report.failed) >= abort_after:
            report.aborted = True
            report.skipped = [d for w in report.waves[index:] for d in w]
            notify("aborted", {"failed": dict(report.failed), "skipped": report.skipped})
            break
        notify("wave", {"index": index, "devices": wave})
        ids = {client.send(device, name, args): device for device in wave}
        deadline = time.monotonic() + timeout
        pending = dict(ids)
        while pending and time.monotonic() < deadline:
            for msg in client.messages(min(1.0, max(deadline - time.monotonic(), 0.01))):
                body = msg.json()
                if not isinstance(body, dict) or body.get("id") not in pending:
                    continue
                device = pending[body["id"]]
                notify("response", {"device": device, **body})
                if body.get("status") == "accepted":
                    continue
                del pending[body["id"]]
                if body.get("ok"):
                    report.succeeded.append(device)
                else:
                    err = body.get("error") or {}
                    report.failed[device] = f"{err.get('code')}: {err.get('message')}"
                break
        for device in pending.values():
            report.failed[device] = f"timeout: no final response within {timeout:g} s"
    return report
