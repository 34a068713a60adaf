"""A model version's known-good input: what tells a model fault from a client's bad input.

When a runtime call fails, the model may be at fault (a delegate that broke) or the input
(a shape its metadata allows but its graph does not, such as ``[1, 3, 0, 0]`` for
``[-1, 3, -1, -1]``). Running an input the model is known to answer settles it: if that
fails too, the model is sick; if not, the request was. The worker asks after each failure,
the watchdog once more before it reloads or falls back.

Known-good, best first: the bundle's first test vector (checked against its expected outputs
at install), the warm-up input (it ran at load), else the first input the version answered
when it is small (a model with dynamic dimensions and no configured warm-up shapes).
This module only keeps the input; running it is the worker's job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import orjson
import structlog

log = structlog.get_logger(__name__)

MANIFEST = "manifest.json"
MAX_LEARNT_BYTES = 1 << 20  # an input kept from traffic is copied: only a small one


class KnownGood:
    """The known-good input of one model version (thread-safe).

    ``locate`` gives the version's directory when it is needed: a deployment loads a version
    from its staging directory and moves it before it serves, so the test vector is read from
    wherever the version is on first use, not at load.
    """

    def __init__(self, locate: Callable[[], Path] | None = None) -> None:
        self._locate = locate if locate is not None and _has_test_vector(locate()) else None
        self._feeds: dict[str, np.ndarray] | None = None
        self._source = "test_vector" if self._locate is not None else "none"
        self._lock = threading.Lock()
        # True once nothing better can come from traffic: the worker stops offering requests then.
        self.settled = self._locate is not None

    @property
    def source(self) -> str:
        """Where the input comes from: ``test_vector``, ``warmup``, ``traffic`` or ``none``."""
        return self._source

    def feeds(self) -> Mapping[str, np.ndarray] | None:
        """The input, or None when this version has none (yet). Reads the test vector once (blocking)."""
        if self._locate is not None and self._feeds is None:
            with self._lock:
                if self._locate is not None and self._feeds is None:
                    self._feeds = _test_vector(self._locate())
                    if self._feeds is None:  # unreadable: whatever the warm-up or traffic gives next
                        self._locate, self._source, self.settled = None, "none", False
        return self._feeds

    def warmed_up(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The warm-up ran on ``feeds``: known-good unless a test vector is."""
        with self._lock:
            if self._locate is None:
                self._feeds, self._source, self.settled = dict(feeds), "warmup", True

    def answered(self, feeds: Mapping[str, np.ndarray]) -> None:
        """A request ran: kept (copied) if nothing else is known and it is small."""
        if self.settled or sum(v.nbytes for v in feeds.values()) > MAX_LEARNT_BYTES:
            return
        copy = {name: np.array(value, copy=True) for name, value in feeds.items()}
        with self._lock:
            if not self.settled:
                self._feeds, self._source, self.settled = copy, "traffic", True

    def inherit(self, other: KnownGood) -> None:
        """A reload of the same version (the watchdog's): keep what the old one knew if this one knows nothing."""
        if self.settled or not other.settled:
            return
        with self._lock, other._lock:
            if not self.settled:
                self._locate, self._feeds, self._source = other._locate, other._feeds, other._source
                self.settled = True


def _has_test_vector(directory: Path) -> bool:
    try:
        manifest = orjson.loads((directory / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and bool(manifest.get("test_vectors"))


def _test_vector(directory: Path) -> dict[str, np.ndarray] | None:
    """The inputs of the first test vector in ``directory``'s manifest, or None."""
    from cloud_sync.bundles import tensor_array  # only for bundles that have test vectors

    try:
        manifest = orjson.loads((directory / MANIFEST).read_bytes())
        inputs = manifest["test_vectors"][0]["inputs"]
        return {name: tensor_array(value, directory) for name, value in inputs.items()}
    except Exception as exc:  # noqa: BLE001 - a bad vector only means no probe from it
        log.warning("model.known_good_unreadable", directory=str(directory), reason=f"{type(exc).__name__}: {exc}")
        return None
