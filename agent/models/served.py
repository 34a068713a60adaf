"""One loaded model version that answers requests, and one that failed to load.

A ``ServedModel`` is what the API and the streams call; its worker thread runs the session.
Its counters live in its ``ModelStats`` (per version, kept across watchdog restarts).

A version idle past its ``unload_after_s`` is unloaded in place (``release``, by
``agent.models.residency``): it stays listed with its specs and statistics, and the next request
or stream item waits for the one load all waiters share (``wake``), then runs as usual.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from agent.errors import AgentError, InferenceError, ModelReloadError, RequestError
from agent.models.instances import Instances
from agent.models.probe import KnownGood
from agent.models.stats import ModelStats, Timing
from agent.models.store import ModelVersion
from agent.models.tensors import check_feeds
from agent.models.worker import Outputs, Prepare, Worker
from agent.runtimes import Session, TensorSpec

R = TypeVar("R")
AVAILABLE, UNLOADED = "AVAILABLE", "UNLOADED"
#: How long a stream thread waits for an unloaded version to load again.
RELOAD_WAIT_S = 120.0


@dataclass
class ServedModel:
    """One model version that is loaded and answering requests."""

    name: str
    version: int
    runtime: str
    source: ModelVersion
    session: Session
    worker: Worker
    loaded_at: float = field(default_factory=time.time)
    # While set (the installer's health window), answers are checked for NaN and infinity, except in
    # the outputs named here (the manifest's ``allow_nonfinite``); a hit counts in ``stats.nonfinite``.
    nonfinite_check: frozenset[str] | None = None
    # While a shadow version runs beside this one (agent.models.shadow): offered each answered request.
    mirror: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, Any] | None], None] | None = None
    # With elastic instances on ([scaling] enabled): this version's workers, its own first (agent.models.instances).
    pool: Instances | None = None
    # What a transport builds for this version on demand (the API's frame pre-processors): gone with it.
    cache: dict[str, Any] = field(default_factory=dict)
    # UNLOADED: idle past ``unload_after_s``, sessions and threads released (agent.models.residency).
    state: str = AVAILABLE
    last_used: float = field(default_factory=time.monotonic)  # a request admitted or answered
    cold_start_ms: float | None = None  # the last load after an unload
    # While unloaded: starts (or joins) the load again, from any thread; the future ends when it is done.
    wake: Callable[[ServedModel], concurrent.futures.Future[None]] | None = None
    closed: bool = False
    # ``state`` changes and stream threads' hand-overs, so none lands on a stopped worker.
    _gate: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Held by whatever changes this version's workers: unload, load again, instance scaling (event loop).
    changing: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _reload: concurrent.futures.Future[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Looked up where the version is when first needed: a deployment moves it after loading.
        self.worker.known_good = KnownGood(lambda: self.source.directory)

    @property
    def stats(self) -> ModelStats:
        return self.worker.stats

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self.session.inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self.session.outputs

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def _admit(self, feeds: Mapping[str, np.ndarray]) -> float:
        """Check the feeds and count the request; returns its start time."""
        try:
            check_feeds(self.session.inputs, feeds)
        except RequestError:
            self.stats.refused()  # the installer's health window counts these: a new version may reject old clients
            raise
        self.stats.admitted()
        self.last_used = time.monotonic()
        return time.perf_counter()

    def _account(self, started: float, error: BaseException | None, outputs: Outputs | None = None) -> None:
        self.last_used = time.monotonic()
        if error is None:
            self.stats.call_ended(time.perf_counter() - started)
            allowed = self.nonfinite_check
            if allowed is not None and outputs is not None and not all_finite(outputs, allowed):
                self.stats.answered_nonfinite()
        else:
            self.stats.call_ended(None, runtime_failure=isinstance(error, InferenceError))

    async def infer(self, feeds: Mapping[str, np.ndarray], *, raw_outputs: bool = False,
                    timing: Timing | None = None) -> Outputs:
        """Raises InvalidInputError (a RequestError) for feeds that do not fit the model or that its
        runtime refuses while its known-good input runs; InferenceError if the runtime fails.

        ``timing`` (for the statistics) gets the hand-over and the runtime call's start and end.
        """
        return await self.infer_then(feeds, _same, raw_outputs=raw_outputs, timing=timing)

    async def infer_then(self, feeds: Mapping[str, np.ndarray], then: Callable[[Outputs], R], *,
                         raw_outputs: bool = False, timing: Timing | None = None,
                         prepare: Prepare | None = None) -> R:
        """``then(outputs)``, run on the thread that ran the model: the worker's, or the caller's for
        an inline run. Raises what ``infer`` raises, and what ``then`` raises (and ModelReloadError:
        the version was unloaded while idle and could not be loaded again).

        ``prepare`` turns ``feeds`` into the model's on that thread first (a frame through the
        manifest's pre-processing): its output is what the model checks, runs and mirrors."""
        if self.state != AVAILABLE:
            await self.loaded()
        prepared: dict[str, np.ndarray] = {}
        if prepare is None:
            started = self._admit(feeds)
        else:
            self.stats.admitted()  # the pre-processor was checked against the inputs when it was made
            self.last_used = time.monotonic()
            started = time.perf_counter()
            prepare = _keeping(prepare, prepared)
        pool = self.pool
        worker = self.worker if pool is None else pool.pick()
        if pool is not None and timing is None:
            timing = Timing(time.perf_counter_ns())  # its queue wait is what the scaler judges
        if timing is not None:
            timing.submitted = time.perf_counter_ns()
        answered = False

        def finish(outputs: Outputs) -> R:
            nonlocal answered
            answered = True
            self._account(started, None, outputs)
            result = then(outputs)  # the answer first: the shadow's sample after it
            if self.mirror is not None and not raw_outputs:
                self.mirror(feeds if prepare is None else prepared, outputs, None)
            return result

        try:
            outputs = worker.run_inline(feeds, raw_outputs, timing, prepare)
            if outputs is not None:
                return finish(outputs)
            result: R = await worker.submit(feeds, raw_outputs, timing, then=finish, prepare=prepare)
        except AgentError as exc:
            if not answered:  # the model failed (not ``then``)
                self._account(started, exc)
            raise
        finally:
            if pool is not None:
                pool.done(worker, _waited(timing))
        return result

    def infer_threadsafe(self, feeds: Mapping[str, np.ndarray],
                         meta: Mapping[str, Any] | None = None) -> concurrent.futures.Future[Outputs]:
        """``infer`` for a caller on its own thread (a stream): the result comes straight from the worker.

        Blocks while an unloaded version loads again.

        Raises:
            RequestError: the feeds do not fit (counted as rejected, like ``infer``); the future
                fails with InvalidInputError when the runtime refuses them, InferenceError when it fails.
            ModelReloadError: the version was unloaded while idle and could not be loaded again.
        """
        while True:
            with self._gate:  # never hand over to a worker that an unload is stopping
                if self.state == AVAILABLE:
                    started = self._admit(feeds)
                    pool = self.pool
                    worker = self.worker if pool is None else pool.pick()
                    timing = None if pool is None else Timing(0, time.perf_counter_ns())
                    future = worker.submit_threadsafe(feeds, timing=timing)
                    break
            try:
                self._wake().result(timeout=RELOAD_WAIT_S)
            except concurrent.futures.TimeoutError as exc:
                raise ModelReloadError(f"model {self.name} version {self.version} did not load again within "
                                       f"{RELOAD_WAIT_S:g} s") from exc
        if pool is not None:  # the item's queue wait is judged by the scaler, like an API request's
            future.add_done_callback(lambda _done: pool.done(worker, _waited(timing)))
        future.add_done_callback(lambda done: None if done.cancelled() else self._done(started, feeds, done, meta))
        return future

    def _done(self, started: float, feeds: Mapping[str, np.ndarray], done: concurrent.futures.Future[Outputs],
              meta: Mapping[str, Any] | None) -> None:
        error = done.exception()
        outputs = None if error else done.result()
        self._account(started, error, outputs)
        if outputs is not None and self.mirror is not None:
            self.mirror(feeds, outputs, meta)

    # -- unloading while idle (agent.models.residency) -------------------------------------------
    async def loaded(self) -> None:
        """Wait until an unloaded version is loaded again (one load for every waiter).

        Raises:
            ModelReloadError: the load failed (the version stays unloaded; the next request retries).
        """
        while self.state != AVAILABLE:
            await asyncio.wrap_future(self._wake())

    def _wake(self) -> concurrent.futures.Future[None]:
        wake = self.wake
        if wake is None or self.closed:
            raise ModelReloadError(f"model {self.name} version {self.version} was unloaded")
        return wake(self)

    def reloading(self) -> tuple[concurrent.futures.Future[None], bool]:
        """The load every waiter shares, and whether the caller is the first (then it starts it)."""
        with self._gate:
            if self.state == AVAILABLE:
                done: concurrent.futures.Future[None] = concurrent.futures.Future()
                done.set_result(None)
                return done, False
            if self._reload is None or self._reload.done():
                self._reload = concurrent.futures.Future()
                return self._reload, True
            return self._reload, False

    def release(self) -> list[Worker] | None:
        """Unload if every worker is idle (on the event loop, holding ``changing``): the version
        stays listed, requests from now on wait for ``wake``. Returns the workers to stop and
        close (blocking: in a thread), None when busy, closed or already unloaded."""
        with self._gate:
            workers = list(self.pool.workers) if self.pool is not None else [self.worker]
            if self.state != AVAILABLE or self.closed or not all(w.idle for w in workers):
                return None
            self.state = UNLOADED
            return workers

    def adopt(self, fresh: ServedModel, cold_start_ms: float) -> None:
        """Serve again with ``fresh``'s session and worker (a load of this version, on the event loop):
        statistics and the known-good input carry over; instances start again from one."""
        fresh.worker.stats = self.worker.stats
        fresh.worker.known_good = self.worker.known_good
        with self._gate:
            self.session, self.worker = fresh.session, fresh.worker
            if self.pool is not None:
                self.pool = Instances(fresh.worker)
            self.cold_start_ms = cold_start_ms
            self.last_used = time.monotonic()
            self.state = AVAILABLE

    def answers_known_good(self) -> bool | None:
        """Run the version's known-good input (blocking: it waits for the session): True if the model
        answers it, False if it fails, None when the version has no known-good input."""
        feeds = self.worker.known_good.feeds()
        if feeds is None:
            return None
        try:
            self.worker.run_sync(feeds)
        except Exception:  # noqa: BLE001 - whatever the runtime raises, the model did not answer
            return False
        return True

    def close(self) -> None:
        """Stop the workers (queued requests finish first) and release the sessions. Blocks."""
        with self._gate:
            self.closed = True  # a load again that ends now is discarded
            if self.state != AVAILABLE:
                return  # unloaded: stopped by the unload
        for extra in (self.pool.workers[1:] if self.pool is not None else ()):
            extra.stop()
            extra.session.close()
        self.worker.stop()
        self.session.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "state": self.state, "runtime": self.runtime,
            "delegate": self.session.delegate, "fallbacks": list(self.session.report.fallbacks),
            "path": str(self.source.file), "batching": self.worker.batching_active,
            "inline": self.worker.inline, "known_good": self.worker.known_good.source,
            "inputs": [s.to_dict() for s in self.session.inputs],
            "outputs": [s.to_dict() for s in self.session.outputs],
            "requests": self.stats.requests, "errors": self.stats.errors,
            "instances": 0 if self.state != AVAILABLE else len(self.pool) if self.pool is not None else 1,
            "cold_start_ms": self.cold_start_ms,
        }


def _waited(timing: Timing | None) -> float | None:
    """Seconds a request waited for its worker (0 inline), None if it never ran."""
    if timing is None or not timing.started or not timing.submitted:
        return None
    return max(0, timing.started - timing.submitted) / 1e9


def _keeping(prepare: Prepare, into: dict[str, np.ndarray]) -> Prepare:
    """``prepare`` that also keeps what it made in ``into`` (for the shadow's sample)."""
    def run(feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        made = prepare(feeds)
        into.update(made)
        return made
    return run


def _same(outputs: Outputs) -> Outputs:
    return outputs


def all_finite(outputs: Mapping[str, np.ndarray], allowed: frozenset[str] = frozenset()) -> bool:
    """No NaN or infinity in any floating-point output except those named in ``allowed``.

    One ``isfinite`` pass per float output: ~2 µs for a small output, ~0.4 ms per million values.
    """
    for name, array in outputs.items():
        if array.dtype.kind in "fc" and name not in allowed and not np.isfinite(array).all():
            return False
    return True


@dataclass(frozen=True)
class LoadFailure:
    name: str
    version: int
    path: str
    reason: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": "FAILED", "path": self.path,
                "error": self.reason}
