"""One running stream: a capture thread and a processing thread around the model's worker.

Capture and processing overlap. Video keeps only the newest frame (drop-oldest, counted),
so results are never stale; audio is queued in order and an overflow is counted and
reported, never silent. The model is looked up for every item, so a deployment's swap
switches a running stream to the new version without stopping it; pre/post-processing is
rebuilt only if the new version declares different processing.

A source that is open but delivers nothing (a FIFO whose writer went quiet, a camera that
froze) is reported ``stalled`` after ``stall_after_s``, with the time since its last item, and
an event; rates (``input_fps``, ``inferred_per_s``) are current, over a sliding window, and the
totals (``captured``, ``inferred``) are reported apart.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import structlog

from agent.errors import AgentError
from agent.pipelines.base import AudioChunk, Frame, Item, PipelineError, Prepared, Source, SourceEnded, SourceError
from agent.pipelines.results import ResultPolicy

if TYPE_CHECKING:
    from agent.core.ports import ModelCatalog
    from agent.models.served import ServedModel

log = structlog.get_logger(__name__)

_FRAMES_IN_FLIGHT = 1  # frames left in the model while the stream waits for the oldest one


@dataclass
class StreamSpec:
    name: str
    source: dict[str, Any]
    model: str
    version: int | None = None
    pre: dict[str, Any] | None = None
    post: dict[str, Any] | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    snapshot_dir: Path | None = None
    snapshot_max_bytes: int = 50 * 1024 * 1024
    audio_queue_s: float = 10.0
    stall_after_s: float = 10.0

    def stall_threshold(self) -> float:
        """``stall_after_s``, but never less than three periods of a source paced slower than that (``fps``)."""
        fps = self.source.get("fps")
        if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0:
            return max(self.stall_after_s, 3.0 / fps)
        return self.stall_after_s


def processing_specs(served: ServedModel, spec: StreamSpec) -> tuple[dict[str, Any], dict[str, Any], list[str] | None]:
    """Pre/post specs from the bundle manifest, overridden key by key by the stream config."""
    manifest: dict[str, Any] = {}
    path = served.source.directory / "manifest.json"
    if path.is_file():
        manifest = orjson.loads(path.read_bytes())
    pre = {**(manifest.get("preprocess") or {}), **(spec.pre or {})}
    post = {**(manifest.get("postprocess") or {}), **(spec.post or {})}
    if "type" not in pre:
        raise PipelineError(f"stream '{spec.name}': model {served.name}@{served.version} declares no pre-processing "
                            "and the stream config gives none (pre.type)")
    if "type" not in post:
        post = {"type": "raw"}
    labels = None
    if manifest.get("labels"):
        labels_path = served.source.directory / manifest["labels"]
        labels = labels_path.read_text().splitlines() if labels_path.is_file() else None
    return pre, post, labels


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


RATE_WINDOW_S = 10  # rates are over the last 10 s: a current rate, not an average since start


class RateMeter:
    """Events per second over the last ``window_s`` seconds, in one-second buckets. Thread-safe.

    The window starts no earlier than the meter did, so a stream two seconds old reports its
    two-second rate; a source that stopped delivering decays to 0 within the window.
    """

    def __init__(self, window_s: int = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = max(int(window_s), 1)
        self.clock = clock
        self.started = clock()
        self._buckets = [0] * self.window
        self._head = int(self.started)  # the second the newest bucket counts
        self._lock = threading.Lock()

    def _advance(self, second: int) -> None:
        if second <= self._head:
            return
        for s in range(max(self._head + 1, second - self.window + 1), second + 1):
            self._buckets[s % self.window] = 0
        self._head = second

    def mark(self, n: int = 1) -> None:
        now = self.clock()
        with self._lock:
            self._advance(int(now))
            self._buckets[int(now) % self.window] += n

    def rate(self) -> float:
        now = self.clock()
        with self._lock:
            self._advance(int(now))
            count = sum(self._buckets)
        window_start = max(int(now) - self.window + 1, self.started)
        span = now - window_start
        return count / span if span > 1e-3 else 0.0


class StreamMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.captured = 0  # totals since the stream started
        self.inferred = 0
        self.capture_rate = RateMeter(clock=clock)
        self.infer_rate = RateMeter(clock=clock)
        self.last_item_at: float | None = None  # monotonic time of the last item the source delivered
        self.opened_at: float | None = None  # ... and of the last (re)open of the source
        self.capturing = False  # the capture thread is reading (False once the source ended or failed for good)
        self.processing = False
        self.dropped_frames = 0
        self.audio_overflow_samples = 0
        self.results = 0
        self.errors = 0
        self.reconnects = 0
        self.ages: collections.deque[float] = collections.deque(maxlen=1000)
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0

    def item(self) -> None:
        """The source delivered an item (capture thread)."""
        self.captured += 1
        self.capture_rate.mark()
        self.last_item_at = self.clock()

    def idle_for(self) -> float | None:
        """Seconds since the last item, or since the source was (re)opened if that is later; None before it opened."""
        marks = [t for t in (self.last_item_at, self.opened_at) if t is not None]
        return self.clock() - max(marks) if marks else None

    def since_last_item(self) -> float | None:
        """Seconds since the last item (since the source opened when it never delivered one)."""
        at = self.last_item_at if self.last_item_at is not None else self.opened_at
        return self.clock() - at if at is not None else None

    def to_dict(self) -> dict[str, Any]:
        recent = list(self.ages)  # one C-level copy: the stream thread appends meanwhile
        ages = np.asarray(recent) * 1e3 if recent else None
        since = self.since_last_item()
        return {
            # current rates over the last RATE_WINDOW_S; 0 once the thread that counts them is done
            "input_fps": round(self.capture_rate.rate(), 2) if self.capturing else 0.0,
            "inferred_per_s": round(self.infer_rate.rate(), 2) if self.processing else 0.0,
            "rate_window_s": RATE_WINDOW_S,
            "since_last_item_s": round(since, 3) if since is not None else None,
            "captured": self.captured, "inferred": self.inferred, "dropped_frames": self.dropped_frames,
            "audio_overflow_samples": self.audio_overflow_samples, "results": self.results, "errors": self.errors,
            "reconnects": self.reconnects,
            "age_ms_p50": round(float(np.percentile(ages, 50)), 2) if ages is not None else None,
            "age_ms_p99": round(float(np.percentile(ages, 99)), 2) if ages is not None else None,
            "real_time_factor": round(self.busy_seconds / self.audio_seconds, 4) if self.audio_seconds else None,
        }


class Stream:
    """``emit`` (each result) and ``event`` are called on the stream's own threads: they must be thread-safe."""

    def __init__(self, spec: StreamSpec, models: ModelCatalog,
                 emit: Callable[[Stream, dict[str, Any], Item], None],
                 event: Callable[[Mapping[str, Any]], object] | None = None) -> None:
        self.spec = spec
        self.models = models
        self.emit = emit
        self.event = event or (lambda _e: None)
        self.metrics = StreamMetrics()
        self.state = "starting"
        self.error: str | None = None
        self.policy = ResultPolicy(**spec.policy)
        # Live sources (cameras, paced files, microphones) drop stale frames / count overflow; a file read
        # as fast as possible is processed completely instead, at the model's pace.
        self.backpressure = (spec.source.get("type") in ("video", "images", "wav")
                             and not _truthy(spec.source.get("realtime", False))
                             and not str(spec.source.get("path", "")).startswith(("rtsp:", "http:", "https:")))
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Condition()
        self._frame: Frame | None = None
        self._audio: collections.deque[AudioChunk] = collections.deque()
        self._audio_samples = 0
        self._capture_done = False
        self._served: ServedModel | None = None
        self._pre: Any = None
        self._post: Any = None
        self._specs: tuple[Any, ...] | None = None
        self._inflight: collections.deque[tuple[Any, Prepared, Frame, ServedModel]] = collections.deque()
        self._last_item: Item | None = None
        self._reset = False
        self._threads: list[threading.Thread] = []
        self._source: Source | None = None
        self._waiting_for_room = False  # backpressure: the capture thread waits for the model, not the source
        self._stall_reported = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._running.set()
        self.metrics.capturing = self.metrics.processing = True  # until each thread ends
        self._threads = [threading.Thread(target=self._capture, name=f"capture-{self.spec.name}", daemon=True),
                         threading.Thread(target=self._process, name=f"stream-{self.spec.name}", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("stream.started", stream=self.spec.name, model=self.spec.model, source=self.spec.source.get("type"))

    def stop(self, timeout: float = 5.0) -> None:
        self._running.clear()
        self._stopped.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self.state = "stopped" if self.state != "ended" else "ended"
        log.info("stream.stopped", stream=self.spec.name, **self.metrics.to_dict())

    def stalled(self) -> bool:
        """Open, not waiting for the model, and no item for longer than the stall threshold."""
        idle = self.metrics.idle_for()
        return (self.state in ("running", "stalled") and not self._waiting_for_room and idle is not None
                and idle > self.spec.stall_threshold())

    def status(self) -> dict[str, Any]:
        served = self._served
        state = self.state
        if state in ("running", "stalled"):  # computed here too: a source stuck in a blocking read cannot say so
            state = "stalled" if self.stalled() else "running"
        return {"name": self.spec.name, "state": state, "error": self.error,
                "model": f"{served.name}@{served.version}" if served else self.spec.model,
                "source": self.spec.source, **self.metrics.to_dict()}

    # -- capture thread ----------------------------------------------------------------------------------
    def _capture(self) -> None:
        from agent.pipelines.sources import create_source

        backoff = 0.5
        while self._running.is_set():
            source = None
            try:
                source = self._source = create_source(self.spec.source)
                source.shrink_to = self._shrink_to()
                source.open()
                self.metrics.opened_at = self.metrics.clock()
                self._reset = True  # a reopened source starts over: fresh buffers and model state
                self.state, self.error, backoff = "running", None, 0.5
                while self._running.is_set():
                    item = source.read(0.5)
                    if item is not None:
                        self.metrics.item()
                        if self._stall_reported:
                            self._stall_ended()
                        self._put(item)
                    elif not self._stall_reported and self.stalled():
                        self._stall_began()
            except SourceEnded:
                self.state = "ended"
                break
            except (SourceError, PipelineError) as exc:
                if isinstance(exc, PipelineError):  # configuration: retrying cannot help
                    self.state, self.error = "failed", str(exc)
                    log.error("stream.bad_source", stream=self.spec.name, reason=str(exc))
                    break
                self.state, self.error = "reconnecting", str(exc)
                self.metrics.reconnects += 1
                log.warning("stream.source_failed", stream=self.spec.name, reason=str(exc), retry_in_s=backoff)
                self.event({"type": "stream.source_failed", "stream": self.spec.name, "reason": str(exc)})
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                if source is not None:
                    source.close()
                if self._stall_reported:
                    self._stall_ended()
        self.metrics.capturing = False
        with self._lock:
            self._capture_done = True
            self._lock.notify_all()

    def _stall_began(self) -> None:
        self._stall_reported = True
        self.state = "stalled"
        since = self.metrics.since_last_item()
        log.warning("stream.stalled", stream=self.spec.name, since_last_item_s=round(since or 0.0, 3),
                    stall_after_s=self.spec.stall_threshold())
        self.event({"type": "stream.stalled", "stream": self.spec.name,
                    "since_last_item_s": round(since or 0.0, 3)})

    def _stall_ended(self) -> None:
        self._stall_reported = False
        if self.state == "stalled":
            self.state = "running"
        log.info("stream.resumed", stream=self.spec.name)
        self.event({"type": "stream.resumed", "stream": self.spec.name})

    def _put(self, item: Item) -> None:
        with self._lock:
            if self.backpressure:  # a file read as fast as possible: wait for room, lose nothing
                room = (lambda: self._frame is None) if isinstance(item, Frame) else (
                    lambda: not self._audio or self._audio_samples + len(item.samples)
                    <= self.spec.audio_queue_s * item.sample_rate)
                self._waiting_for_room = True
                try:
                    while not room() and self._running.is_set():
                        self._lock.wait(0.1)
                finally:
                    self._waiting_for_room = False
                    self.metrics.last_item_at = self.metrics.clock()  # idle time counts from the hand-over
            if isinstance(item, Frame):
                if self._frame is not None:
                    self.metrics.dropped_frames += 1  # never process a stale frame
                self._frame = item
            else:
                self._audio.append(item)
                self._audio_samples += len(item.samples)
                limit = int(self.spec.audio_queue_s * item.sample_rate)
                while self._audio_samples > limit and len(self._audio) > 1:
                    dropped = self._audio.popleft()  # counted and reported: telemetry and status show it
                    self._audio_samples -= len(dropped.samples)
                    self.metrics.audio_overflow_samples += len(dropped.samples)
            self._lock.notify()

    def _take(self, timeout: float) -> Item | None:
        with self._lock:
            if self._frame is None and not self._audio and not self._capture_done:
                self._lock.wait(timeout)
            if self._frame is not None:
                item: Item = self._frame
                self._frame = None
                self._lock.notify_all()  # a capture thread may wait for room
                return item
            if self._audio:
                chunk = self._audio.popleft()
                self._audio_samples -= len(chunk.samples)
                self._lock.notify_all()
                return chunk
            return None

    # -- processing thread -------------------------------------------------------------------------------
    def _processors(self, served: ServedModel) -> None:
        from agent.pipelines.postprocess import make_postprocessor
        from agent.pipelines.preprocess import make_preprocessor

        pre, post, labels = processing_specs(served, self.spec)
        if self._specs is None or self._specs[0] != pre or self._pre is None or self._reset:
            self._pre = make_preprocessor(pre, served.session.inputs, served.session.outputs)
        if self._specs is None or self._specs[1:] != (post, labels) or self._post is None or self._reset:
            self._post = make_postprocessor(post, served.session.outputs, labels)
        self._specs = (pre, post, labels)
        self._reset = False
        if self._source is not None:
            self._source.shrink_to = self._shrink_to()
        if self._served is not None and self._served is not served:
            log.info("stream.model_switched", stream=self.spec.name, to=f"{served.name}@{served.version}")
        self._served = served

    def _shrink_to(self) -> Callable[[int, int], tuple[int, int]] | None:
        """The pre-processing's target size: the source may decode frames smaller (MJPG)."""
        return getattr(self._pre, "target_size", None)

    def _process(self) -> None:
        try:
            self._process_items()
        finally:
            self.metrics.processing = False

    def _process_items(self) -> None:
        last_error = 0.0
        while self._running.is_set():
            item = self._take(0.0 if self._inflight else 0.5)
            try:
                if item is None:
                    self._drain()  # nothing new: finish the frame still in the model
                    with self._lock:
                        ended = self._capture_done and self._frame is None and not self._audio
                    if ended:
                        self._flush()
                        return
                    continue
                served = self.models.get(self.spec.model, self.spec.version)
                if served is not self._served or self._reset:
                    self._drain()
                    self._processors(served)
                if isinstance(item, Frame):
                    self._handle_frame(served, item)
                else:
                    self._drain()
                    self._handle(served, item)
            except (AgentError, TimeoutError) as exc:
                self._inflight.clear()
                self.metrics.errors += 1
                now = time.monotonic()
                if now - last_error > 5:
                    last_error = now
                    log.warning("stream.item_failed", stream=self.spec.name, reason=str(exc))
                if isinstance(exc, PipelineError):
                    self.state, self.error = "failed", str(exc)
                    self._running.clear()
                    return

    def _handle_frame(self, served: ServedModel, frame: Frame) -> None:
        """Frames overlap: one in the model, the next queued behind it, while this thread pre-processes
        the one after and post-processes the one before.

        The queued frame keeps the model busy across this thread's wake-ups (~0.1-0.3 ms each on a
        shared 2-core machine: 16 % of a 1 ms model); it ages by at most one inference. Frames carry
        no model state from one to the next, so overlapping them is safe; audio windows do
        (``update``), so they go one at a time through ``_handle``.
        """
        prepared = next(iter(self._pre(frame)))  # overlaps the frames in flight
        self._inflight.append((served.infer_threadsafe(prepared.feeds, prepared.meta), prepared, frame, served))
        if len(self._inflight) > _FRAMES_IN_FLIGHT:
            future, previous, item, model = self._inflight.popleft()
            self._finish(model, item, previous, future.result(timeout=30))  # overlaps the next inference

    def _flush(self) -> None:
        """A finite source ended: let the post-processor close what is open (a speech segment)."""
        served, last = self._served, self._last_item
        if self._post is None or served is None or last is None:
            return
        result = self._post.flush()
        if result is not None and self.policy.allow(result):
            self.metrics.results += 1
            payload = {"stream": self.spec.name, "model": f"{served.name}@{served.version}", "captured_at": last.ts,
                       "age_ms": round((time.time() - last.ts) * 1e3, 2), "end_of_stream": True, **result}
            self.emit(self, payload, last)

    def _drain(self) -> None:
        while self._inflight:
            future, prepared, frame, served = self._inflight.popleft()
            self._finish(served, frame, prepared, future.result(timeout=30))

    def _finish(self, served: ServedModel, item: Item, prepared: Prepared, outputs: Mapping[str, np.ndarray]) -> None:
        self.metrics.inferred += 1
        self.metrics.infer_rate.mark()
        self._last_item = item
        result = self._post(outputs, prepared.meta)
        if result is not None and self.policy.allow(result):
            self.metrics.results += 1
            where = {"frame": item.index} if isinstance(item, Frame) else {"sample_offset": item.offset}
            payload = {"stream": self.spec.name, "model": f"{served.name}@{served.version}",
                       "captured_at": item.ts, "age_ms": round((time.time() - item.ts) * 1e3, 2), **where, **result}
            self.emit(self, payload, item)
        self.metrics.ages.append(time.time() - item.ts)

    def _handle(self, served: ServedModel, item: Item) -> None:
        started = time.perf_counter()
        for prepared in self._pre(item):
            future = served.infer_threadsafe(prepared.feeds, prepared.meta)
            outputs = future.result(timeout=30)
            self._pre.update(outputs)  # state for the next window: never overlap stateful windows
            self._finish(served, item, prepared, outputs)
        if isinstance(item, AudioChunk):
            self.metrics.audio_seconds += len(item.samples) / item.sample_rate
            self.metrics.busy_seconds += time.perf_counter() - started
