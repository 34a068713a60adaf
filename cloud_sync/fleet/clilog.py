"""Logging for ``edge-fleet`` commands whose stdout carries their result (``upload --json``,
``simulate`` status lines): structlog to stderr at a level, restored when the command returns."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog


class _Stderr:
    """Whatever ``sys.stderr`` is at write time (tests swap it), not the one at configure time."""

    def write(self, text: str) -> Any:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def stderr_logging(level: str) -> Iterator[None]:
    """Log at ``level`` (debug, info, warning, error) to stderr for the duration of a command."""
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
                        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()))  # type: ignore[arg-type]
    try:
        yield
    finally:
        structlog.configure(**previous)
