"""Deployments: the list, the deploy wizard, a rollout's live page, abort and resume, and a shadow rollout's
promote and discard.

The wizard and the buttons call the same :class:`~cloud_sync.fleet.server.rollouts.Rollouts` methods as
``POST /api/deployments`` and its ``abort``/``resume``/``promote``/``discard``, with the logged-in token's
name as the author, so a rollout started here is the one the API and ``edge-fleet deploy --via-server`` see. A refused
wizard (unknown devices, a bad canary...) comes back with the values kept and the message next to the
field it names.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from cloud_sync.fleet.server.auth import Role
from cloud_sync.fleet.server.console import views
from cloud_sync.fleet.server.console.fleet_routes import live_url
from cloud_sync.fleet.server.console.web import (
    SECURITY_HEADERS,
    Con,
    Console,
    Operator,
    PostingOperator,
    User,
    json_response,
)
from cloud_sync.fleet.server.errors import BrokerUnavailableError, ConflictError, NotFoundError, RequestError
from cloud_sync.fleet.server.rollouts import shadow_args

router = APIRouter(include_in_schema=False)

SHADOW_FIELDS = ("sample", "min_samples", "min_agreement", "max_latency_ratio")
FIELDS = ("model", "target", "group", "devices", "online_only", "canary", "wave_size", "abort_threshold",
          "wave_timeout_s", "mode", *SHADOW_FIELDS)
DEFAULTS = {"model": "", "target": "group", "group": "", "devices": "", "online_only": "on", "canary": "1",
            "wave_size": "", "abort_threshold": "1", "wave_timeout_s": "600", "mode": "swap",
            **dict.fromkeys(SHADOW_FIELDS, "")}
_SPLIT = re.compile(r"[\s,;]+")


def _list(console: Console) -> list[dict[str, Any]]:
    return console.ctx.rollouts.list(status=None, cursor=None, limit=50)["items"]


@router.get("/deployments")
def deployments_page(console: Con, request: Request, _user: User) -> Response:
    url = live_url(console, "deployments")
    return console.render(request, "deployments.html", live=url, items=_list(console))


@router.get("/ui/deployments")
def deployments_fragment(console: Con, request: Request, _user: User) -> Response:
    return console.render(request, "_deployments.html", items=_list(console))


def _wizard(console: Console, request: Request, values: dict[str, str], errors: dict[str, str],
            status: int = 200) -> Response:
    with console.ctx.db.read() as conn:
        groups = views.known_groups(conn)
    return console.render(request, "deploy_new.html", status=status, values=values, errors=errors, groups=groups,
                          catalogue=console.catalogue.listing())


@router.get("/deployments/new")
def wizard(console: Con, request: Request, _user: Operator) -> Response:
    values = dict(DEFAULTS)
    for key in ("model", "group", "devices"):
        if request.query_params.get(key):
            values[key] = request.query_params[key][:2000]
    if request.query_params.get("devices"):
        values["target"] = "devices"
    return _wizard(console, request, values, {})


def _create(console: Console, values: dict[str, str], author: str) -> dict[str, Any]:
    """Raises: RequestError naming the field (``field: reason``)."""
    name, sep, version = values["model"].strip().partition("@")
    if not sep or not version.isdigit() or int(version) < 1:
        raise RequestError("model: NAME@VERSION, e.g. silero-vad@2")
    try:
        timeout = float(values["wave_timeout_s"])
    except ValueError:
        raise RequestError("wave_timeout_s: seconds, e.g. 600") from None
    if not 0 < timeout <= 86400:
        raise RequestError("wave_timeout_s: between 0 and 86400 seconds")
    devices = [x for x in _SPLIT.split(values["devices"]) if x] if values["target"] == "devices" else None
    if values["target"] == "devices" and not devices:
        raise RequestError("devices: list at least one device id")
    group = values["group"].strip() or None if values["target"] == "group" else None
    if values["target"] == "group" and group is None:
        raise RequestError("group: choose a group")
    mode, shadow, fields = values["mode"], None, {}
    given = [key for key in SHADOW_FIELDS if values[key].strip()]
    if mode != "shadow" and given:
        raise RequestError(f"{given[0]}: only for a shadow deployment (choose 'as a shadow', or leave it empty)")
    if mode == "shadow":
        for key in SHADOW_FIELDS:  # left empty: the agent's [shadow] default
            text = values[key].strip()
            if text:
                try:
                    fields[key] = int(text) if key == "min_samples" else float(text)
                except ValueError:
                    raise RequestError(f"{key}: {'a whole number' if key == 'min_samples' else 'a number'}") from None
        shadow = shadow_args(mode, fields)  # its ranges, before the broker is asked for
    if console.ctx.ingestor is None:
        raise BrokerUnavailableError("this server has no MQTT connection")
    return console.ctx.rollouts.create(model=name, version=int(version), devices=devices, group=group,
                                       online_only=values["online_only"] == "on", canary=values["canary"].strip(),
                                       wave_size=values["wave_size"].strip() or None,
                                       abort_threshold=values["abort_threshold"].strip(), wave_timeout_s=timeout,
                                       created_by=author, mode=mode, shadow=shadow)


@router.post("/deployments/new")
async def start(console: Con, request: Request, user: PostingOperator) -> Response:
    form = await request.form()
    values = {key: str(form.get(key) or "")[:100_000] for key in FIELDS}
    values["target"] = "devices" if values["target"] == "devices" else "group"
    values["mode"] = "shadow" if values["mode"] == "shadow" else "swap"
    try:
        dep = await asyncio.to_thread(_create, console, values, user.name)
    except RequestError as exc:
        field, sep, reason = exc.message.partition(": ")
        field = field.removeprefix("shadow.")
        field = field if sep and field in FIELDS else "form"
        return await asyncio.to_thread(_wizard, console, request, values, {field: reason if sep else exc.message}, 400)
    return RedirectResponse(f"/deployments/{dep['id']}", status_code=303, headers=SECURITY_HEADERS)


def _rollout(console: Console, dep_id: str) -> dict[str, Any]:
    dep = console.ctx.rollouts.get(dep_id, with_devices=False)
    with console.ctx.db.read() as conn:
        return views.rollout_view(dep, views.rollout_states(conn, dep, console.installs.newest(conn, dep)))


@router.get("/deployments/{dep_id}")
def rollout_page(console: Con, request: Request, _user: User, dep_id: str) -> Response:
    url = live_url(console, "rollout", dep_id)
    return console.render(request, "rollout.html", live=url, dep=_rollout(console, dep_id), message=None)


@router.get("/ui/deployments/{dep_id}")
def rollout_update(console: Con, request: Request, _user: User, dep_id: str) -> Response:
    """What the live page patches in: its head (status, reason, tally, buttons) as HTML, and every device's
    row as ``[id, state, code, message, ts]`` (a 1,000-device rollout is ~60 KB, not a 250 KB table)."""
    dep = _rollout(console, dep_id)
    head = console.env.get_template("_rollout_head.html").render(dep=dep, user=request.state.console_user,
                                                                 now=time.time(), Role=Role)
    body = {"status": dep["status"], "current_wave": dep["current_wave"], "head": head,
            "devices": [st.compact() for wave in dep["wave_devices"] for st in wave]}
    return json_response(request, body)


async def _act(console: Console, request: Request, dep_id: str, action: str, author: str) -> Response:
    rollouts = console.ctx.rollouts
    try:
        if action == "abort":
            await asyncio.to_thread(rollouts.abort, dep_id, f"aborted by {author} in the console")
        elif action == "resume":
            await asyncio.to_thread(rollouts.resume, dep_id)
        elif console.ctx.commands is None:
            raise BrokerUnavailableError("this server has no MQTT connection")
        else:  # promote, discard
            await asyncio.to_thread(rollouts.act, dep_id, action, commands=console.ctx.commands, by=author)
    except NotFoundError:
        raise
    except (ConflictError, BrokerUnavailableError) as exc:  # someone else (or the runner) got there first, or
        url = await asyncio.to_thread(live_url, console, "rollout", dep_id)  # no broker: show why, with the page
        dep = await asyncio.to_thread(_rollout, console, dep_id)
        return console.render(request, "rollout.html", status=exc.status, live=url, dep=dep, message=exc.message)
    return RedirectResponse(f"/deployments/{dep_id}", status_code=303, headers=SECURITY_HEADERS)


@router.post("/deployments/{dep_id}/abort")
async def abort(console: Con, request: Request, user: PostingOperator, dep_id: str) -> Response:
    return await _act(console, request, dep_id, "abort", user.name)


@router.post("/deployments/{dep_id}/resume")
async def resume(console: Con, request: Request, user: PostingOperator, dep_id: str) -> Response:
    return await _act(console, request, dep_id, "resume", user.name)


@router.post("/deployments/{dep_id}/promote")
async def promote(console: Con, request: Request, user: PostingOperator, dep_id: str) -> Response:
    return await _act(console, request, dep_id, "promote", user.name)


@router.post("/deployments/{dep_id}/discard")
async def discard(console: Con, request: Request, user: PostingOperator, dep_id: str) -> Response:
    return await _act(console, request, dep_id, "discard", user.name)
