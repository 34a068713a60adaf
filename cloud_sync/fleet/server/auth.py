"""API tokens and roles: viewer < operator < admin.

A token is ``eft_`` + 32 random bytes (URL-safe base64); only its SHA-256 is stored, so a leaked
database does not leak tokens, and the clear token is shown once, at creation. A presented token is
hashed and looked up by that hash (unique index), then compared in constant time. Every endpoint
declares the least role it needs with :func:`require`; an unknown, revoked or expired token is 401,
a role too low is 403, both as the JSON error.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import AuthError, ForbiddenError, NotFoundError, RequestError

TOKEN_PREFIX = "eft_"  # noqa: S105 - a prefix, not a secret


class Role(str, enum.Enum):
    viewer = "viewer"  # read everything
    operator = "operator"  # + commands and deployments
    admin = "admin"  # + uploads and tokens

    @property
    def rank(self) -> int:
        return list(Role).index(self)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role."""

    token_id: int
    name: str
    role: Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Tokens in the ``api_tokens`` table. Blocking calls (use a thread from async code)."""

    def __init__(self, db: Database, clock: Any = time.time) -> None:
        self.db = db
        self.clock = clock

    def create(self, role: Role | str, name: str, *, expires_in_s: float | None = None) -> tuple[str, dict[str, Any]]:
        """Returns (clear token, its record). The clear token is not stored anywhere.

        Raises:
            RequestError: unknown role, bad name or lifetime.
        """
        try:
            role = Role(role)
        except ValueError:
            raise RequestError(f"role: expected one of {', '.join(r.value for r in Role)}") from None
        if not 0 < len(name) <= 128:
            raise RequestError("name: 1 to 128 characters")
        if expires_in_s is not None and expires_in_s <= 0:
            raise RequestError("expires_in_s: must be positive")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        row = {"name": name, "role": role.value, "token_hash": hash_token(token), "created_at": now,
               "expires_at": now + expires_in_s if expires_in_s else None}
        with self.db.write() as conn:
            token_id = conn.execute(sa.insert(s.api_tokens).returning(s.api_tokens.c.id), [row]).scalar_one()
        return token, self._public({**row, "id": token_id, "revoked_at": None})

    def verify(self, token: str) -> Principal:
        """Raises: AuthError (unknown, revoked or expired)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
            raise AuthError("invalid token")
        digest = hash_token(token)
        t = s.api_tokens
        with self.db.read() as conn:
            row = conn.execute(sa.select(t).where(t.c.token_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise AuthError("invalid token")
        if row.revoked_at is not None:
            raise AuthError("token revoked")
        if row.expires_at is not None and row.expires_at <= self.clock():
            raise AuthError("token expired")
        return Principal(int(row.id), row.name, Role(row.role))

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            return [self._public(r._mapping) for r in conn.execute(sa.select(s.api_tokens).order_by(s.api_tokens.c.id))]

    def revoke(self, token_id: int) -> None:
        """Raises: NotFoundError."""
        t = s.api_tokens
        with self.db.write() as conn:
            done = conn.execute(sa.update(t).where(t.c.id == token_id, t.c.revoked_at.is_(None))
                                .values(revoked_at=self.clock())).rowcount
            if not done and conn.execute(sa.select(t.c.id).where(t.c.id == token_id)).first() is None:
                raise NotFoundError(f"no token {token_id}")

    @staticmethod
    def _public(row: Any) -> dict[str, Any]:
        return {k: row[k] for k in ("id", "name", "role", "created_at", "expires_at", "revoked_at")}


_bearer = HTTPBearer(auto_error=False, description="An API token: `edge-fleet server token create --role R`")


def require(role: Role) -> Any:
    """A FastAPI dependency: the caller's :class:`Principal`, if its role is at least ``role``.

    Use it as ``principal: Annotated[Principal, Depends(require(Role.operator))]`` or in a router's
    ``dependencies=[Depends(require(Role.viewer))]``.
    """

    def dependency(request: Request,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthError("missing token: send 'Authorization: Bearer <token>'")
        tokens: TokenStore = request.app.state.ctx.tokens
        principal = tokens.verify(credentials.credentials)
        if principal.role.rank < role.rank:
            raise ForbiddenError(f"this needs the {role.value} role; the token has {principal.role.value}")
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{role.value}"
    return dependency


Viewer = Annotated[Principal, Depends(require(Role.viewer))]
Operator = Annotated[Principal, Depends(require(Role.operator))]
Admin = Annotated[Principal, Depends(require(Role.admin))]
