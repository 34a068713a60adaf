"""Login with an API token, and logout.

The login form is protected from login CSRF by a double-submit cookie (``edge_fleet_login_csrf``,
HttpOnly, SameSite=Strict, only for ``/login``) matched against its hidden field. A good token opens a
session (see :mod:`.sessions`) and sets the session cookie: HttpOnly, SameSite=Lax, ``Secure`` when
the service speaks HTTPS, ``Path=/``. ``next`` only ever leads back into the console.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from cloud_sync.fleet.server.console.sessions import COOKIE, LOGIN_COOKIE, same_secret
from cloud_sync.fleet.server.console.web import SECURITY_HEADERS, Con, PostingViewer, same_origin
from cloud_sync.fleet.server.errors import AuthError

router = APIRouter(include_in_schema=False)


def safe_next(target: str | None) -> str:
    """A path inside the console, never another site (``//evil``, ``https://...``) nor the API."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\", "/api", "/login")):
        return "/"
    return target


def _login_page(console: Con, request: Request, *, error: str | None = None, status: int = 200,
                next_path: str = "/") -> Response:
    nonce = secrets.token_urlsafe(24)
    response = console.render(request, "login.html", status=status, error=error, login_csrf=nonce, next=next_path)
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path="/login", httponly=True, samesite="strict",
                        secure=console.secure_cookies)
    return response


@router.get("/login")
def login_form(console: Con, request: Request, next: str | None = None) -> Response:
    return _login_page(console, request, next_path=safe_next(next))


@router.post("/login")
async def login(console: Con, request: Request) -> Response:
    form = await request.form()
    next_path = safe_next(str(form.get("next") or "/"))
    if not same_origin(request) or not same_secret(str(form.get("csrf") or ""), request.cookies.get(LOGIN_COOKIE, "")):
        return _login_page(console, request, status=403, next_path=next_path,
                           error="The login form expired or came from elsewhere: try again.")
    try:
        secret, user = await asyncio.to_thread(console.sessions.login, str(form.get("token") or ""))
    except AuthError as exc:
        return _login_page(console, request, status=401, error=f"Not logged in: {exc.message}.", next_path=next_path)
    response = RedirectResponse(next_path, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, secret, max_age=max(1, int(user.expires_at - console.sessions.clock())), path="/",
                        httponly=True, samesite="lax", secure=console.secure_cookies)
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
async def logout(console: Con, request: Request, _user: PostingViewer) -> Response:
    await asyncio.to_thread(console.sessions.logout, request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax", secure=console.secure_cookies)
    return response
