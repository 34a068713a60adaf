"""A delegate that misbehaves on purpose, so the watchdog's recovery can be tested on
machines without the accelerators whose failures it is meant for.

Only usable when ``EDGE_AGENT_FAULT_INJECTION=1`` is set; otherwise it is reported as
unavailable like any missing delegate. The model really runs on the CPU underneath; the
options decide when it starts to fail or hang:
``fail_after`` (calls before every call raises), ``hang_after`` (calls before one call
blocks for ``hang_s`` seconds).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from agent.runtimes.base import LoadReport, Session

NAMES = frozenset({"fault-injection", "FaultInjectionExecutionProvider"})
ENV = "EDGE_AGENT_FAULT_INJECTION"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


class FaultySession(Session):
    def __init__(self, inner: Session, name: str, options: dict[str, Any]) -> None:
        super().__init__(inner.path, inner.inputs, inner.outputs, LoadReport(delegate=name))
        self.backend = inner.backend  # type: ignore[misc]
        self._inner = inner
        self._calls = 0
        self._fail_after = int(options.get("fail_after", -1))
        self._hang_after = int(options.get("hang_after", -1))
        self._hang_s = float(options.get("hang_s", 3600))
        self._released = threading.Event()

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._calls += 1
        if 0 <= self._hang_after < self._calls:
            self._hang_after = -1  # hang once
            self._released.wait(self._hang_s)
        if 0 <= self._fail_after < self._calls:
            raise RuntimeError(f"injected delegate failure after {self._fail_after} calls")
        return self._inner._run(feeds)

    def close(self) -> None:
        self._released.set()  # let a hung call return so its thread can end
        self._inner.close()
