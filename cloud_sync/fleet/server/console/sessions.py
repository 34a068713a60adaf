"""Console logins: a session made from an API token, kept in the database, named by an HttpOnly cookie.

The service has no users of its own: a person logs in with an API token (``edge-fleet server token
create --role R``), and the session gets that token's name and role. The cookie carries a random
secret; only its SHA-256 is stored (as for tokens), so a leaked database opens no session. A session
ends at logout, at its expiry (``SESSION_S``, never after the token's own expiry), or when the token
is revoked (the lookup joins the token row every time, and deleting a token deletes its sessions).
Every instance of the service reads the same table, so a load balancer needs no stickiness.

CSRF: each session has its own random CSRF token; every state-changing request must send it back
(the form field ``csrf`` or the header ``X-CSRF-Token``), compared in constant time. The login form,
before any session exists, uses a double-submit cookie. Pure checks live here; the FastAPI
dependencies that apply them are in :mod:`.auth`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.auth import Principal, Role, TokenStore
from cloud_sync.fleet.server.db import Database

COOKIE = "edge_fleet_session"
LOGIN_COOKIE = "edge_fleet_login_csrf"
SESSION_S = 12 * 3600.0
_SECRET_CHARS = 43  # token_urlsafe(32)


@dataclass(frozen=True)
class ConsoleUser:
    """Who is logged in: the token's principal, the session's CSRF token and its expiry."""

    principal: Principal
    csrf: str
    expires_at: float

    @property
    def role(self) -> Role:
        return self.principal.role

    @property
    def name(self) -> str:
        return self.principal.name

    def can(self, role: Role) -> bool:
        return self.principal.role.rank >= role.rank


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a CSRF value; a missing one never matches."""
    return bool(given) and hmac.compare_digest(str(given).encode(), expected.encode())


class SessionStore:
    """Console sessions in ``console_sessions``. Blocking calls (the routes run them in a thread)."""

    def __init__(self, db: Database, tokens: TokenStore, *, lifetime_s: float = SESSION_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.tokens = tokens
        self.lifetime_s = lifetime_s
        self.clock = clock

    def login(self, token: str) -> tuple[str, ConsoleUser]:
        """Check ``token`` and open a session; returns (cookie secret, user).

        Raises:
            AuthError: unknown, revoked or expired token.
        """
        principal = self.tokens.verify(token.strip())
        now = self.clock()
        t = s.api_tokens
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self.db.write() as conn:
            token_expiry = conn.execute(sa.select(t.c.expires_at).where(t.c.id == principal.token_id)).scalar()
            expires = min(now + self.lifetime_s, token_expiry or float("inf"))
            conn.execute(sa.delete(s.console_sessions).where(s.console_sessions.c.expires_at <= now))
            conn.execute(sa.insert(s.console_sessions), [{"id": _digest(secret), "token_id": principal.token_id,
                                                          "csrf": csrf, "created_at": now, "expires_at": expires}])
        return secret, ConsoleUser(principal, csrf, expires)

    def lookup(self, secret: str | None) -> ConsoleUser | None:
        """The session's user, or None (no cookie, unknown, expired, or its token revoked or expired)."""
        if not secret or len(secret) != _SECRET_CHARS:
            return None
        cs, t = s.console_sessions, s.api_tokens
        with self.db.read() as conn:
            row = conn.execute(
                sa.select(cs.c.csrf, cs.c.expires_at, t.c.id, t.c.name, t.c.role, t.c.revoked_at, t.c.expires_at
                          .label("token_expires")).join(t, t.c.id == cs.c.token_id)
                .where(cs.c.id == _digest(secret))).first()
        now = self.clock()
        if row is None or row.expires_at <= now or row.revoked_at is not None or (
                row.token_expires is not None and row.token_expires <= now):
            return None
        try:
            role = Role(row.role)
        except ValueError:
            return None
        return ConsoleUser(Principal(int(row.id), row.name, role), row.csrf, row.expires_at)

    def logout(self, secret: str | None) -> None:
        if secret:
            with self.db.write() as conn:
                conn.execute(sa.delete(s.console_sessions).where(s.console_sessions.c.id == _digest(secret)))
