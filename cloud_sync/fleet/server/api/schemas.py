"""Response models of the REST API: they document the OpenAPI schema that clients (the web console)
are generated from, and FastAPI checks every answer against them."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a column added by a later migration is dropped, not a 500


class Page(_Out, Generic[T]):
    items: list[T]
    next: str | None = Field(description="pass as `cursor` for the next page; null on the last one")


class ModelOut(_Out):
    name: str
    version: int
    runtime: str | None
    delegate: str | None


class Counters(_Out):
    stored: int = Field(description="messages stored (each seq once)")
    duplicates: int = Field(description="redeliveries of stored messages")
    dropped: int = Field(description="dropped by the flood limit")
    rejected: int = Field(description="messages that broke the contract (not JSON, too large, wrong types)")


class DeviceOut(_Out):
    id: str
    online: bool
    first_seen: float
    last_seen: float = Field(description="when the service last heard from the device (its clock)")
    state_at: float | None
    started_at: float | None
    agent_version: str | None
    profile: str | None
    health: dict[str, Any] | None
    max_seq: int
    groups: list[str]
    models: list[ModelOut]
    counters: Counters


class TelemetrySample(_Out):
    ts: float | None
    payload: dict[str, Any]


class GapSummary(_Out):
    open: int
    missing: int


class DeviceDetail(DeviceOut):
    state: dict[str, Any] | None = Field(description="the last retained state message as sent")
    telemetry: TelemetrySample | None
    gaps: GapSummary


class SeriesPoint(_Out):
    ts: float = Field(description="start of the bucket")
    avg: float
    min: float
    max: float
    count: int


class Series(_Out):
    device_id: str
    metric: str
    since: float
    until: float
    bucket_s: float
    points: list[SeriesPoint]


class _Row(_Out):
    id: int
    device_id: str
    seq: int
    ts: float
    received_at: float
    payload: dict[str, Any]


class ResultOut(_Row):
    stream: str
    model: str | None


class TelemetryOut(_Row):
    pass


class EventOut(_Row):
    type: str | None


class GapOut(_Out):
    id: int
    device_id: str
    first_seq: int
    last_seq: int
    missing: int
    detected_at: float


class CommandOut(_Out):
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    sent_at: float
    sent_by: str | None
    status: str = Field(description="sent | accepted | done")
    ok: bool | None
    response: dict[str, Any] | None = Field(description="the device's final response")
    responded_at: float | None


class TokenOut(_Out):
    id: int
    name: str
    role: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class NewToken(TokenOut):
    token: str = Field(description="shown only in this response")


class ErrorDetail(_Out):
    code: str
    message: str


class ErrorOut(_Out):
    error: ErrorDetail


#: ``responses=`` for routes: the JSON error every 4xx/5xx carries.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in (
        (400, "bad parameter (named in the message)"), (401, "no, unknown, revoked or expired token"),
        (403, "the token's role is too low"), (422, "a parameter of the wrong type or out of range"))}
