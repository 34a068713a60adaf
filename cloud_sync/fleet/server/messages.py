"""Device messages as the service stores them: topic and payload parsing and validation. Pure, no I/O.

The device id always comes from the topic (a payload's own ``device_id`` is ignored), and so does a
result's stream. Anything that is not what the MQTT contract (docs/mqtt.md) promises raises
:class:`Rejected` with a stable ``reason``; the ingestor counts it, logs it and acknowledges it, so a
poison message never loops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SeqKind = Literal["result", "telemetry", "event"]
_LEAF_KIND: dict[str, SeqKind] = {"telemetry": "telemetry", "events": "event"}

#: Every reason a message is rejected, for counters and docs.
REASONS = ("bad_topic", "too_large", "not_json", "not_object", "bad_seq", "bad_field", "bad_state",
           "bad_response", "unknown_command", "db_rejected")


class Rejected(Exception):  # noqa: N818 - a verdict, not a failure of the service
    """The message breaks the contract; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "", device_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.device_id = device_id
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class SeqRecord:
    """A result, telemetry sample or event: numbered by the device's outbox."""

    kind: SeqKind
    device_id: str
    seq: int
    ts: float
    payload: dict[str, Any]
    stream: str | None = None  # results
    model: str | None = None  # results
    type: str | None = None  # events


@dataclass(frozen=True)
class StateRecord:
    """The retained state: birth, graceful offline, or the Last Will."""

    device_id: str
    state: DeviceState
    payload: dict[str, Any]


@dataclass(frozen=True)
class ResponseRecord:
    """A command response; ``device_id`` is None when it came on our own response topic (the sender knows)."""

    device_id: str | None
    command_id: str
    status: str
    ok: bool | None
    payload: dict[str, Any]


Record = SeqRecord | StateRecord | ResponseRecord

_Name = Annotated[StrictStr, Field(pattern=NAME_RE.pattern)]
_Number = StrictInt | StrictFloat


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: _Name
    version: StrictInt = Field(ge=0, le=2**62)
    runtime: StrictStr | None = Field(default=None, max_length=32)
    delegate: StrictStr | None = Field(default=None, max_length=64)


class DeviceState(BaseModel):
    """The fields of the retained state the service indexes; the rest is kept as sent."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    online: StrictBool
    agent_version: StrictStr | None = Field(default=None, max_length=64)
    profile: StrictStr | None = Field(default=None, max_length=128)
    groups: list[_Name] | None = Field(default=None, max_length=256)
    models: list[ModelInfo] | None = Field(default=None, max_length=256)
    health: dict[str, Any] | None = None
    started_at: _Number | None = None
    ts: _Number | None = None


class Topics:
    """Recognises the topics the ingestor subscribes to under ``prefix``."""

    def __init__(self, prefix: str, response_topic: str | None = None) -> None:
        self.prefix = prefix
        self.devices = f"{prefix}/devices/"
        self.response_topic = response_topic

    def subscriptions(self, share_group: str | None) -> list[str]:
        """Shared (load split between instances) unless ``share_group`` is None, plus state for every
        instance: brokers do not send retained messages on a shared subscription, and state is retained."""
        head = f"$share/{share_group}/" if share_group else ""
        shared = [f"{head}{self.devices}+/{leaf}" for leaf in ("telemetry", "events", "results/+", "responses")]
        own = [f"{self.devices}+/state"] + ([self.response_topic] if self.response_topic else [])
        return shared + own

    def parse(self, topic: str) -> tuple[str | None, str, str | None]:
        """``(device_id, leaf, stream)``; device_id is None for our own response topic.

        Raises:
            Rejected: ``bad_topic``.
        """
        if topic == self.response_topic:
            return None, "responses", None
        if not topic.startswith(self.devices):
            raise Rejected("bad_topic", topic[:200])
        parts = topic[len(self.devices):].split("/")
        device_id = parts[0]
        if not NAME_RE.match(device_id):
            raise Rejected("bad_topic", f"device id {device_id[:140]!r}")
        if len(parts) == 2 and parts[1] in ("state", "telemetry", "events", "responses"):
            return device_id, parts[1], None
        if len(parts) == 3 and parts[1] == "results" and NAME_RE.match(parts[2]):
            return device_id, "results", parts[2]
        raise Rejected("bad_topic", topic[:200], device_id)


def _number(payload: dict[str, Any], key: str, default: float) -> float:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected("bad_field", f"{key}: expected a number")
    return float(value)


def _text(payload: dict[str, Any], key: str, limit: int) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Rejected("bad_field", f"{key}: expected a string of at most {limit} characters")
    return value


def parse(topics: Topics, topic: str, raw: bytes, *, received_at: float, max_bytes: int) -> Record:
    """One MQTT message -> a record to store.

    Raises:
        Rejected: the topic, size, encoding or a field breaks the contract (``device_id`` set when known).
    """
    device_id, leaf, stream = topics.parse(topic)
    try:
        return _parse_payload(device_id, leaf, stream, raw, received_at=received_at, max_bytes=max_bytes)
    except Rejected as exc:
        exc.device_id = device_id
        raise


def _parse_payload(device_id: str | None, leaf: str, stream: str | None, raw: bytes, *, received_at: float,
                   max_bytes: int) -> Record:
    if len(raw) > max_bytes:
        raise Rejected("too_large", f"{len(raw)} bytes > {max_bytes}")
    if b"\\u0000" in raw:  # valid JSON, but PostgreSQL cannot store NUL in text or jsonb: same answer everywhere
        raise Rejected("not_json", "NUL characters are not accepted")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Rejected("not_json", str(exc)[:200]) from None
    if not isinstance(payload, dict):
        raise Rejected("not_object", type(payload).__name__)
    if leaf == "state":
        assert device_id is not None
        try:
            return StateRecord(device_id, DeviceState.model_validate(payload), payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise Rejected("bad_state", f"{where}: {err['msg']}") from None
    if leaf == "responses":
        cid = payload.get("id")
        status = payload.get("status", "done")
        ok = payload.get("ok")
        if not isinstance(cid, str) or not 0 < len(cid) <= 64 or not isinstance(status, str) or len(status) > 16 \
                or not (ok is None or isinstance(ok, bool)):
            raise Rejected("bad_response", "expected {id: str, status?: str, ok?: bool}")
        return ResponseRecord(device_id, cid, status, ok, payload)
    seq = payload.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq < 2**62:
        raise Rejected("bad_seq", "expected a positive integer seq")
    assert device_id is not None
    ts = _number(payload, "ts", received_at)
    if leaf == "results":
        return SeqRecord("result", device_id, seq, ts, payload, stream=stream, model=_text(payload, "model", 200))
    if leaf == "events":
        return SeqRecord("event", device_id, seq, ts, payload, type=_text(payload, "type", 64))
    return SeqRecord(_LEAF_KIND[leaf], device_id, seq, ts, payload)
