"""Deployments: staged rollouts of MODEL@VERSION to devices or a group, persisted and resumable."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud_sync.fleet.server.api.devices import Cursor, Limit
from cloud_sync.fleet.server.api.schemas import ERRORS, ErrorOut, Page, _Out
from cloud_sync.fleet.server.auth import Operator, Viewer
from cloud_sync.fleet.server.context import Ctx, ServerContext
from cloud_sync.fleet.server.errors import BrokerUnavailableError
from cloud_sync.mqtt.contract import ShadowArgs

router = APIRouter(prefix="/api/deployments", tags=["deployments"], responses=ERRORS)
_AMOUNT = r"^\d{1,7}%?$"
Status = Literal["running", "succeeded", "failed", "aborted"]


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1)
    devices: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    group: str | None = Field(default=None, min_length=1, max_length=128)
    online_only: bool = Field(default=True, description="with group: only the members online now")
    canary: str = Field(default="1", pattern=_AMOUNT, description="first wave: a count, or a percentage like 1%")
    wave_size: str | None = Field(default=None, pattern=_AMOUNT, description="later waves (default: all the rest)")
    abort_threshold: str = Field(default="1", pattern=_AMOUNT,
                                 description="failed (or timed out) devices in one wave that stop the rollout")
    wave_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    mode: Literal["swap", "shadow"] = Field(
        default="swap", description="shadow: run beside the serving version until promoted or discarded")
    shadow: ShadowArgs | None = Field(default=None, description="with mode shadow: sample and policy (unset: the "
                                                                "agent's [shadow] defaults)")

    @field_validator("shadow", mode="before")
    @classmethod
    def _strict_shadow(cls, value: Any) -> Any:
        """Strictly typed, as ``Rollouts.create`` takes them: ``true`` is not a count nor ``"0.5"`` a share."""
        return ShadowArgs.model_validate(value, strict=True) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _shadow_needs_its_mode(self) -> DeploymentRequest:
        if self.shadow is not None and self.mode != "shadow":
            raise ValueError("shadow: only with mode 'shadow'")
        return self


class DeviceStatus(_Out):
    device_id: str
    wave: int
    status: str = Field(description="pending | sending | sent | accepted | succeeded | failed | timeout | skipped")
    command_id: str = Field(description="stable: the deploy command's id, see GET /api/commands/{id}")
    sent_at: float | None
    finished_at: float | None
    error: dict[str, Any] | None
    action: str | None = Field(default=None, description="shadow rollouts: promote | discard, once sent")
    action_at: float | None = None
    action_status: str | None = Field(default=None, description="sent | accepted | succeeded | failed")
    action_error: dict[str, Any] | None = None


class DeploymentOut(_Out):
    id: str
    model: str
    version: int
    target: dict[str, Any]
    canary: str
    wave_size: str | None
    abort_threshold: str
    wave_timeout_s: float
    status: str = Field(description="running | succeeded | failed | aborted")
    waves: int
    current_wave: int = Field(description="0-based")
    wave_started_at: float | None
    created_at: float
    created_by: str | None
    updated_at: float
    finished_at: float | None
    reason: str | None
    lease_owner: str | None = Field(description="the instance driving it")
    mode: str = Field(default="swap", description="swap | shadow")
    shadow: dict[str, Any] | None = Field(default=None, description="the shadow arguments sent (shadow mode)")
    action: str | None = Field(default=None, description="promote | discard: what an operator sent the shadows")
    action_by: str | None = None
    action_at: float | None = None
    action_counts: dict[str, int] | None = Field(default=None, description="devices per action outcome")
    counts: dict[str, int]
    devices: list[DeviceStatus] | None = None


@router.post("", status_code=201, response_model=DeploymentOut, summary="Start a staged rollout")
def create(*, ctx: Ctx, who: Operator, body: DeploymentRequest) -> dict[str, Any]:
    if ctx.ingestor is None:
        raise BrokerUnavailableError("this server has no MQTT connection")
    return ctx.rollouts.create(model=body.model, version=body.version, devices=body.devices, group=body.group,
                               online_only=body.online_only, canary=body.canary, wave_size=body.wave_size,
                               abort_threshold=body.abort_threshold, wave_timeout_s=body.wave_timeout_s,
                               created_by=who.name, mode=body.mode, shadow=body.shadow)


@router.get("", response_model=Page[DeploymentOut], summary="Deployments, newest first (without devices)")
def list_deployments(*, ctx: Ctx, _who: Viewer, status: Annotated[Status | None, Query()] = None,
                     cursor: Cursor = None, limit: Limit = None) -> dict[str, Any]:
    return ctx.rollouts.list(status=status, cursor=cursor, limit=ctx.limit(limit))


@router.get("/{deployment_id}", response_model=DeploymentOut, summary="One deployment with every device's status")
def get(*, ctx: Ctx, _who: Viewer, deployment_id: str) -> dict[str, Any]:
    return ctx.rollouts.get(deployment_id)


@router.post("/{deployment_id}/abort", response_model=DeploymentOut,
             responses={409: {"model": ErrorOut, "description": "not running"}},
             summary="Stop: devices not yet contacted are skipped")
def abort(*, ctx: Ctx, who: Operator, deployment_id: str) -> dict[str, Any]:
    return ctx.rollouts.abort(deployment_id, f"aborted by {who.name}")


@router.post("/{deployment_id}/resume", response_model=DeploymentOut,
             responses={409: {"model": ErrorOut, "description": "not aborted"}},
             summary="Carry on an aborted rollout (its failures so far are accepted)")
def resume(*, ctx: Ctx, _who: Operator, deployment_id: str) -> dict[str, Any]:
    return ctx.rollouts.resume(deployment_id)


def _act(ctx: ServerContext, deployment_id: str, action: str, by: str) -> dict[str, Any]:
    if ctx.commands is None:
        raise BrokerUnavailableError("this server has no MQTT connection")
    return ctx.rollouts.act(deployment_id, action, commands=ctx.commands, by=by)


_ACT_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "not a finished shadow rollout, the other action was sent, or no "
                                            "device reached shadowing"},
    503: {"model": ErrorOut, "description": "not connected to the broker"}}


@router.post("/{deployment_id}/promote", status_code=202, response_model=DeploymentOut, responses=_ACT_ERRORS,
             summary="Shadow rollouts: swap the shadow in on every device that reached shadowing")
def promote(*, ctx: Ctx, who: Operator, deployment_id: str) -> dict[str, Any]:
    return _act(ctx, deployment_id, "promote", who.name)


@router.post("/{deployment_id}/discard", status_code=202, response_model=DeploymentOut, responses=_ACT_ERRORS,
             summary="Shadow rollouts: discard the shadow on every device that reached shadowing")
def discard(*, ctx: Ctx, who: Operator, deployment_id: str) -> dict[str, Any]:
    return _act(ctx, deployment_id, "discard", who.name)
