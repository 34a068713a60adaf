"""Test plugin: a delegate that misbehaves on purpose, so the watchdog's recovery can be tested
on machines without the accelerators whose failures it is meant for.

Loaded into a real agent with ``[agent] plugins = ["tests.plugins.fault_delegate"]`` (or
``EDGE_AGENT_AGENT__PLUGINS``); without it the names below are unavailable like any missing
delegate. The model really runs on the CPU underneath; the profile's options decide when it
starts to fail or hang: ``fail_after`` (calls before every call raises), ``hang_after`` (calls
before one call blocks for ``hang_s`` seconds).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from agent.hardware import DelegateSpec
from agent.runtimes.base import LAYERED_DELEGATES, LoadReport, Session

NAMES = frozenset({"fault-injection", "FaultInjectionExecutionProvider"})


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


def _layer(inner: Session, spec: DelegateSpec) -> Session:
    return FaultySession(inner, spec.name, dict(spec.options))


for _name in NAMES:
    LAYERED_DELEGATES[_name] = _layer
