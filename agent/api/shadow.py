"""The deploy route's shadow arguments, checked with the MQTT command's own models (one spelling)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from agent.errors import RequestError
from cloud_sync.mqtt.contract import DEPLOY_MODES, ShadowArgs


def shadow_args(body: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """``mode`` and ``shadow`` of a deploy request body.

    Raises:
        RequestError: an unknown mode, or a shadow object that does not validate (names the field).
    """
    mode = body.get("mode", "swap")
    if mode not in DEPLOY_MODES:
        raise RequestError(f"'mode' must be one of {', '.join(DEPLOY_MODES)}, got {str(mode)[:40]!r}")
    raw = body.get("shadow")
    if raw is None:
        return mode, None
    if mode != "shadow":
        raise RequestError("'shadow' applies to mode 'shadow' only")
    try:
        return mode, ShadowArgs.model_validate(raw).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError(f"shadow.{where}: {first['msg']}" if where else f"shadow: {first['msg']}") from None
