"""One loaded model version that answers requests, and one that failed to load.

A ``ServedModel`` is what the API and the streams call; its worker thread runs the session.
Its counters live in its ``ModelStats`` (per version, kept across watchdog restarts).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from agent.errors import AgentError, InferenceError, RequestError
from agent.models.instances import Instances
from agent.models.probe import KnownGood
from agent.models.stats import ModelStats, Timing
from agent.models.store import ModelVersion
from agent.models.tensors import check_feeds
from agent.models.worker import Outputs, Worker
from agent.runtimes import Session, TensorSpec

R = TypeVar("R")


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
        return time.perf_counter()

    def _account(self, started: float, error: BaseException | None, outputs: Outputs | None = None) -> None:
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
                         raw_outputs: bool = False, timing: Timing | None = None) -> R:
        """``then(outputs)``, run on the thread that ran the model: the worker's, or the caller's for
        an inline run. Raises what ``infer`` raises, and what ``then`` raises."""
        started = self._admit(feeds)
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
                self.mirror(feeds, outputs, None)
            return result

        try:
            outputs = worker.run_inline(feeds, raw_outputs, timing)
            if outputs is not None:
                return finish(outputs)
            result: R = await worker.submit(feeds, raw_outputs, timing, then=finish)
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

        Raises:
            RequestError: the feeds do not fit (counted as rejected, like ``infer``); the future
                fails with InvalidInputError when the runtime refuses them, InferenceError when it fails.
        """
        started = self._admit(feeds)
        pool = self.pool
        worker = self.worker if pool is None else pool.pick()
        if pool is None:
            future = worker.submit_threadsafe(feeds)
        else:  # the item's queue wait is judged by the scaler, like an API request's
            timing = Timing(0, time.perf_counter_ns())
            future = worker.submit_threadsafe(feeds, timing=timing)
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
        for extra in (self.pool.workers[1:] if self.pool is not None else ()):
            extra.stop()
            extra.session.close()
        self.worker.stop()
        self.session.close()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "state": "AVAILABLE", "runtime": self.runtime,
            "delegate": self.session.delegate, "fallbacks": list(self.session.report.fallbacks),
            "path": str(self.source.file), "batching": self.worker.batching_active,
            "inline": self.worker.inline, "known_good": self.worker.known_good.source,
            "inputs": [s.to_dict() for s in self.session.inputs],
            "outputs": [s.to_dict() for s in self.session.outputs],
            "requests": self.stats.requests, "errors": self.stats.errors,
            "instances": len(self.pool) if self.pool is not None else 1,
        }


def _waited(timing: Timing | None) -> float | None:
    """Seconds a request waited for its worker (0 inline), None if it never ran."""
    if timing is None or not timing.started or not timing.submitted:
        return None
    return max(0, timing.started - timing.submitted) / 1e9


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
