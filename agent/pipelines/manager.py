"""The agent's streams: built from ``[stream.NAME]`` config, started and stopped at run time
(through the operations facade: API and ``stream-start``/``stream-stop`` commands), results
sent upstream through the event sink, to local subscribers, and optionally saved as snapshots.

Results are handled on the stream's own thread: the outbox write happens there (it is
thread-safe), and the event loop is woken only when a local live feed has subscribers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.config import StreamSection
from agent.core.ports import EventSink, ModelCatalog
from agent.errors import PipelineError, StreamError
from agent.pipelines.base import Frame, Item
from agent.pipelines.results import Broadcaster
from agent.pipelines.runner import Stream, StreamSpec

log = structlog.get_logger(__name__)


def spec_from_config(name: str, section: StreamSection) -> StreamSpec:
    model, _, version = section.model.partition("@")
    source = section.source.model_dump(mode="json", exclude_unset=True)  # as written (paths resolved): for status
    source["type"] = section.source.type
    return StreamSpec(name=name, source=source, model=model, version=int(version) if version else None,
                      pre=section.pre, post=section.post, policy=section.results.model_dump(),
                      snapshot_dir=section.snapshot_dir, snapshot_max_bytes=section.snapshot_max_bytes,
                      stall_after_s=section.stall_after_s)


class StreamManager:
    """Starts, stops and reports the configured streams. Start and stop on the event loop."""

    def __init__(self, sections: Mapping[str, StreamSection], models: ModelCatalog, sink: EventSink) -> None:
        self.models = models
        self.sink = sink
        self.specs = {name: spec_from_config(name, s) for name, s in sections.items()}
        self.autostart = [name for name, s in sections.items() if s.autostart]
        self.streams: dict[str, Stream] = {}
        self.feeds: dict[str, Broadcaster] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snapshots: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self, name: str) -> dict[str, Any]:
        """Raises StreamError for an unknown stream or one already running."""
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise StreamError(f"no stream '{name}' in the config (streams: {known})")
        running = self.streams.get(name)
        if running is not None and running.state in ("starting", "running", "stalled", "reconnecting"):
            raise StreamError(f"stream '{name}' is already running")
        self._loop = asyncio.get_running_loop()
        stream = Stream(spec, self.models, self._emit, self.sink.event)
        self.streams = {**self.streams, name: stream}  # readers on other threads iterate a stable dict
        stream.start()
        return stream.status()

    async def stop(self, name: str) -> dict[str, Any]:
        """Stop one stream (its threads are joined in a thread). Raises StreamError if it is not running."""
        stream = self.streams.get(name)
        if stream is None:
            raise StreamError(f"stream '{name}' is not running")
        await asyncio.to_thread(stream.stop)
        return stream.status()

    async def start_configured(self) -> None:
        for name in self.autostart:
            try:
                self.start(name)
            except (StreamError, PipelineError) as exc:
                log.error("stream.not_started", stream=name, reason=str(exc))

    async def stop_all(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in self.streams.values()))
        if self._snapshots is not None:
            self._snapshots.shutdown(wait=False)

    def uses(self, name: str, version: int) -> bool:
        """Whether a running stream infers with that model version (it must stay loaded)."""
        for stream in self.streams.values():
            spec = stream.spec
            finished = stream.state in ("ended", "stopped", "failed") and not stream.metrics.processing
            if finished or spec.model != name:
                continue
            if spec.version == version:
                return True
            if spec.version is None:
                try:
                    if self.models.default_version(name) == version:
                        return True
                except KeyError:
                    continue
        return False

    def status(self) -> list[dict[str, Any]]:
        """Every configured stream, running or not (safe from any thread)."""
        streams = self.streams
        out = [s.status() for s in streams.values()]
        out += [{"name": n, "state": "stopped", "model": s.model} for n, s in self.specs.items() if n not in streams]
        return sorted(out, key=lambda s: s["name"])

    def feed(self, name: str) -> Broadcaster:
        """The live results of one stream, for local subscribers. Raises StreamError for an unknown stream."""
        if name not in self.specs:
            raise StreamError(f"no stream '{name}'")
        feed = self.feeds.get(name)
        if feed is None:
            feed = Broadcaster()
            self.feeds = {**self.feeds, name: feed}
        return feed

    def _emit(self, stream: Stream, payload: dict[str, Any], item: Item) -> None:
        """On the stream's thread: upstream (the outbox is thread-safe), local subscribers, snapshot."""
        seq = self.sink.result(stream.spec.name, payload)
        if seq is not None:
            payload["seq"] = seq
        broadcaster = self.feeds.get(stream.spec.name)
        if broadcaster is not None and broadcaster.subscribers and self._loop is not None:
            self._loop.call_soon_threadsafe(broadcaster.publish, payload)  # only then is the loop woken
        if stream.spec.snapshot_dir is not None and isinstance(item, Frame):
            if self._snapshots is None:
                self._snapshots = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="snapshots")
            with contextlib.suppress(RuntimeError):  # shut down: the agent is stopping
                self._snapshots.submit(_snapshot, stream.spec, item)


def _snapshot(spec: StreamSpec, frame: Frame) -> None:
    """JPEG of the frame behind a published result; oldest removed past the size bound."""
    import cv2

    directory = Path(spec.snapshot_dir)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    if frame.encoded is not None:  # the JPEG as captured (MJPG): full size, no re-encoding
        data = frame.encoded
    else:
        ok, encoded = cv2.imencode(".jpg", frame.image)
        if not ok:
            return
        data = encoded.tobytes()
    path = directory / f"{spec.name}-{int(frame.ts * 1000)}-{frame.index}.jpg"
    path.write_bytes(data)
    files = sorted(directory.glob(f"{spec.name}-*.jpg"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    while files and total > spec.snapshot_max_bytes:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)
