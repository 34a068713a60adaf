"""Overview, devices table, device page (with its command runner), plot data and the live event stream.

Pages are plain ``def`` routes (FastAPI runs them, and their database reads, in its thread pool); each
page has ``/ui/...`` fragments that its script refetches when the live stream names their part.
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cloud_sync.fleet.server import queries
from cloud_sync.fleet.server.console import live, series, views
from cloud_sync.fleet.server.console.web import SECURITY_HEADERS, Con, Console, PostingOperator, User, json_response
from cloud_sync.fleet.server.errors import BrokerUnavailableError, FleetServerError, RequestError

router = APIRouter(include_in_schema=False)

#: What the command runner offers, with an example of its arguments.
COMMANDS = {"ping": {}, "status": {}, "logs": {"lines": 50}, "reload": {},
            "set-config": {"values": {"mqtt.telemetry_interval_s": 10}},
            "stream-start": {"stream": "cam"}, "stream-stop": {"stream": "cam"}}


def live_url(console: Console, page: str, key: str = "") -> str:
    """The page's event stream, with the signatures it is rendered with (blocking: call from a thread)."""
    return "/ui/live?" + urlencode({"page": page, "id": key,
                                    "d": live.encode_digests(console.live.digests(page, key))})


# -- overview ---------------------------------------------------------------------------------------------------
def _overview(console: Console) -> dict[str, Any]:
    with console.ctx.db.read() as conn:
        data = views.overview(conn)
    ingestor = console.ctx.ingestor
    data["ingest"] = ingestor.stats() if ingestor is not None else None
    return data


@router.get("/")
def overview_page(console: Con, request: Request, _user: User) -> Response:
    url = live_url(console, "overview")
    return console.render(request, "overview.html", live=url, o=_overview(console))


@router.get("/ui/overview")
def overview_fragment(console: Con, request: Request, _user: User) -> Response:
    return console.render(request, "_overview.html", o=_overview(console))


# -- devices ----------------------------------------------------------------------------------------------------
def _table(console: Console, request: Request) -> dict[str, Any]:
    q = views.DeviceQuery.parse(request.query_params)
    with console.ctx.db.read() as conn:
        rows, total = views.devices_page(conn, q)
        groups = views.known_groups(conn)
    return {"q": q, "rows": rows, "total": total, "pages": views.pages(total, q.per_page), "groups": groups}


@router.get("/devices")
def devices_page(console: Con, request: Request, _user: User) -> Response:
    url = live_url(console, "devices")
    return console.render(request, "devices.html", live=url, **_table(console, request))


@router.get("/ui/devices")
def devices_fragment(console: Con, request: Request, _user: User) -> Response:
    return console.render(request, "_devices_table.html", **_table(console, request))


# -- one device -------------------------------------------------------------------------------------------------
def _device(console: Console, device_id: str) -> dict[str, Any]:
    with console.ctx.db.read() as conn:
        return {"d": queries.get_device(conn, device_id), "agent_status": views.last_status(conn, device_id)}


@router.get("/devices/{device_id}")
def device_page(console: Con, request: Request, _user: User, device_id: str,
                range: Annotated[str, Query(max_length=8)] = series.DEFAULT_RANGE) -> Response:
    info = _device(console, device_id)  # 404 first
    with console.ctx.db.read() as conn:
        events = views.device_events(conn, device_id)
        results = views.latest_results(conn, device_id)
        commands = views.device_commands(conn, device_id)
    return console.render(request, "device.html", live=live_url(console, "device", device_id), events=events,
                          results=results, commands=commands, ranges=list(series.RANGES),
                          range=range if range in series.RANGES else series.DEFAULT_RANGE, command_examples=COMMANDS,
                          metrics=series.METRICS, **info)


@router.get("/ui/devices/{device_id}/info")
def device_info_fragment(console: Con, request: Request, _user: User, device_id: str) -> Response:
    return console.render(request, "_device_info.html", **_device(console, device_id))


@router.get("/ui/devices/{device_id}/events")
def device_events_fragment(console: Con, request: Request, _user: User, device_id: str) -> Response:
    with console.ctx.db.read() as conn:
        events = views.device_events(conn, device_id)
    return console.render(request, "_device_events.html", events=events)


@router.get("/ui/devices/{device_id}/results")
def device_results_fragment(console: Con, request: Request, _user: User, device_id: str) -> Response:
    with console.ctx.db.read() as conn:
        results = views.latest_results(conn, device_id)
    return console.render(request, "_device_results.html", results=results)


@router.get("/ui/devices/{device_id}/commands")
def device_commands_fragment(console: Con, request: Request, _user: User, device_id: str) -> Response:
    with console.ctx.db.read() as conn:
        commands = views.device_commands(conn, device_id)
    return console.render(request, "_device_commands.html", commands=commands)


@router.get("/ui/devices/{device_id}/series")
def device_series(console: Con, request: Request, _user: User, device_id: str,
                  range: Annotated[str, Query(max_length=8)] = series.DEFAULT_RANGE) -> Response:
    with console.ctx.db.read() as conn:
        queries.get_device(conn, device_id)
        data = series.series(conn, device_id, range, time.time())
    return json_response(request, data)


@router.post("/devices/{device_id}/command")
async def run_command(console: Con, request: Request, user: PostingOperator, device_id: str) -> Response:
    """Send a command and wait for the device's answer: JSON for the page's script, a page without it."""
    form = await request.form()
    name = str(form.get("name") or "")
    wants_json = "application/json" in request.headers.get("accept", "")
    try:
        if name not in COMMANDS:
            raise RequestError(f"name: one of {', '.join(COMMANDS)}")
        raw = str(form.get("args") or "").strip() or "{}"
        try:
            args = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"args: not JSON ({exc})") from None
        if not isinstance(args, dict):
            raise RequestError("args: a JSON object, e.g. {}")
        if console.ctx.commands is None:
            raise BrokerUnavailableError("this server has no MQTT connection")
        result = await console.ctx.commands.send(device_id, name, args, sent_by=user.name,
                                                 timeout=console.ctx.settings.api.command_timeout_s)
    except FleetServerError as exc:
        if wants_json:
            return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status,
                                headers=SECURITY_HEADERS)
        return console.render(request, "command_result.html", status=exc.status, device_id=device_id, result=None,
                              error=exc)
    if wants_json:
        return json_response(request, result)
    return console.render(request, "command_result.html", device_id=device_id, result=result, error=None)


# -- live -------------------------------------------------------------------------------------------------------
@router.get("/ui/live")
async def live_stream(console: Con, request: Request, _user: User,
                      page: Annotated[str, Query(max_length=16)], id: Annotated[str, Query(max_length=128)] = "",
                      d: Annotated[str, Query(max_length=600)] = "") -> Response:
    if page not in live.PAGES:
        raise RequestError(f"page: one of {', '.join(live.PAGES)}")
    feed = console.live
    if feed.streams >= feed.max_streams:
        return JSONResponse({"error": {"code": "busy", "message": "too many live views open"}}, status_code=503,
                            headers={"Retry-After": "5"})

    async def body() -> Any:
        feed.streams += 1
        try:
            async for chunk in feed.stream(page, id, live.decode_digests(d), request.is_disconnected):
                yield chunk
        finally:
            feed.streams -= 1

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})
