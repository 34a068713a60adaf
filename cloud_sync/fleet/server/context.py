"""What every API route may use: the service's parts, as one object on ``app.state.ctx``.

Routers get it with the ``Ctx`` dependency (``ctx: Ctx``) and never build their own engine or MQTT
client; see ``api/__init__.py`` for how a module adds a router.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from cloud_sync.fleet.server.auth import TokenStore
from cloud_sync.fleet.server.config import ServerSettings
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.rollouts import Rollouts

if TYPE_CHECKING:
    from cloud_sync.fleet.server.commands import CommandService
    from cloud_sync.fleet.server.ingest import Ingestor


@dataclass
class ServerContext:
    settings: ServerSettings
    db: Database
    tokens: TokenStore
    ingestor: Ingestor | None = None  # None in API-only tests
    commands: CommandService | None = None
    started_at: float = field(default_factory=time.time)
    closing: threading.Event = field(default_factory=threading.Event)  # set when the service starts to stop
    rollouts: Rollouts = field(init=False)

    def __post_init__(self) -> None:
        self.rollouts = Rollouts(self.db)

    def limit(self, requested: int | None) -> int:
        """The page size: the default when not given, never above ``api.max_limit``."""
        api = self.settings.api
        return max(1, min(requested or api.default_limit, api.max_limit))


def get_ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ServerContext, Depends(get_ctx)]
