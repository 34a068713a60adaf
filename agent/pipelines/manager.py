"""The agent's streams: built from ``[stream.NAME]`` config, started and stopped at run time
(API and ``stream-start``/``stream-stop`` commands), results sent upstream through the
outbox, to local subscribers, and optionally saved as snapshots."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.pipelines.base import Frame, Item, PipelineError
from agent.pipelines.results import Broadcaster
from agent.pipelines.runner import Stream, StreamSpec

if TYPE_CHECKING:
    from agent.daemon import Agent

log = structlog.get_logger(__name__)


def spec_from_config(name: str, section: Any) -> StreamSpec:
    model, _, version = section.model.partition("@")
    return StreamSpec(name=name, source=dict(section.source), model=model, version=int(version) if version else None,
                      pre=section.pre, post=section.post, policy=section.results.model_dump(),
                      snapshot_dir=section.snapshot_dir, snapshot_max_bytes=section.snapshot_max_bytes)


class StreamManager:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.specs = {name: spec_from_config(name, s) for name, s in agent.config.stream.items()}
        self.autostart = [name for name, s in agent.config.stream.items() if s.autostart]
        self.streams: dict[str, Stream] = {}
        self.feeds: dict[str, Broadcaster] = {}

    def start(self, name: str) -> dict[str, Any]:
        """Raises PipelineError for an unknown stream or one already running."""
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise PipelineError(f"no stream '{name}' in the config (streams: {known})")
        running = self.streams.get(name)
        if running is not None and running.state in ("starting", "running", "reconnecting"):
            raise PipelineError(f"stream '{name}' is already running")
        stream = Stream(spec, self.agent.registry, asyncio.get_running_loop(), self._emit, self._event)
        self.streams[name] = stream
        stream.start()
        return stream.status()

    def stop(self, name: str) -> dict[str, Any]:
        stream = self.streams.get(name)
        if stream is None:
            raise PipelineError(f"stream '{name}' is not running")
        stream.stop()
        return stream.status()

    async def start_configured(self) -> None:
        for name in self.autostart:
            try:
                self.start(name)
            except PipelineError as exc:
                log.error("stream.not_started", stream=name, reason=str(exc))

    async def stop_all(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in self.streams.values()))

    def status(self) -> list[dict[str, Any]]:
        out = [s.status() for s in self.streams.values()]
        out += [{"name": n, "state": "stopped", "model": s.model} for n, s in self.specs.items()
                if n not in self.streams]
        return sorted(out, key=lambda s: s["name"])

    def feed(self, name: str) -> Broadcaster:
        if name not in self.specs:
            raise PipelineError(f"no stream '{name}'")
        return self.feeds.setdefault(name, Broadcaster())

    def _event(self, payload: Any) -> None:
        self.agent._emit(payload)

    def _emit(self, stream: Stream, payload: dict[str, Any], item: Item) -> None:
        """On the event loop: upstream (outbox), local subscribers, snapshot."""
        link = self.agent.link
        if link is not None:
            payload["seq"] = link.result(stream.spec.name, payload)
        broadcaster = self.feeds.get(stream.spec.name)
        if broadcaster is not None:
            broadcaster.publish(payload)
        if stream.spec.snapshot_dir is not None and isinstance(item, Frame):
            asyncio.get_running_loop().run_in_executor(None, _snapshot, stream.spec, item)


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
