"""Helpers shared by the sources: option models, frame normalisation, pacing, PCM decoding.

Nothing here opens a device or a file; the source modules do that.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from agent.pipelines.base import PipelineError, Source, SourceError
from agent.validation import error_key, error_reason


class SourceOptionError(PipelineError):
    """A source option is unknown, missing or has a bad value; names the source type and the option."""

    def __init__(self, source_type: str, option: str, reason: str) -> None:
        self.source_type = source_type
        self.option = option
        self.reason = reason
        super().__init__(f"source {source_type!r}: option {option!r}: {reason}")


class Options(BaseModel):
    """Base of every source's options: frozen, and unknown keys are an error (typos must not pass silently).

    A subclass declares ``type: Literal["its type"]`` (the config's union of sources is built from
    the ``SOURCES`` registry on it) and marks file paths ``PathStr`` / ``PathOrUrl`` so a relative
    path in the config file is relative to that file.
    """

    type: str

    model_config = ConfigDict(extra="forbid", frozen=True)


def _reason(err: ErrorDetails) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown option"
    if kind == "missing":
        return "required option is missing"
    return f"{error_reason(err)} (got {err.get('input')!r})"


class ConfiguredSource(Source):
    """A source whose keyword options are validated by its ``Options`` model at construction."""

    Options: ClassVar[type[Options]] = Options

    def __init__(self, **options: Any) -> None:
        """Raises:
        SourceOptionError: an option is unknown, missing or invalid.
        """
        try:
            self._options = self.Options.model_validate(options)
        except ValidationError as exc:
            err = exc.errors()[0]
            option = error_key(err["loc"], options) or "?"
            raise SourceOptionError(self.type, option, _reason(err)) from None

    def _require_open(self, handle: object) -> None:
        if handle is None:
            raise SourceError(f"{self.type} source {self.describe()} is not open")

    def describe(self) -> str:
        """Where this source reads from, for ``Frame.source`` and error messages."""
        return self.type


def to_bgr(image: Any, where: str) -> np.ndarray:
    """Any image array as contiguous HxWx3 uint8 BGR (gray and BGRA converted).

    Raises:
        SourceError: ``image`` is not an image array (wrong type, shape, dtype or empty).
    """
    if not isinstance(image, np.ndarray):
        raise SourceError(f"{where}: delivered {type(image).__name__}, not an image array")
    if image.size == 0 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise SourceError(f"{where}: delivered an array of shape {image.shape}, not an image")
    if image.dtype == np.uint16:  # 16-bit PNG/TIFF or a depth camera: keep the high byte
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceError(f"{where}: delivered an image of dtype {image.dtype}, expected uint8")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 4:
        image = image[:, :, :3]  # BGRA -> BGR: OpenCV's channel order already puts alpha last
    return np.ascontiguousarray(image)


class Pacer:
    """Hands out items at a fixed rate, like a live device: never in a burst to catch up after a stall.

    ``due()`` is when the next item may be delivered; ``wait(timeout)`` sleeps until then or
    for ``timeout``, whichever is first, and says whether the item is due.
    """

    def __init__(self, interval: float, clock: Any = time.monotonic, sleep: Any = time.sleep) -> None:
        self.interval = interval
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    def due(self) -> float:
        if self._next is None:
            self._next = self._clock()
        return self._next

    def wait(self, timeout: float) -> bool:
        delay = self.due() - self._clock()
        if delay > timeout:
            self._sleep(max(timeout, 0.0))
            return False
        if delay > 0:
            self._sleep(delay)
        return True

    def advance(self, interval: float | None = None) -> None:
        """The item was delivered; schedule the next one (re-anchored if we fell behind by > 1 interval)."""
        step = self.interval if interval is None else interval
        now = self._clock()
        nxt = self.due() + step
        self._next = nxt if nxt >= now - step else now

    def reset(self) -> None:
        self._next = None


class SampleClock:
    """Real-time pacing for audio: a chunk is due when its last sample would have been captured live.

    After a stall longer than ``max_lag`` the clock re-anchors instead of bursting to catch up.
    """

    def __init__(self, sample_rate: int, max_lag: float = 0.25, clock: Any = time.monotonic,
                 sleep: Any = time.sleep) -> None:
        self.rate = sample_rate
        self.max_lag = max_lag
        self._clock = clock
        self._sleep = sleep
        self._anchor: float | None = None  # clock time of sample 0

    def wait(self, start: int, end: int, timeout: float) -> bool:
        now = self._clock()
        if self._anchor is None:
            self._anchor = now - start / self.rate
        due = self._anchor + end / self.rate
        if now - due > self.max_lag:
            self._anchor += now - due
            due = now
        delay = due - now
        if delay > timeout:
            self._sleep(max(timeout, 0.0))
            return False
        if delay > 0:
            self._sleep(delay)
        return True

    def reset(self) -> None:
        self._anchor = None


class FdReader:
    """Reads whole PCM frames from a file descriptor, waiting in ``select`` so a read can time out.

    Works on blocking and non-blocking descriptors (pipes, FIFOs, stdin, a subprocess's stdout).
    """

    def __init__(self, fd: int, frame_bytes: int, chunk_bytes: int) -> None:
        self.fd = fd
        self.frame_bytes = frame_bytes
        self.chunk_bytes = chunk_bytes - chunk_bytes % frame_bytes or frame_bytes
        self.eof = False
        self._buf = bytearray()

    def read_chunk(self, timeout: float) -> bytes | None:
        """A full chunk, or the remaining whole frames at EOF; None if no full chunk within ``timeout``.

        Raises:
            EOFError: end of input and nothing (or only a partial frame) is left.
            OSError: the read failed.
        """
        deadline = time.monotonic() + timeout
        while len(self._buf) < self.chunk_bytes and not self.eof:
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                break
            try:
                data = os.read(self.fd, max(self.chunk_bytes - len(self._buf), 65536))
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                self.eof = True
            self._buf += data
        if len(self._buf) >= self.chunk_bytes:
            size = self.chunk_bytes
        elif self.eof:
            size = len(self._buf) - len(self._buf) % self.frame_bytes
            if size == 0:
                self._buf.clear()
                raise EOFError
        else:
            return None
        chunk = bytes(self._buf[:size])
        del self._buf[:size]
        return chunk


PCM_FORMATS = {"s16le": 2, "f32le": 4}


def decode_pcm(data: bytes, sample_format: str, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM bytes (whole frames) → mono float32 in [-1, 1].

    ``sample_format`` is ``u8``, ``s16le``, ``s24le``, ``s32le`` or ``f32le``.
    """
    if sample_format == "s16le":
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif sample_format == "f32le":
        samples = np.clip(np.frombuffer(data, dtype="<f4"), -1.0, 1.0).astype(np.float32)
    elif sample_format == "u8":
        samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif sample_format == "s32le":
        samples = (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    elif sample_format == "s24le":
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints & 0x800000, ints - 0x1000000, ints)
        samples = ints.astype(np.float32) / 8388608.0
    else:
        raise ValueError(f"unknown PCM format {sample_format!r}")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


def load_cv2() -> Any:
    """Import OpenCV on first use: it adds ~16 MB of RSS, which audio-only devices should not pay."""
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SourceError(f"OpenCV is not available: {exc}") from exc
    return cv2
