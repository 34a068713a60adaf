"""Plugins: modules named in ``[agent] plugins``, imported once at start, before anything loads.

A plugin extends the agent through the registries its components expose (delegates layered
on a runtime: ``agent.runtimes.base.LAYERED_DELEGATES``; deployment step hooks:
``agent.deploy.installer.STEP_HOOKS``; sources and processors: the registries in
``agent.pipelines.base``). A plugin that fails to import is logged and skipped, never fatal:
the agent must still serve what it can on this board.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import structlog

log = structlog.get_logger(__name__)


def load_plugins(names: Sequence[str]) -> list[str]:
    """Import each plugin module; returns the names that loaded."""
    loaded = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the agent
            log.error("plugin.failed", plugin=name, reason=f"{type(exc).__name__}: {exc}")
            continue
        log.info("plugin.loaded", plugin=name)
        loaded.append(name)
    return loaded
