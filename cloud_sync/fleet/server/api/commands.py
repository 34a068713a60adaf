"""Commands: send one to a device and wait for its final response; list and look up sent commands."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.fleet.server import queries
from cloud_sync.fleet.server.api.devices import Cursor, Limit
from cloud_sync.fleet.server.api.schemas import ERRORS, CommandOut, ErrorOut, Page
from cloud_sync.fleet.server.auth import Operator, Viewer
from cloud_sync.fleet.server.context import Ctx
from cloud_sync.fleet.server.errors import BrokerUnavailableError, RequestError

router = APIRouter(prefix="/api", tags=["commands"], responses=ERRORS)


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="ping, status, deploy, rollback, reload, "
                                                               "set-config, stream-start, stream-stop, logs")
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0, description="default api.command_timeout_s")


@router.post("/devices/{device_id}/commands", summary="Send a command and wait for the device's final response",
             response_model=CommandOut,
             responses={404: {"model": ErrorOut, "description": "no such device"},
                        504: {"model": ErrorOut, "description": "no final response in time (the message names the "
                                                               "command id)"},
                        503: {"model": ErrorOut, "description": "not connected to the broker"}})
async def send_command(*, ctx: Ctx, who: Operator, device_id: str, body: CommandRequest) -> dict[str, Any]:
    if ctx.commands is None:
        raise BrokerUnavailableError("this server has no MQTT connection")
    timeout = body.timeout_s or ctx.settings.api.command_timeout_s
    if timeout > ctx.settings.api.max_command_timeout_s:
        raise RequestError(f"timeout_s: at most {ctx.settings.api.max_command_timeout_s:g}")
    return await ctx.commands.send(device_id, body.name, body.args, timeout=timeout, sent_by=who.name)


@router.get("/commands", summary="Sent commands, newest first", response_model=Page[CommandOut])
def list_commands(*, ctx: Ctx, _who: Viewer, device: Annotated[str | None, Query(max_length=128)] = None,
                  cursor: Cursor = None, limit: Limit = None) -> dict[str, Any]:
    with ctx.db.read() as conn:
        return queries.list_commands(conn, device=device, cursor=cursor, limit=ctx.limit(limit)).to_dict()


@router.get("/commands/{command_id}", summary="One command with its final response (status sent|accepted|done)",
            response_model=CommandOut)
def get_command(*, ctx: Ctx, _who: Viewer, command_id: str) -> dict[str, Any]:
    with ctx.db.read() as conn:
        return queries.get_command(conn, command_id)
