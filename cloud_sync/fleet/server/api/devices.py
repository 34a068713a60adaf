"""Devices: the inventory (from retained state), one device, and a telemetry metric over time."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from cloud_sync.fleet.server import queries
from cloud_sync.fleet.server.api.schemas import ERRORS, DeviceDetail, DeviceOut, Page, Series
from cloud_sync.fleet.server.auth import Viewer
from cloud_sync.fleet.server.context import Ctx

router = APIRouter(prefix="/api/devices", tags=["devices"], responses=ERRORS)

Limit = Annotated[int | None, Query(ge=1, description="page size (default api.default_limit, capped at "
                                                      "api.max_limit)")]
Cursor = Annotated[str | None, Query(max_length=200, description="the `next` value of the previous page")]


@router.get("", summary="List devices, by id", response_model=Page[DeviceOut])
def list_devices(*, ctx: Ctx, _who: Viewer,
                 group: Annotated[str | None, Query(max_length=128)] = None,
                 online: bool | None = None,
                 model: Annotated[str | None, Query(max_length=200, description="NAME or NAME@VERSION")] = None,
                 version: Annotated[str | None, Query(max_length=64, description="agent version")] = None,
                 cursor: Cursor = None, limit: Limit = None) -> dict[str, Any]:
    with ctx.db.read() as conn:
        return queries.list_devices(conn, group=group, online=online, model=model, version=version,
                                    cursor=cursor, limit=ctx.limit(limit)).to_dict()


@router.get("/{device_id}", summary="One device with its state, latest telemetry and gap summary",
            response_model=DeviceDetail)
def get_device(*, ctx: Ctx, _who: Viewer, device_id: str) -> dict[str, Any]:
    with ctx.db.read() as conn:
        return queries.get_device(conn, device_id)


@router.get("/{device_id}/telemetry", summary="A telemetry metric over a time range, downsampled",
            response_model=Series)
def telemetry_series(*, ctx: Ctx, _who: Viewer, device_id: str,
                     metric: Annotated[str, Query(max_length=300, description="dotted path into the telemetry "
                                                                             "payload, e.g. system.cpu_percent")],
                     since: Annotated[float | None, Query(description="epoch seconds (default until - 24 h)")] = None,
                     until: Annotated[float | None, Query(description="epoch seconds (default now)")] = None,
                     points: Annotated[int, Query(ge=1, description="at most this many points "
                                                                   "(capped at api.max_series_points)")] = 500,
                     ) -> dict[str, Any]:
    start, end = queries.default_range(since, until)
    with ctx.db.read() as conn:
        queries.get_device(conn, device_id)  # 404 for an unknown device rather than an empty series
        return queries.telemetry_series(conn, device_id, metric, since=start, until=end,
                                        points=min(points, ctx.settings.api.max_series_points))
