"""Results, telemetry samples, events and gaps: filtered lists with keyset paging, and NDJSON / CSV export."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from cloud_sync.fleet.server import queries
from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.api.devices import Cursor, Limit
from cloud_sync.fleet.server.api.schemas import ERRORS, EventOut, GapOut, Page, ResultOut, TelemetryOut
from cloud_sync.fleet.server.auth import Viewer
from cloud_sync.fleet.server.context import Ctx, ServerContext

router = APIRouter(prefix="/api", tags=["records"], responses=ERRORS)

Format = Annotated[Literal["json", "ndjson", "csv"],
                   Query(description="json: one page; ndjson/csv: every match streamed (up to api.max_export_rows "
                                     "or limit), ignoring the page size cap")]
Order = Annotated[Literal["asc", "desc"], Query(description="by arrival (row id)")]
Device = Annotated[str | None, Query(max_length=128)]
Since = Annotated[float | None, Query(description="device timestamp, epoch seconds, inclusive")]
Until = Annotated[float | None, Query(description="device timestamp, epoch seconds, exclusive")]
_ORJSON = orjson.OPT_SERIALIZE_NUMPY
_EXPORTS: dict[int | str, dict[str, Any]] = {200: {"content": {"application/x-ndjson": {}, "text/csv": {}},
                                                    "description": "a page (json) or every match (ndjson, csv)"}}


def _export(ctx: ServerContext, table: sa.Table, f: queries.RowFilter, *, fmt: str, cursor: str | None,
            limit: int | None, order: str, name: str) -> StreamingResponse:
    max_rows = min(limit or ctx.settings.api.max_export_rows, ctx.settings.api.max_export_rows)
    queries.id_cursor(cursor)  # a bad cursor is a 4xx now, not a stream cut short
    rows = queries.iter_rows(ctx.db, table, f, max_rows=max_rows, order=order, start=cursor)  # type: ignore[arg-type]
    columns = [c.name for c in table.columns]

    def ndjson() -> Iterator[bytes]:
        for row in rows:
            yield orjson.dumps(row, option=_ORJSON) + b"\n"

    def as_csv() -> Iterator[str]:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for n, row in enumerate(rows, start=1):
            writer.writerow([orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v
                             for v in (row[c] for c in columns)])
            if n % 500 == 0:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    if fmt == "ndjson":
        return StreamingResponse(ndjson(), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.ndjson"'})
    return StreamingResponse(as_csv(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})


def _list(ctx: ServerContext, table: sa.Table, f: queries.RowFilter, *, fmt: str, cursor: str | None,
          limit: int | None, order: str, name: str) -> Any:
    if fmt != "json":
        return _export(ctx, table, f, fmt=fmt, cursor=cursor, limit=limit, order=order, name=name)
    with ctx.db.read() as conn:
        return queries.list_rows(conn, table, f, cursor=cursor, limit=ctx.limit(limit),
                                 order=order).to_dict()  # type: ignore[arg-type]


@router.get("/results", summary="Inference results, by device, stream and time", response_model=Page[ResultOut],
            responses=_EXPORTS)
def list_results(*, ctx: Ctx, _who: Viewer, device: Device = None,
                 stream: Annotated[str | None, Query(max_length=128)] = None, since: Since = None,
                 until: Until = None, cursor: Cursor = None, limit: Limit = None, order: Order = "asc",
                 format: Format = "json") -> Any:
    f = queries.RowFilter(device=device, stream=stream, since=since, until=until)
    return _list(ctx, s.results, f, fmt=format, cursor=cursor, limit=limit, order=order, name="results")


@router.get("/telemetry", summary="Raw telemetry samples", response_model=Page[TelemetryOut], responses=_EXPORTS)
def list_telemetry(*, ctx: Ctx, _who: Viewer, device: Device = None, since: Since = None, until: Until = None,
                   cursor: Cursor = None, limit: Limit = None, order: Order = "asc",
                   format: Format = "json") -> Any:
    f = queries.RowFilter(device=device, since=since, until=until)
    return _list(ctx, s.telemetry, f, fmt=format, cursor=cursor, limit=limit, order=order, name="telemetry")


@router.get("/events", summary="Device events (deployments, errors, fallbacks, command completions)",
            response_model=Page[EventOut], responses=_EXPORTS)
def list_events(*, ctx: Ctx, _who: Viewer, device: Device = None,
                type: Annotated[str | None, Query(max_length=64)] = None,
                since: Since = None, until: Until = None, cursor: Cursor = None, limit: Limit = None,
                order: Order = "asc", format: Format = "json") -> Any:
    f = queries.RowFilter(device=device, type=type, since=since, until=until)
    return _list(ctx, s.events, f, fmt=format, cursor=cursor, limit=limit, order=order, name="events")


@router.get("/gaps", summary="Seq ranges a device sent that never arrived (lost or still in flight)",
            response_model=Page[GapOut])
def list_gaps(*, ctx: Ctx, _who: Viewer, device: Device = None, cursor: Cursor = None,
              limit: Limit = None) -> dict[str, Any]:
    with ctx.db.read() as conn:
        return queries.list_gaps(conn, device=device, cursor=cursor, limit=ctx.limit(limit)).to_dict()
