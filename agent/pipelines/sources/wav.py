"""WAV files as an audio source: mono float32 chunks at the file's own sample rate.

Owns RIFF parsing (8/16/24/32-bit PCM, 32-bit float, WAVE_FORMAT_EXTENSIBLE: more than the
stdlib ``wave`` module reads on 3.10/3.11), channel mix-down, chunking, looping and real-time
pacing. It never resamples: the pre-processor does, so ``AudioChunk.sample_rate`` is the file's.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import structlog
from pydantic import Field

from agent.pipelines.base import SOURCES, AudioChunk, SourceEnded, SourceError
from agent.pipelines.sources._common import ConfiguredSource, Options, SampleClock, decode_pcm
from agent.validation import PathStr

log = structlog.get_logger(__name__)

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_ENCODINGS = {(_PCM, 8): "u8", (_PCM, 16): "s16le", (_PCM, 24): "s24le", (_PCM, 32): "s32le", (_FLOAT, 32): "f32le"}


@dataclass(frozen=True)
class WavFormat:
    sample_format: str  # a decode_pcm format: u8, s16le, s24le, s32le, f32le
    channels: int
    sample_rate: int
    data_offset: int  # file offset of the first sample
    frames: int  # samples per channel

    @property
    def frame_bytes(self) -> int:
        return self.channels * {"u8": 1, "s16le": 2, "s24le": 3, "s32le": 4, "f32le": 4}[self.sample_format]


def read_wav_header(fh: BinaryIO, file_size: int) -> WavFormat:
    """Parse the RIFF header up to the start of the ``data`` chunk; ``fh`` is left there.

    A data size beyond the end of the file (a truncated file, or a streaming writer's 0xFFFFFFFF)
    is clamped to what the file holds.

    Raises:
        ValueError: not a RIFF/WAVE file, or an encoding this reader does not handle (the reason).
    """
    head = fh.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError(f"not a RIFF/WAVE file (starts with {head[:4]!r})")
    fmt: tuple[int, int, int, int] | None = None
    while True:
        chunk = fh.read(8)
        if len(chunk) < 8:
            raise ValueError("no 'data' chunk" if fmt else "no 'fmt ' chunk")
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            body = fh.read(size)
            if len(body) < 16:
                raise ValueError("'fmt ' chunk is too short")
            tag, channels, rate, _byte_rate, align, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _EXTENSIBLE:
                if len(body) < 26:
                    raise ValueError("WAVE_FORMAT_EXTENSIBLE without a sub-format")
                tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
            fmt = (tag, channels, rate, bits if align == 0 or channels == 0 else 8 * (align // channels))
            fh.seek(size % 2, 1)
        elif cid == b"data":
            if fmt is None:
                raise ValueError("'data' chunk before the 'fmt ' chunk")
            break
        else:
            fh.seek(size + size % 2, 1)
    tag, channels, rate, width_bits = fmt
    encoding = _ENCODINGS.get((tag, width_bits))
    if encoding is None:
        raise ValueError(
            f"unsupported encoding (format tag {tag:#06x}, {width_bits}-bit samples); "
            "supported: 8/16/24/32-bit PCM and 32-bit float"
        )
    if channels < 1 or rate < 1:
        raise ValueError(f"bad 'fmt ' chunk: {channels} channels at {rate} Hz")
    start = fh.tell()
    frames = min(size, max(file_size - start, 0)) // (channels * width_bits // 8)
    return WavFormat(encoding, channels, rate, start, frames)


class WavOptions(Options):
    type: Literal["wav"] = "wav"
    path: PathStr = Field(min_length=1)
    chunk_ms: float = Field(default=32.0, gt=0, le=10_000)
    realtime: bool = False
    loop: bool = False


@SOURCES.register
class WavSource(ConfiguredSource):
    """A WAV file as consecutive mono chunks of ``chunk_ms`` (the last one shorter unless looping).

    Every sample is delivered exactly once per pass, in order; with ``loop`` chunks run across the
    end of the file into its start. ``realtime`` releases each chunk when its last sample would
    have been captured by a live microphone.
    """

    kind = "audio"
    type = "wav"
    Options = WavOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts: WavOptions = self._options  # type: ignore[assignment]
        self.path = Path(self.opts.path)
        self.format: WavFormat | None = None
        self._fh: BinaryIO | None = None
        self._pos = 0  # frame within the data chunk
        self._offset = 0  # sample index since open
        self._chunk = 0
        self._pending: np.ndarray | None = None
        self._clock: SampleClock | None = None

    def describe(self) -> str:
        return str(self.path)

    def open(self) -> None:
        self.close()
        if not self.path.is_file():
            raise SourceError(
                f"WAV file {self.path} not found" if not self.path.exists() else f"{self.path} is not a file"
            )
        try:
            fh = self.path.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot open WAV file {self.path}: {exc.strerror}") from exc
        try:
            fmt = read_wav_header(fh, self.path.stat().st_size)
        except (ValueError, OSError, struct.error) as exc:
            fh.close()
            raise SourceError(f"WAV file {self.path}: {exc}") from exc
        if fmt.frames == 0 and self.opts.loop:
            fh.close()
            raise SourceError(f"WAV file {self.path} has no samples to loop over")
        self._fh, self.format = fh, fmt
        self._pos = self._offset = 0
        self._chunk = max(1, round(fmt.sample_rate * self.opts.chunk_ms / 1000))
        self._clock = SampleClock(fmt.sample_rate) if self.opts.realtime else None
        log.info(
            "source.opened",
            source=self.type,
            path=str(self.path),
            sample_rate=fmt.sample_rate,
            channels=fmt.channels,
            encoding=fmt.sample_format,
            seconds=round(fmt.frames / fmt.sample_rate, 3),
        )

    def _next_samples(self) -> np.ndarray:
        fh, fmt = self._fh, self.format
        assert fh is not None and fmt is not None
        parts: list[np.ndarray] = []
        want = self._chunk
        while want > 0:
            left = fmt.frames - self._pos
            if left == 0:
                if not self.opts.loop:
                    break
                fh.seek(fmt.data_offset)
                self._pos = 0
                continue
            n = min(want, left)
            data = fh.read(n * fmt.frame_bytes)
            if len(data) < n * fmt.frame_bytes:
                raise SourceError(f"WAV file {self.path} was truncated while reading")
            parts.append(decode_pcm(data, fmt.sample_format, fmt.channels))
            self._pos += n
            want -= n
        if not parts:
            raise SourceEnded(f"WAV file {self.path} ended after {self._offset} samples")
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read(self, timeout: float) -> AudioChunk | None:
        self._require_open(self._fh)
        assert self.format is not None
        if self._pending is None:
            self._pending = self._next_samples()
        n = len(self._pending)
        if self._clock is not None and not self._clock.wait(self._offset, self._offset + n, timeout):
            return None
        samples, self._pending = self._pending, None
        rate = self.format.sample_rate
        ts = time.time() - (n / rate if self._clock is not None else 0.0)
        chunk = AudioChunk(samples, rate, ts, self._offset, str(self.path))
        self._offset += n
        return chunk

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None
        self._pending = None
