"""Which results leave the device, and the local live feed of them.

``ResultPolicy`` is pure: every result, only on change, only over a threshold, and at most
N per second. ``Broadcaster`` fans results out to local subscribers (Server-Sent Events);
a slow subscriber loses its oldest results, never blocks the pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _score(result: Mapping[str, Any]) -> float | None:
    """The strongest confidence in a result, whatever its kind."""
    scores: list[float] = []
    for key in ("labels", "detections"):
        scores += [float(x.get("score", 0)) for x in result.get(key) or [] if isinstance(x, Mapping)]
    for key in ("score", "probability"):
        if isinstance(result.get(key), int | float):
            scores.append(float(result[key]))
    return max(scores) if scores else None


def _signature(result: Mapping[str, Any]) -> Any:
    """What 'changed' means: the set of labels seen, or the event, ignoring scores and times."""
    if "event" in result:
        return ("event", result["event"], result.get("label"))
    labels = sorted(str(x.get("label", x.get("index"))) for key in ("labels", "detections")
                    for x in result.get(key) or [] if isinstance(x, Mapping))
    return ("labels", tuple(labels))


@dataclass
class ResultPolicy:
    mode: str = "every"  # every | on_change | over_threshold
    threshold: float | None = None
    max_per_s: float | None = None
    _last_signature: Any = None
    _last_sent: float = field(default=-1e18)

    def allow(self, result: Mapping[str, Any], now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.mode == "on_change":
            signature = _signature(result)
            if signature == self._last_signature:
                return False
            self._last_signature = signature
        elif self.mode == "over_threshold":
            score = _score(result)
            if score is None or self.threshold is None or score < self.threshold:
                return False
        if self.max_per_s and now - self._last_sent < 1.0 / self.max_per_s and "event" not in result:
            return False  # events (speech start/end, wake word) are never rate-limited away
        self._last_sent = now
        return True


class Broadcaster:
    """Per-subscriber bounded queues on the event loop."""

    def __init__(self, maxsize: int = 100) -> None:
        self.maxsize = maxsize
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.maxsize)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(queue)

    def publish(self, result: dict[str, Any]) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()  # drop the oldest for this slow reader only
            queue.put_nowait(result)
