"""The small interfaces (ports) the agent's components are built with.

Each component names the ports it uses in its constructor and never sees the daemon; the
daemon is the only place that knows every implementation, and it only wires them:

- ``EventSink``: events, results and inventory changes going upstream (the cloud link, or
  nothing until it attaches). Thread-safe: streams and worker threads call it directly.
- ``ModelCatalog``: the models being served, read-only; any thread may read it, every read
  sees one consistent snapshot.
- ``ModelSwapper``: the catalogue plus the changes the deployer and the watchdog make
  (prepare, register, set active, unload, replace, warm up). Changes happen on the event
  loop only; loading and unloading run in threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.hardware import DelegateSpec
    from agent.models.served import LoadFailure, ServedModel
    from agent.models.store import ModelVersion


class EventSink(Protocol):
    """Where device-originated messages go. Never raises; safe from any thread."""

    def event(self, payload: Mapping[str, Any]) -> None:
        """A deployment step, an error, a fallback, a watchdog action."""

    def result(self, stream: str, payload: Mapping[str, Any]) -> int | None:
        """An inference result; returns its outbox seq, -1 if the outbox dropped it, None if no link."""

    def inventory_changed(self) -> None:
        """The set of served models (or their delegates) changed: the birth message must follow."""


class ModelCatalog(Protocol):
    """Read-only view of the served models (one immutable snapshot per call)."""

    @property
    def ready(self) -> bool:
        """At least one model is serving."""

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The version asked for, else the default one.

        Raises:
            ModelNotFoundError: unknown name or version.
            ModelNotReadyError: it exists but failed to load.
        """

    def find(self, name: str, version: int) -> ServedModel | None:
        """That exact version if it is loaded, else None (never raises)."""

    def versions(self, name: str) -> Sequence[int]:
        """Loaded versions of ``name``, ascending (empty if none)."""

    def default_version(self, name: str) -> int:
        """The version a request without one gets. Raises KeyError if none is loaded."""

    def served(self) -> Sequence[ServedModel]:
        """Every loaded version."""

    def failures(self) -> Sequence[LoadFailure]:
        """Versions that failed to load, with the reason."""

    def known(self, name: str) -> bool:
        """Loaded or failed: a name the API should answer for rather than 404."""

    def version_states(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name``, loaded or failed, newest first (for TF Serving's status)."""


class ModelSwapper(ModelCatalog, Protocol):
    """The changes the deployer and the watchdog make. Call on the event loop."""

    def delegates_for(self, runtime: str) -> Sequence[DelegateSpec]:
        """The device profile's delegate order for ``runtime``."""

    async def prepare(self, entry: ModelVersion, warm_up: bool = True,
                      delegates: Sequence[DelegateSpec] | None = None, threads: int | None = None) -> ServedModel:
        """Load one version in a thread and start its worker, without serving it.

        Raises:
            AgentError: the runtime is missing or the model failed on every delegate.
        """

    def warm_up(self, served: ServedModel) -> None:
        """One call on zeros (blocking: call from a thread)."""

    def register(self, served: ServedModel) -> None:
        """Serve a prepared version (the default version does not change)."""

    def set_active(self, name: str, version: int | None) -> None:
        """Switch the default version: each request sees the old one or the new one, never none."""

    def replace(self, old: ServedModel, new: ServedModel, *, stuck: bool) -> bool:
        """Serve ``new`` in ``old``'s place (same name and version); ``old`` is stopped or abandoned.

        False if ``old`` is no longer served (nothing changed; the caller closes ``new``).
        """

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the models directory: load what is new, unload what is gone ({"added", "removed", "failed"})."""

    async def unload(self, name: str, version: int) -> None:
        """Stop serving one version; requests already queued on it still finish."""
