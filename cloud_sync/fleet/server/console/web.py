"""What every console route uses: the :class:`Console` (templates, sessions, catalogue, live feed), the
login and role dependencies with their CSRF checks, and page rendering with the security headers.

Routes get the console with ``console: Con`` and the person with ``user: User`` (any role),
``Operator``/``Admin`` (GET pages), or the ``Posting*`` variants for state-changing requests, which also
check the CSRF token (form field ``csrf`` or header ``X-CSRF-Token``) and that the request comes from
this origin. A missing or dead session is :class:`LoginRequired` (a page redirects to the login form, a
``/ui/`` call gets 401); a role too low is ``ForbiddenError`` (403), as in the API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import jinja2
import orjson
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, Response

from cloud_sync.fleet.server.auth import Role
from cloud_sync.fleet.server.console.installs import InstallTracker
from cloud_sync.fleet.server.console.sessions import COOKIE, ConsoleUser, SessionStore, same_secret
from cloud_sync.fleet.server.context import ServerContext
from cloud_sync.fleet.server.errors import ForbiddenError

if TYPE_CHECKING:
    from cloud_sync.fleet.server.console.catalogue import Catalogue
    from cloud_sync.fleet.server.console.live import LiveFeed

HERE = Path(__file__).resolve().parent
DASH = "\u2013"  # what a table shows for a missing figure
#: No inline script or style, nothing from elsewhere: plots and scripts are served from /static.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'self'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


class LoginRequired(Exception):  # noqa: N818 - a redirect, not a failure
    """No live session: pages redirect to ``/login?next=...``, ``/ui/`` calls answer 401."""


def _asset_version() -> str:
    try:
        return version("edge-agent")
    except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
        return "0"


# -- template filters ----------------------------------------------------------------------------------------
def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    delta = (time.time() if now is None else now) - ts
    if delta < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{int(delta // size)} {unit} ago"
    return f"{int(delta)} s ago"


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def num(value: Any, digits: int = 1) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return DASH
    return f"{float(value):.{digits}f}"


def size(value: int | None) -> str:
    if value is None:
        return DASH
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} GB"  # pragma: no cover


_HIDDEN = frozenset(("snapshot", "ts", "stream", "seq", "model"))


def brief(payload: Any, limit: int = 300) -> str:
    """A result's fields as ``key=json`` (without the ones the page shows elsewhere), cut at ``limit``."""
    if not isinstance(payload, dict):
        return ""
    text = "  ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in sorted(payload.items()) if k not in _HIDDEN)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(ago=ago, when=when, num=num, size=size, brief=brief)
    env.globals.update(asset_version=_asset_version(), Role=Role)
    return env


class Console:
    """The console's parts, on ``app.state.console``; built once by :func:`~.mount`."""

    def __init__(self, ctx: ServerContext, catalogue: Catalogue, live: LiveFeed, *, secure_cookies: bool) -> None:
        self.ctx = ctx
        self.sessions = SessionStore(ctx.db, ctx.tokens)
        self.catalogue = catalogue
        self.live = live
        self.installs = InstallTracker()
        self.env = templates()
        self.secure_cookies = secure_cookies

    def render(self, request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        """A page (or fragment) with the security headers and ``Server-Timing`` since the login check."""
        user: ConsoleUser | None = getattr(request.state, "console_user", None)
        html = self.env.get_template(name).render(request=request, user=user, now=time.time(),
                                                  uploads=self.catalogue.enabled, path=request.url.path, **values)
        return HTMLResponse(html, status_code=status, headers=timed(request))


def timed(request: Request, headers: dict[str, str] | None = None) -> dict[str, str]:
    """The security headers, with ``Server-Timing`` since the login check when there was one."""
    out = {**SECURITY_HEADERS, **(headers or {})}
    started = getattr(request.state, "console_t0", None)
    if started is not None:
        out["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return out


def json_response(request: Request, body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=timed(request))


def get_console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


Con = Annotated[Console, Depends(get_console)]


def current_user(request: Request) -> ConsoleUser:
    """The logged-in person (a plain ``def``: FastAPI runs the database lookup in its thread pool)."""
    request.state.console_t0 = time.perf_counter()
    user = get_console(request).sessions.lookup(request.cookies.get(COOKIE))
    if user is None:
        raise LoginRequired
    request.state.console_user = user
    return user


def same_origin(request: Request) -> bool:
    """A browser's ``Origin`` (or ``Referer``) names this host; requests that send neither pass (CSRF
    tokens still apply). Behind a proxy that rewrites ``Host``, the CSRF token is the check."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True
    if origin == "null":  # an opaque origin (sandboxed frame, data: URL): never ours
        return False
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _role_check(user: ConsoleUser, role: Role) -> None:
    if not user.can(role):
        raise ForbiddenError(f"this needs the {role.value} role; you are logged in as {user.role.value}")


def require(role: Role) -> Callable[..., ConsoleUser]:
    def dependency(user: Annotated[ConsoleUser, Depends(current_user)]) -> ConsoleUser:
        _role_check(user, role)
        return user

    return dependency


def posting(role: Role, *, header_only: bool = False) -> Callable[..., Any]:
    """For state-changing requests: a session with ``role``, same origin, and its CSRF token sent back.
    ``header_only`` leaves the body unread (the model upload streams it)."""

    async def dependency(request: Request, user: Annotated[ConsoleUser, Depends(current_user)]) -> ConsoleUser:
        if not same_origin(request):
            raise ForbiddenError("cross-origin request refused")
        given = request.headers.get("x-csrf-token")
        if given is None and header_only:  # a form posted without the page's script: the token is in its action
            given = request.query_params.get("csrf")
        elif given is None:
            given = str((await request.form()).get("csrf") or "")
        if not same_secret(given, user.csrf):
            raise ForbiddenError("the form's CSRF token is missing or stale: reload the page and try again")
        _role_check(user, role)
        return user

    return dependency


User = Annotated[ConsoleUser, Depends(require(Role.viewer))]
Operator = Annotated[ConsoleUser, Depends(require(Role.operator))]
PostingViewer = Annotated[ConsoleUser, Depends(posting(Role.viewer))]
PostingOperator = Annotated[ConsoleUser, Depends(posting(Role.operator))]
