"""Runtime calls in progress across the agent's workers, for work that must yield to them.

A shadow's child process is paused (SIGSTOP) while any serving call runs and resumed (SIGCONT)
when none does: running beside a serving call on the other core, sharing its caches and memory
bandwidth, it slowed the calls it overlapped by about half, and at a 10 % sample that was 2-3 %
of requests, so serving p99 rose by half (``bench/shadow.py``). Paused, it only ever uses time
the serving calls leave; under full load it falls behind and its queue drops samples (counted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

#: ``pause(True)`` when the first serving call starts, ``pause(False)`` when the last one ends.
Pause = Callable[[bool], None]


class Activity:
    """Counts runtime calls in progress; tells the registered pausers on the first start and last end.

    ``begin``/``end`` are called by every worker thread (and inline callers) around each runtime
    call: without pausers they cost one attribute read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._pausers: dict[int, Pause] = {}

    def register(self, key: int, pause: Pause) -> None:
        with self._lock:
            self._pausers = {**self._pausers, key: pause}
            if self._running:
                pause(True)

    def unregister(self, key: int) -> None:
        with self._lock:
            pause = self._pausers.get(key)
            self._pausers = {k: p for k, p in self._pausers.items() if k != key}
        if pause is not None:
            pause(False)

    def begin(self) -> bool:
        """A runtime call starts; returns whether it was counted (pass it to ``end``)."""
        if not self._pausers:
            return False
        with self._lock:
            self._running += 1
            if self._running == 1:
                for pause in self._pausers.values():
                    pause(True)
        return True

    def end(self, counted: bool) -> None:
        if not counted:
            return
        with self._lock:
            self._running -= 1
            if self._running == 0:
                for pause in self._pausers.values():
                    pause(False)


#: The agent's one count of serving calls (a process holds one set of workers).
SERVING = Activity()
