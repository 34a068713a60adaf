"""The fleet web console: server-rendered pages at ``/`` of the fleet service (``edge-fleet server``).

Pages (Jinja2 templates) over the service's own parts (the database, :class:`~..rollouts.Rollouts`,
:class:`~..commands.CommandService`, the upload endpoint), a little plain JavaScript for live updates
(Server-Sent Events naming the parts that changed), plots (uPlot, vendored under ``static/vendor``
with its licence) and uploads with progress. Nothing is fetched from elsewhere at run time and there
is no build step. Logins are API tokens (:mod:`.sessions`); the roles are the API's.

Public surface: :func:`mount` (what the service calls), :func:`console_url` and :func:`login_link`.

Layout: :mod:`.web` (console state, rendering, login/role/CSRF dependencies), :mod:`.sessions`,
:mod:`.views` (page queries), :mod:`.series` (plot data), :mod:`.catalogue` (published models),
:mod:`.live` (change detection and the event stream), and one routes module per area.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from cloud_sync.fleet.publishing import PublishSettings
from cloud_sync.fleet.server.console.catalogue import Catalogue
from cloud_sync.fleet.server.console.live import LiveFeed
from cloud_sync.fleet.server.console.web import HERE, Console, LoginRequired
from cloud_sync.fleet.server.context import ServerContext
from cloud_sync.fleet.server.errors import FleetServerError

__all__ = ["console_url", "login_link", "mount"]


def console_url(base_url: str) -> str:
    """The console's address for the service's base URL (what ``run_server``'s ``ready`` gets)."""
    return base_url.rstrip("/") + "/"


def login_link(base_url: str, token: str) -> str:
    """A link that opens the login form with ``token`` filled in. The token is in the fragment, which
    browsers never send to a server (nor in ``Referer``); the person still presses "Log in"."""
    return f"{console_url(base_url)}login#token={quote(token, safe='')}"


def _is_console(request: Request) -> bool:
    return not request.url.path.startswith("/api")


def mount(app: FastAPI, ctx: ServerContext, *, publish: PublishSettings | None = None,
          closing: threading.Event | None = None, live_interval: float = 0.25) -> Console:
    """Add the console to the service's app: pages, ``/ui/...`` fragments and calls, ``/static``.

    ``publish`` enables the catalogue and uploads (``[server.publish]``); ``closing``, once set, ends
    the live streams so that the server can stop.
    """
    from cloud_sync.fleet.server.console import auth_routes, deploy_routes, fleet_routes, model_routes

    secure = bool(ctx.settings.tls.certfile)
    console = Console(ctx, Catalogue(publish), LiveFeed(ctx.db, interval=live_interval, closing=closing),
                      secure_cookies=secure)
    app.state.console = console
    for module in (auth_routes, fleet_routes, deploy_routes, model_routes):
        app.include_router(module.router)
    if publish is not None:
        app.include_router(model_routes.upload_router(publish), include_in_schema=False)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    api_error = app.exception_handlers.get(FleetServerError)

    async def login_required(request: Request, _exc: Exception) -> Response:
        if request.url.path.startswith("/ui/"):
            return JSONResponse({"error": {"code": "unauthorized", "message": "log in first"}}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)

    async def fleet_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, FleetServerError)
        if not _is_console(request) or request.url.path.startswith("/ui/"):
            if api_error is not None:
                return await api_error(request, exc)  # type: ignore[misc]
            return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)
        return console.render(request, "error.html", status=exc.status, error=exc)

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(FleetServerError, fleet_error)
    return console
