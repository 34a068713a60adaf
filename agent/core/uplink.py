"""The event sink the components are built with, before and after the cloud link exists.

The daemon builds the components first and attaches the link once it has started (or never,
without ``[mqtt] url``); until then events and results go nowhere, and results get no seq.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Link(Protocol):
    """What the cloud link offers the agent: an event sink that can also report its state."""

    def event(self, payload: Mapping[str, Any]) -> None: ...

    def result(self, stream: str, payload: Mapping[str, Any]) -> int | None: ...

    def inventory_changed(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """``{"link": {...}, "outbox": {...}}``: connection and outbox statistics."""


class Uplink:
    """``EventSink`` that forwards to the attached link, else drops. Safe from any thread."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self.failure: str | None = None  # why a configured link could not start

    def attach(self, link: Link | None) -> None:
        self.link = link

    def fail(self, reason: str) -> None:
        """The link is configured but could not start: status says why (the agent runs without it)."""
        self.failure = reason

    def event(self, payload: Mapping[str, Any]) -> None:
        link = self.link
        if link is not None:
            link.event(payload)

    def result(self, stream: str, payload: Mapping[str, Any]) -> int | None:
        link = self.link
        return link.result(stream, payload) if link is not None else None

    def inventory_changed(self) -> None:
        link = self.link
        if link is not None:
            link.inventory_changed()

    def status(self) -> dict[str, Any] | None:
        """The link's statistics, or None when no link is configured."""
        link = self.link
        if link is not None:
            return link.status()
        if self.failure is not None:
            return {"link": {"connected": False, "state": "unavailable", "last_error": self.failure,
                             "last_error_code": "link_unavailable"}, "outbox": None}
        return None
