"""Idle versions unloaded, and loaded again on their next use (``[model.NAME] unload_after_s``).

``Residency`` is one supervised task, whatever ``[scaling]`` says. Every ``[models] idle_check_s``
it looks at each served version: one not used (no API request, no stream item; a shadow's mirror
comes with a request) for longer than its ``unload_after_s``, and not pinned (a deployment or
shadow of its model, a running stream on it, its health window), has its workers stopped and
sessions closed (``ServedModel.release``). It stays listed as ``UNLOADED`` with its specs and
statistics. The next request or stream item calls ``wake``: one load for every waiter, in a
thread, adopted on the event loop; the time from the first waiter to serving again is the cold
start (``model.reloaded`` event and log line, status, ``/metrics``). A load that fails leaves the
version unloaded and fails its waiters with ``ModelReloadError`` (503); the next request tries again.

What changes a version's workers (unload, load again, the scaler's instances) holds its
``changing`` lock; a deployment's or the watchdog's swap replaces the whole version, and a
version closed meanwhile discards its load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from agent.core.metrics import Metrics
from agent.core.ports import EventSink
from agent.errors import ModelReloadError
from agent.models.registry import stop_workers
from agent.models.served import AVAILABLE, ServedModel

log = structlog.get_logger(__name__)

#: Why a version must stay loaded now (a deployment, a shadow, a stream), or None.
Pinned = Callable[[ServedModel], "str | None"]


class ResidencyHost(Protocol):
    """What the residency changes (the registry)."""

    def served(self) -> Sequence[ServedModel]: ...

    def find(self, name: str, version: int) -> ServedModel | None: ...

    def load_again(self, served: ServedModel) -> ServedModel:
        """Blocking: a fresh, warmed-up session and worker of ``served``. Raises AgentError."""


class Residency:
    """Unloads versions idle past their ``unload_after_s``; ``wake`` loads one again (any thread)."""

    def __init__(self, host: ResidencyHost, sink: EventSink, metrics: Metrics, *,
                 unload_after: Callable[[str], float | None], pinned: Pinned = lambda _m: None,
                 interval_s: float = 5.0) -> None:
        self.host = host
        self.sink = sink
        self.metrics = metrics
        self.unload_after = unload_after
        self.pinned = pinned
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loads: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model.residency_failed")

    async def step(self) -> list[str]:
        """One look at every served version; returns the keys unloaded."""
        self._loop = asyncio.get_running_loop()
        unloaded = []
        for served in self.host.served():
            after = self.unload_after(served.name)
            if after is None or served.state != AVAILABLE or served.changing.locked():
                continue
            idle = time.monotonic() - served.last_used
            if idle < after or served.mirror is not None or served.nonfinite_check is not None:
                continue  # a shadow mirrors it, or a deployment's health window watches it
            if self.pinned(served) is not None:
                continue
            if await self.unload(served, idle):
                unloaded.append(served.key)
        return unloaded

    async def unload(self, served: ServedModel, idle: float) -> bool:
        """Release ``served``'s workers and sessions if it is idle; False if it was busy."""
        from agent.health.system import release_free_heap

        async with served.changing:
            served.wake = self.wake
            workers = served.release()
            if workers is None:
                return False

            def stop() -> None:
                stop_workers(workers)
                release_free_heap()  # the sessions' memory back to the system, not kept in the heap

            await asyncio.to_thread(stop)
        self.metrics.model_unloads.inc(served.name)
        log.info("model.unloaded", model=served.name, version=served.version, reason="idle", idle_s=round(idle, 1))
        self.sink.event({"type": "model.unloaded", "model": served.name, "version": served.version,
                         "reason": "idle", "idle_s": round(idle, 1)})
        return True

    def wake(self, served: ServedModel) -> concurrent.futures.Future[None]:
        """Load ``served`` again, or join the load under way (any thread); the future ends when it serves
        or fails with ModelReloadError."""
        future, first = served.reloading()
        if not first:
            return future
        loop = self._loop
        if loop is None or loop.is_closed():
            future.set_exception(ModelReloadError(f"model {served.name} version {served.version} is unloaded "
                                                  "and the agent is stopping"))
            return future
        asked = time.perf_counter()
        try:
            loop.call_soon_threadsafe(self._start, served, future, asked)
        except RuntimeError:  # the loop closed meanwhile
            future.set_exception(ModelReloadError(f"model {served.name} version {served.version} is unloaded "
                                                  "and the agent is stopping"))
        return future

    def _start(self, served: ServedModel, future: concurrent.futures.Future[None], asked: float) -> None:
        task = asyncio.get_running_loop().create_task(self._load(served, future, asked),
                                                      name=f"load-again-{served.key}")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load(self, served: ServedModel, future: concurrent.futures.Future[None], asked: float) -> None:
        try:
            async with served.changing:  # after the unload's own stop, if it is still stopping
                if served.state == AVAILABLE:
                    future.set_result(None)
                    return
                log.info("model.reloading", model=served.name, version=served.version)
                fresh = await asyncio.to_thread(self.host.load_again, served)
                if served.closed or self.host.find(served.name, served.version) is not served:
                    await asyncio.to_thread(fresh.close)
                    raise ModelReloadError(f"model {served.name} version {served.version} was unloaded")
                cold_ms = round((time.perf_counter() - asked) * 1e3, 2)
                served.adopt(fresh, cold_ms)
        except asyncio.CancelledError:
            future.set_exception(ModelReloadError(f"model {served.name} version {served.version} is unloaded "
                                                  "and the agent is stopping"))
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the runtime raised: the version stays unloaded
            error = exc if isinstance(exc, ModelReloadError) else ModelReloadError(
                f"model {served.name} version {served.version} was unloaded while idle and could not be loaded "
                f"again: {exc}")
            self.metrics.model_reloads.inc(served.name, "failed")
            log.error("model.reload_failed", model=served.name, version=served.version, reason=str(exc)[:500])
            self.sink.event({"type": "model.reload_failed", "model": served.name, "version": served.version,
                             "error": {"code": error.code, "message": str(error)[:500]}})
            future.set_exception(error)
            return
        self.metrics.model_reloads.inc(served.name, "ok")
        log.info("model.reloaded", model=served.name, version=served.version, cold_start_ms=cold_ms,
                 delegate=served.session.delegate)
        self.sink.event({"type": "model.reloaded", "model": served.name, "version": served.version,
                         "cold_start_ms": cold_ms, "delegate": served.session.delegate})
        future.set_result(None)

    async def stop(self) -> None:
        """Cancel the loads under way (their waiters get ModelReloadError)."""
        for task in list(self._loads):
            task.cancel()
        if self._loads:
            await asyncio.gather(*self._loads, return_exceptions=True)
