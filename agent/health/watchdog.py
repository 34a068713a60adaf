"""In-process watchdog: heals a model whose inference hangs or whose delegate starts failing.

Recovery climbs a ladder per model version: reload on the same delegate, then fall back past
the failing delegate to the next one in the device profile, then the CPU. At most
``max_recoveries`` within ``window_s``; past that it gives up (an event says so) and, if a
call is still stuck, systemd's watchdog takes over because the agent stops pinging it.

Failures in a row are a fault only once the model's known-good input fails too
(``agent.models.probe``): the worker already asks after each failed call, and the watchdog asks
once more before it reloads or falls back, so clients sending inputs the runtime refuses can
never move a model off its accelerator. A model with no known-good input is judged by its
failures alone, as before. A stuck call needs no confirmation.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from agent.core.metrics import Metrics
from agent.core.ports import EventSink, ModelSwapper
from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.models.served import ServedModel

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WatchdogPolicy:
    stuck_after_s: float = 10.0
    failures_before_recovery: int = 3
    max_recoveries: int = 3
    window_s: float = 600.0
    check_every_s: float = 0.5


class Watchdog:
    """Checks every served model on a timer and climbs the recovery ladder for the sick ones."""

    def __init__(self, policy: WatchdogPolicy, models: ModelSwapper, sink: EventSink, metrics: Metrics) -> None:
        self.policy = policy
        self.models = models
        self.sink = sink
        self.metrics = metrics
        self._history: dict[tuple[str, int], collections.deque[float]] = collections.defaultdict(collections.deque)
        self._excluded: dict[tuple[str, int], set[str]] = collections.defaultdict(set)
        self.gave_up: set[tuple[str, int]] = set()
        self.recoveries = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.check_every_s)
            try:
                await self.check()
            except Exception:
                log.exception("watchdog.check_failed")

    def diagnose(self, served: ServedModel, now: float) -> tuple[str, bool] | None:
        """Why ``served`` needs recovery (reason, stuck), or None when it is healthy."""
        busy = served.worker.busy_since
        if busy is not None and now - busy > self.policy.stuck_after_s:
            return f"inference call stuck for {now - busy:.1f} s", True
        failures = served.stats.consecutive_failures
        if failures >= self.policy.failures_before_recovery:
            return f"{failures} inference failures in a row on {served.session.delegate}", False
        return None

    async def check(self) -> None:
        now = time.monotonic()
        for served in self.models.served():
            if served.state != "AVAILABLE":
                continue  # unloaded while idle: nothing runs (agent.models.residency)
            found = self.diagnose(served, now)
            if found is None:
                continue
            reason, stuck = found
            if not stuck and await self.still_answers(served):
                continue
            await self.recover(served, reason, stuck)

    async def still_answers(self, served: ServedModel) -> bool:
        """Whether ``served`` answers its known-good input despite its failures (then they were not a
        fault, or one that passed: its failures in a row start over). False when it fails, takes longer
        than ``stuck_after_s``, or has no known-good input."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool | None] = loop.create_future()

        def probe() -> None:  # its own thread: a hung call must not hold one of the loop's executor threads
            try:
                result: bool | None = served.answers_known_good()
            except Exception:  # a probe that cannot run confirms nothing
                log.exception("watchdog.probe_failed", model=served.name, version=served.version)
                result = None
            loop.call_soon_threadsafe(lambda: None if done.done() else done.set_result(result))

        threading.Thread(target=probe, name=f"probe-{served.key}", daemon=True).start()
        try:
            answers = await asyncio.wait_for(asyncio.shield(done), self.policy.stuck_after_s)
        except asyncio.TimeoutError:
            answers = False
        if answers:
            served.stats.restarted()  # failures in a row start over, as after a restart
            log.warning("watchdog.fault_not_confirmed", model=served.name, version=served.version,
                        delegate=served.session.delegate, reason="the model answers its known-good input")
        return bool(answers)

    async def recover(self, served: ServedModel, reason: str, stuck: bool) -> None:
        key = (served.name, served.version)
        history = self._history[key]
        now = time.monotonic()
        while history and now - history[0] > self.policy.window_s:
            history.popleft()
        if len(history) < self.policy.max_recoveries:
            self.gave_up.discard(key)  # the window moved on: recoveries resume, and so would a new give-up
        if len(history) >= self.policy.max_recoveries:
            if key not in self.gave_up:
                self.gave_up.add(key)
                log.error("watchdog.gave_up", model=served.name, version=served.version, reason=reason,
                          recoveries=len(history))
                self.sink.event({"type": "watchdog.gave_up", "model": served.name, "version": served.version,
                           "reason": reason, "recoveries": len(history)})
            return
        history.append(now)
        runtime = served.runtime
        profile = list(self.models.delegates_for(runtime))
        current = served.session.delegate
        if len(history) > 1:  # a reload did not help: never use this delegate again for this version
            self._excluded[key].add(current)
        delegates = [d for d in profile if d.name not in self._excluded[key]]
        action = "reload" if len(history) == 1 else "fallback"
        try:
            new = await self.models.prepare(served.source, True, delegates)
        except AgentError as exc:
            log.error("watchdog.recovery_failed", model=served.name, version=served.version, reason=str(exc))
            self.sink.event({"type": "watchdog.recovery_failed", "model": served.name, "version": served.version,
                       "reason": str(exc)})
            return
        new.worker.known_good.inherit(served.worker.known_good)
        if not self.models.replace(served, new, stuck=stuck):
            log.info("watchdog.recovery_moot", model=served.name, version=served.version,
                     reason="the version was unloaded meanwhile")
            await asyncio.to_thread(new.close)
            return
        self.recoveries += 1
        self.metrics.watchdog_recoveries.inc(served.name, action)
        if new.session.delegate != current:
            self.metrics.delegate_fallbacks.inc(served.name, runtime)
        event = {"type": "watchdog.recovered", "model": served.name, "version": served.version, "action": action,
                 "from_delegate": current, "to_delegate": new.session.delegate, "reason": reason}
        log.warning("watchdog.recovered", **{k: v for k, v in event.items() if k != "type"})
        self.sink.event(event)
        self.sink.inventory_changed()
