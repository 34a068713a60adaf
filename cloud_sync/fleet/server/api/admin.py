"""Service endpoints: health (no token), ingestion counters, and API tokens (admin)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.fleet.server.api.schemas import ERRORS, NewToken, Page, TokenOut
from cloud_sync.fleet.server.auth import Admin, Role, Viewer
from cloud_sync.fleet.server.context import Ctx

router = APIRouter(prefix="/api", tags=["service"])


@router.get("/health", summary="Liveness for load balancers: database and broker reachable (no token needed)")
def health(*, ctx: Ctx) -> JSONResponse:
    db_ok = ctx.db.ping()
    broker_ok = ctx.ingestor.connected if ctx.ingestor is not None else None
    status = "ok" if db_ok and broker_ok is not False else "degraded"
    return JSONResponse({"status": status, "database": db_ok, "broker": broker_ok},
                        status_code=200 if db_ok else 503)


@router.get("/ingest", summary="Ingestion counters of this instance (received, stored, duplicates, rejected...)",
            responses=ERRORS)
def ingest_stats(*, ctx: Ctx, _who: Viewer) -> dict[str, Any]:
    stats = ctx.ingestor.stats() if ctx.ingestor is not None else {}
    return {"uptime_s": round(time.time() - ctx.started_at, 3), **stats}


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: Role
    expires_in_s: float | None = Field(default=None, gt=0)


@router.get("/tokens", summary="API tokens (never the tokens themselves)", response_model=Page[TokenOut],
            responses=ERRORS)
def list_tokens(*, ctx: Ctx, _who: Admin) -> dict[str, Any]:
    return {"items": ctx.tokens.list(), "next": None}


@router.post("/tokens", status_code=201, summary="Create a token; the response is the only time it is shown",
             response_model=NewToken, responses=ERRORS)
def create_token(*, ctx: Ctx, _who: Admin, body: TokenRequest) -> dict[str, Any]:
    token, record = ctx.tokens.create(body.role, body.name, expires_in_s=body.expires_in_s)
    return {**record, "token": token}


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke a token", responses=ERRORS)
def revoke_token(*, ctx: Ctx, _who: Admin, token_id: int) -> Response:
    ctx.tokens.revoke(token_id)
    return Response(status_code=204)
