"""Structured logging: structlog everywhere, JSON when stderr is not a terminal.

The last lines are also kept in memory (``recent``) so the fleet can fetch them with the
``logs`` command without shell access to the device.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import orjson
import structlog

RECENT: collections.deque[str] = collections.deque(maxlen=1000)


def _remember(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    RECENT.append(orjson.dumps(event_dict, default=str).decode())
    return event_dict


def recent(lines: int) -> list[str]:
    return list(RECENT)[-lines:]


def configure_logging(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    """Route structlog and stdlib logging to stderr with one renderer; silence library banners."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _remember,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # TensorFlow Lite's C++ banner ("Created TensorFlow Lite XNNPACK delegate") honours this.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
