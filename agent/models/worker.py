"""One inference thread per loaded model version, with optional dynamic batching.

ONNX Runtime and LiteRT release the GIL while they compute, so a thread per model lets
the event loop keep parsing requests. A job may carry ``then``, run on the worker thread
with its outputs: the API formats and writes its answer there (``agent.api.http.DirectAnswer``),
so a client waits for one thread's wake-up, not two. Results are then handed back with one
``call_soon_threadsafe`` per batch (the loop's bookkeeping, off the client's path); a job whose
client went away is skipped, never run.

The hop to the thread and back costs ~100 µs of wake-ups on a small board, as much as a
small model's whole inference. So a quick model on the CPU, with batching off, runs on the
caller's thread when its worker is idle and the request's inputs are small (``run_inline``,
``inline_max_bytes``: a quick model given a large batch is not quick); a lock keeps the session
to one caller at a time either way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from agent.config import BatchingSection
from agent.errors import AgentError, InferenceError, InvalidInputError
from agent.models.activity import SERVING
from agent.models.batching import BatchLayout
from agent.models.probe import KnownGood
from agent.models.stats import ModelStats, Timing
from agent.runtimes import Session

log = structlog.get_logger(__name__)

Outputs = dict[str, np.ndarray]
Feeds = Mapping[str, np.ndarray]
Prepare = Callable[[Feeds], Feeds]  # the request's feeds -> the model's, on the thread that runs it


@dataclass
class Job:
    feeds: Mapping[str, np.ndarray]
    raw_outputs: bool
    loop: asyncio.AbstractEventLoop | None  # None: a caller on another thread waits on a concurrent future
    future: asyncio.Future[Outputs] | concurrent.futures.Future[Outputs]
    enqueued: float = field(default_factory=time.perf_counter)
    size: int | None = None
    key: tuple[object, ...] | None = None
    timing: Timing | None = None  # stamped with the runtime call's start and end
    # Run on the worker thread with the outputs (e.g. to format and write the answer); what it
    # returns, or raises, is the future's result instead of the outputs.
    then: Callable[[Outputs], Any] | None = None
    # Run on the worker thread before the model: the request's feeds -> the model's (the manifest's
    # pre-processing of a frame sent to predict). Such a job is never batched.
    prepare: Prepare | None = None


_STOP = object()


class Worker:
    """Runs ``session`` jobs on a dedicated thread; ``batching`` coalesces compatible jobs."""

    def __init__(self, name: str, session: Session, batching: BatchingSection | None = None, *,
                 on_batch: Callable[[int], None] | None = None, inline_max_us: int = 0,
                 inline_max_bytes: int = 256 * 1024, stats: ModelStats | None = None) -> None:
        self.name = name
        self.session = session
        self.stats = stats or ModelStats()
        self._lock = threading.Lock()  # one call in the session at a time: LiteRT interpreters are not thread-safe
        self._inline_max_s = inline_max_us / 1e6
        self.inline_max_bytes = inline_max_bytes
        self._call_s: float | None = None  # recent single-request call time (moving average)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: collections.deque[Any] = collections.deque()
        self._on_batch = on_batch or (lambda _n: None)
        self.layout: BatchLayout | None = None
        self.batching = batching if batching is not None and batching.enabled else None
        if self.batching is not None:
            self.layout = BatchLayout.for_model(session.inputs, session.outputs, self.batching.output_batch_axes)
            if self.layout is None:
                log.warning("model.batching_disabled", model=name, reason="batch dimension is fixed")
                self.batching = None
        self.busy_since: float | None = None
        self._expected = 1  # requests in the last batch: what an adaptive gather waits for
        self._current: list[Job] = []
        self._turn: list[Job] = []  # batching: requests of this turn of the event loop (``submit``)
        self._turn_busy = False  # batching: a request of this turn ran inline (``run_inline``)
        self._stopped = False
        self.known_good = KnownGood()  # set by the served model (agent.models.probe)
        self._thread = threading.Thread(target=self._loop, name=f"infer-{name}", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing queued, held back, gathered for this turn of the event loop, or running."""
        return self.busy_since is None and self._queue.empty() and not self._held and not self._turn

    @property
    def batching_active(self) -> bool:
        return self.batching is not None

    def submit(self, feeds: Mapping[str, np.ndarray], raw_outputs: bool = False,
               timing: Timing | None = None, then: Callable[[Outputs], Any] | None = None,
               prepare: Prepare | None = None,
               ) -> asyncio.Future[Any]:
        """The outputs, or with ``then`` what ``then(outputs)`` returns, run on the worker thread
        (``prepare``, if given, turns ``feeds`` into the model's there first)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job = Job(feeds, raw_outputs, loop, future, timing=timing, then=then, prepare=prepare)
        if self.batching is not None and self.inline and prepare is None:
            # Held to the end of this turn of the event loop: requests that arrived together are
            # batched on the worker thread; one that came alone runs inline (``_end_turn``).
            self._turn.append(job)
            if len(self._turn) == 1:
                loop.call_soon(self._end_turn)
            return future
        self._enqueue(job)
        return future

    def _clear_turn(self) -> None:
        self._turn_busy = False

    def _end_turn(self) -> None:
        """On the event loop, once per turn with requests for a quick batching model: a lone
        request runs inline when the worker is idle (nothing to batch it with, so no hop to the
        thread and back); requests that came together go to the worker thread to be batched."""
        jobs, self._turn = self._turn, []
        if len(jobs) == 1 and not self._stopped:
            job = jobs[0]
            if job.future.cancelled():
                return
            if (payload_bytes(job.feeds) <= self.inline_max_bytes and not self._held and self._queue.empty()
                    and self._lock.acquire(blocking=False)):
                try:
                    self.busy_since = time.monotonic()
                    result = self._call(job.feeds, job.raw_outputs, 1, [job.timing])
                finally:
                    self.busy_since = None
                    self._lock.release()
                self._on_batch(1)
                _deliver([(job, _then(job, result))])
                return
        for job in jobs:
            if self._stopped:
                job.future.set_exception(InferenceError(f"model {self.name} was unloaded"))
            else:
                self._enqueue(job)

    def submit_threadsafe(self, feeds: Mapping[str, np.ndarray], raw_outputs: bool = False,
                          timing: Timing | None = None) -> concurrent.futures.Future[Outputs]:
        """For callers on their own thread (stream pipelines): no hop through the event loop."""
        future: concurrent.futures.Future[Outputs] = concurrent.futures.Future()
        self._enqueue(Job(feeds, raw_outputs, None, future, timing=timing))
        return future

    def _enqueue(self, job: Job) -> None:
        if self.layout is not None and job.prepare is None:
            job.size = self.layout.request_size(job.feeds)
            job.key = self.layout.key(job.feeds) if job.size is not None else None
        self._queue.put(job)

    def run_sync(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        """Direct call for warm-up, before the worker serves traffic (untimed: it pays the lazy set-up)."""
        with self._lock:
            return self.session.run(feeds)

    @property
    def inline(self) -> bool:
        """Whether idle-time requests with small inputs run on the caller's thread (a quick CPU
        model; with batching, only a request that arrives alone in its turn of the event loop)."""
        return self._call_s is not None and self._call_s <= self._inline_max_s

    def run_inline(self, feeds: Mapping[str, np.ndarray], raw_outputs: bool = False,
                   timing: Timing | None = None,
                   prepare: Prepare | None = None,
                   ) -> Outputs | None:
        """Run on the caller's thread if the model is quick, the inputs small (``inline_max_bytes``)
        and nothing is queued or running (with batching: and it is the first request of this turn
        of the event loop); None means "submit instead". Raises what the session raises."""
        if (not self.inline or self._held or not self._queue.empty() or payload_bytes(feeds) > self.inline_max_bytes):
            return None
        if self.batching is not None and prepare is None:
            # Only the first request of a turn of the event loop: others in the same turn are held
            # to its end and batched (``submit``); a lone client's request never waits a turn.
            if self._turn_busy or self._turn:
                return None
            self._turn_busy = True
            asyncio.get_running_loop().call_soon(self._clear_turn)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self.busy_since = time.monotonic()
            result = self._call(feeds, raw_outputs, 1, [timing], prepare)
        finally:
            self.busy_since = None
            self._lock.release()
        self._on_batch(1)
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def abandon(self, reason: str) -> None:
        """Give up on a stuck thread: fail its current and queued jobs, let it end when it can.

        Called on the event loop thread by the watchdog; the thread itself cannot be killed.
        """
        error = InferenceError(reason)
        for job in list(self._current):
            if not job.future.done():
                job.future.set_exception(error)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, Job) and not job.future.done():
                job.future.set_exception(error)
        self._queue.put(_STOP)

    # -- worker thread -------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._held:
            return self._held.popleft()
        if timeout is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            job = self._next(None)
            if job is _STOP:
                return
            if job.future.cancelled():
                continue
            if self.batching is None or job.key is None:
                self._run([job])
                continue
            self._run(self._gather(job))

    def _gather(self, first: Job) -> list[Job]:
        assert self.batching is not None and first.size is not None
        cfg = self.batching
        batch, total = [first], first.size
        deadline = first.enqueued + cfg.max_queue_delay_us / 1e6
        expected = min(self._expected, cfg.max_batch_size) if cfg.adaptive_delay else cfg.max_batch_size
        deferred: list[Any] = []
        while total < cfg.max_batch_size and total not in cfg.preferred_batch_sizes:
            # Take what is queued; wait for more only while fewer came than last time.
            job = self._next(max(0.0, deadline - time.perf_counter()) if len(batch) < expected else 0.0)
            if job is None:
                break
            if job is _STOP:
                deferred.append(job)  # handled after this batch
                break
            if job.future.cancelled():
                continue
            if job.key != first.key or job.size is None or total + job.size > cfg.max_batch_size:
                deferred.append(job)
                if len(deferred) > cfg.max_batch_size:
                    break
                continue
            batch.append(job)
            total += job.size
        self._held.extendleft(reversed(deferred))
        self._expected = len(batch)
        return batch

    def _run(self, jobs: list[Job]) -> None:
        with self._lock:
            self.busy_since = time.monotonic()
            self._current = jobs
            try:
                results = self._results(jobs)
            finally:
                self.busy_since = None
        self._finish_all(results)  # after the lock: whoever gets an answer finds the session free

    def _results(self, jobs: list[Job]) -> list[tuple[Job, Outputs | BaseException]]:
        """Run ``jobs`` (one, or a batch); what ``_run_each`` answered itself is not returned."""
        if len(jobs) == 1:
            job = jobs[0]
            self._on_batch(job.size or 1)
            return [(job, self._call(job.feeds, job.raw_outputs, job.size or 1, [job.timing], job.prepare))]
        layout = self.layout
        assert layout is not None
        if any(j.raw_outputs != jobs[0].raw_outputs for j in jobs) or layout.unusable:
            self._run_each(jobs)
            return []
        sizes = [j.size or 0 for j in jobs]
        merged = self._call(layout.merge([j.feeds for j in jobs]), jobs[0].raw_outputs, sum(sizes),
                            [j.timing for j in jobs])
        if isinstance(merged, BaseException):
            self._run_each(jobs)  # one bad request must not fail the others: retry alone
            return []
        if not layout.learn(merged, sum(sizes)):
            if layout.unusable:
                log.warning("model.batching_disabled", model=self.name,
                            reason="outputs have no batch axis that matches the inputs")
                self.batching = None  # stop holding requests back for batches that never come
            self._run_each(jobs)
            return []
        self._on_batch(sum(sizes))
        return list(zip(jobs, layout.split(merged, sizes), strict=True))

    def _run_each(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._on_batch(job.size or 1)
            self._finish(job, self._call(job.feeds, job.raw_outputs, job.size or 1, [job.timing]))

    def _call(self, feeds: Mapping[str, np.ndarray], raw: bool, rows: int, timings: list[Timing | None],
              prepare: Prepare | None = None,
              ) -> Outputs | BaseException:
        """One runtime call for ``timings``' requests; a lone request's call is what ``inline``
        judges the model's speed by. ``prepare``'s time counts in the request's ``compute_infer``,
        never in the model's own speed."""
        begun = started = time.perf_counter_ns()
        if prepare is not None:
            try:
                feeds = prepare(feeds)
            except AgentError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - the request's input, never the model: a 400
                return InvalidInputError(f"pre-processing failed: {type(exc).__name__}: {str(exc)[:300]}")
            started = time.perf_counter_ns()
        counted = SERVING.begin()  # (a shadow's process pauses while serving calls run: agent.models.activity)
        try:
            result: Outputs | BaseException = self.session.run(feeds, raw_outputs=raw)
        except Exception as exc:  # noqa: BLE001 - any failure goes to the waiting client, never kills the thread
            return self._blame(exc, feeds)
        finally:
            SERVING.end(counted)
        ended = time.perf_counter_ns()
        if not self.known_good.settled:
            self.known_good.answered(feeds)
        for timing in timings:
            if timing is not None:
                timing.started, timing.ended = begun, ended
        self.stats.executed(rows, ended - started)
        if len(timings) == 1 and payload_bytes(feeds) <= self.inline_max_bytes:
            # (Large requests never run inline: their time says nothing about the others'.)
            took = (ended - started) / 1e9
            self._call_s = took if self._call_s is None else 0.9 * self._call_s + 0.1 * took
        return result

    def _blame(self, exc: Exception, feeds: Mapping[str, np.ndarray]) -> Exception:
        """Whose fault a failed call is (the session lock is held): the model's if its known-good
        input fails too, else the input's (400, and never counted against the model).

        A request the runtime refuses, e.g. a shape its metadata allows but its graph does not,
        must not make the watchdog reload the model or move it off its accelerator.
        """
        if not isinstance(exc, InferenceError):
            return exc
        probe = self.known_good.feeds()
        if probe is None or probe is feeds:
            return exc  # nothing to compare with: the runtime failed, as far as anyone can tell
        try:
            self.session.run(probe)
        except Exception:  # noqa: BLE001 - the known-good input fails too: the model is at fault
            return exc
        return InvalidInputError(f"the model's runtime refused this input: {exc}")

    @classmethod
    def _finish(cls, job: Job, result: Outputs | BaseException) -> None:
        cls._finish_all([(job, result)])

    @staticmethod
    def _finish_all(results: list[tuple[Job, Outputs | BaseException]]) -> None:
        """Hand results back: one event-loop wake-up for all of a batch's requests, not one each."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        for job, outcome in results:
            result = _then(job, outcome)
            if job.loop is None:
                _deliver([(job, result)])
            else:
                by_loop.setdefault(job.loop, []).append((job, result))
        for loop, delivered in by_loop.items():
            loop.call_soon_threadsafe(_deliver, delivered)


def _then(job: Job, outcome: Outputs | BaseException) -> Any:
    """What the job's future gets: ``job.then(outputs)`` when it has one (or what it raised)."""
    if job.then is None or isinstance(outcome, BaseException) or job.future.done():
        return outcome
    try:
        return job.then(outcome)
    except Exception as exc:  # noqa: BLE001 - goes to the waiting client, never kills the thread
        return exc


def payload_bytes(feeds: Mapping[str, np.ndarray]) -> int:
    """What a request's input tensors hold, in bytes."""
    return sum(value.nbytes for value in feeds.values())


def _deliver(results: list[tuple[Job, Any]]) -> None:
    for job, result in results:
        if job.future.done():
            continue
        try:
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # abandoned by the watchdog meanwhile
