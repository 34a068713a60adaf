"""Errors of the MQTT link. ``CommandError`` travels back to the fleet as ``{"code", "message"}``."""

from __future__ import annotations

from typing import Any


class LinkError(Exception):
    """Root of MQTT link errors."""


class CommandError(LinkError):
    """A command that cannot be (or was not) carried out; ``code`` is stable for scripts."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}
