"""Raw PCM from a FIFO, a file or stdin (``path: "-"``), e.g. ``arecord ... | edge-agent`` or a
GStreamer pipeline writing into a named pipe.

Raw PCM has no header, so the sample rate, channel count and format are required knowledge.
End of input: stdin or a regular file → ``SourceEnded``; a FIFO whose writer went away →
``SourceError``, so the runner reopens it and waits for the next writer.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field

from agent.pipelines.base import SOURCES, AudioChunk, SourceEnded, SourceError
from agent.pipelines.sources._common import PCM_FORMATS, ConfiguredSource, FdReader, Options, decode_pcm
from agent.validation import PathOrUrl

log = structlog.get_logger(__name__)


class PcmOptions(Options):
    type: Literal["pcm"] = "pcm"
    path: PathOrUrl = Field(min_length=1, description='FIFO or file path, or "-" for stdin')
    sample_rate: int = Field(gt=0, le=768_000)
    channels: int = Field(default=1, ge=1, le=32)
    format: Literal["s16le", "f32le"] = "s16le"
    chunk_ms: float = Field(default=32.0, gt=0, le=10_000)


@SOURCES.register
class PcmSource(ConfiguredSource):
    """Interleaved little-endian PCM, mixed down to mono; reads wait in ``select`` up to ``timeout``.

    A FIFO is opened without waiting for a writer: ``read`` returns None until one connects.
    """

    kind = "audio"
    type = "pcm"
    Options = PcmOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts: PcmOptions = self._options  # type: ignore[assignment]
        self.stdin = self.opts.path == "-"
        self._fd: int | None = None
        self._reader: FdReader | None = None
        self._finite = True
        self._offset = 0

    def describe(self) -> str:
        return "stdin" if self.stdin else self.opts.path

    def open(self) -> None:
        self.close()
        opts = self.opts
        if self.stdin:
            try:
                fd = sys.stdin.fileno()
            except (AttributeError, ValueError, OSError) as exc:
                raise SourceError(f"PCM from stdin: stdin is not available ({exc})") from exc
            self._finite = True
        else:
            try:
                mode = Path(opts.path).stat().st_mode
            except FileNotFoundError:
                raise SourceError(f"PCM input {opts.path} not found") from None
            except OSError as exc:
                raise SourceError(f"PCM input {opts.path}: {exc.strerror}") from exc
            fifo = stat.S_ISFIFO(mode)
            if stat.S_ISDIR(mode):
                raise SourceError(f"PCM input {opts.path} is a directory")
            try:
                # O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears.
                fd = os.open(opts.path, os.O_RDONLY | (os.O_NONBLOCK if fifo else 0))
            except OSError as exc:
                raise SourceError(f"cannot open PCM input {opts.path}: {exc.strerror}") from exc
            self._finite = stat.S_ISREG(mode)
        frame_bytes = PCM_FORMATS[opts.format] * opts.channels
        chunk_frames = max(1, round(opts.sample_rate * opts.chunk_ms / 1000))
        self._fd = fd
        self._reader = FdReader(fd, frame_bytes, chunk_frames * frame_bytes)
        self._offset = 0
        log.info(
            "source.opened",
            source=self.type,
            path=self.describe(),
            sample_rate=opts.sample_rate,
            channels=opts.channels,
            format=opts.format,
        )

    def read(self, timeout: float) -> AudioChunk | None:
        self._require_open(self._reader)
        assert self._reader is not None
        try:
            data = self._reader.read_chunk(timeout)
        except EOFError:
            if self._finite:
                raise SourceEnded(f"PCM input {self.describe()} ended after {self._offset} samples") from None
            raise SourceError(f"PCM FIFO {self.describe()}: the writer closed it") from None
        except OSError as exc:
            raise SourceError(f"PCM input {self.describe()}: read failed: {exc.strerror or exc}") from exc
        if data is None:
            return None
        samples = decode_pcm(data, self.opts.format, self.opts.channels)
        rate = self.opts.sample_rate
        chunk = AudioChunk(samples, rate, time.time() - len(samples) / rate, self._offset, self.describe())
        self._offset += len(samples)
        return chunk

    def close(self) -> None:
        if self._fd is not None and not self.stdin:
            os.close(self._fd)
        self._fd = None
        self._reader = None
