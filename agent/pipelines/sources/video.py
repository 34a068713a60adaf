"""Video sources through OpenCV's ``VideoCapture``: V4L2 cameras, video files and network streams.

Owns opening, reading, looping and real-time pacing; it does not resize or convert colour beyond
guaranteeing HxWx3 uint8 BGR (the pre-processor adapts frames to the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import structlog
from pydantic import Field, field_validator

from agent.pipelines.base import SOURCES, Frame, SourceEnded, SourceError
from agent.pipelines.sources._common import (
    ConfiguredSource,
    Options,
    Pacer,
    load_cv2,
    to_bgr,
)
from agent.validation import PathOrUrl

log = structlog.get_logger(__name__)

DEFAULT_FPS = 30.0  # pacing rate for files whose header has no usable frame rate
_MAX_UNDECODABLE = 30  # corrupt frames skipped in a row before the source counts as failed


@dataclass(frozen=True)
class _Decoded:
    image: np.ndarray
    full_size: tuple[int, int] | None = None
    encoded: bytes | None = None


class _JpegFrames:
    """Decodes MJPG packets with libjpeg's DCT scaling: a 1/2, 1/4 or 1/8 size frame costs a fraction
    of a full decode (640x480 at 1/4: ~0.3 ms instead of ~0.7-0.9 ms here), and the pre-processing
    then has less to shrink."""

    _REDUCED = ((8, "IMREAD_REDUCED_COLOR_8"), (4, "IMREAD_REDUCED_COLOR_4"), (2, "IMREAD_REDUCED_COLOR_2"))

    def __init__(self) -> None:
        self.full: tuple[int, int] | None = None  # (w, h) of the last full-size decode

    def decode(self, packet: Any, shrink_to: Callable[[int, int], tuple[int, int]] | None) -> _Decoded | None:
        """None for a packet libjpeg cannot decode."""
        cv2 = load_cv2()
        data = np.asarray(packet, np.uint8).reshape(-1)
        factor, flag = self._factor(shrink_to)
        image = cv2.imdecode(data, flag)
        if image is None:
            return None
        full = self.full
        if factor == 1 or full is None or image.shape[:2] != (-(-full[1] // factor), -(-full[0] // factor)):
            if factor != 1:  # the frame size changed mid-stream: learn it from one full decode
                image = cv2.imdecode(data, cv2.IMREAD_COLOR)
                if image is None:
                    return None
            self.full = (image.shape[1], image.shape[0])
            return _Decoded(image, None, data.tobytes())
        return _Decoded(image, full, data.tobytes())

    def _factor(self, shrink_to: Callable[[int, int], tuple[int, int]] | None) -> tuple[int, int]:
        cv2 = load_cv2()
        if shrink_to is not None and self.full is not None:
            w, h = self.full
            need_w, need_h = shrink_to(w, h)
            for factor, name in self._REDUCED:
                if -(-w // factor) >= need_w and -(-h // factor) >= need_h:
                    return factor, getattr(cv2, name)
        return 1, cv2.IMREAD_COLOR


def is_url(path: str) -> bool:
    return "://" in path


def redact(path: str) -> str:
    """``rtsp://user:secret@cam/x`` → ``rtsp://user:***@cam/x``: camera passwords stay out of logs and errors."""
    if not is_url(path):
        return path
    parts = urlsplit(path)
    if parts.password is None:
        return path
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _read(cap: Any, where: str) -> tuple[bool, Any]:
    try:
        ok, image = cap.read()
    except Exception as exc:
        raise SourceError(f"{where}: read failed: {exc}") from exc
    return bool(ok), image


class VideoOptions(Options):
    type: Literal["video"] = "video"
    path: PathOrUrl = Field(min_length=1, description="video file, or rtsp:// / http(s):// URL")
    loop: bool = False
    realtime: bool = False
    fps: float | None = Field(default=None, gt=0, description="pacing rate; default: the file's own")
    open_timeout: float = Field(default=10.0, gt=0, description="seconds, URLs only")
    read_timeout: float = Field(default=5.0, gt=0, description="seconds, URLs only")
    reduced_decode: bool = Field(
        default=True,
        description="MJPG: decode frames only as large as the model needs (libjpeg DCT scaling); false: full size",
    )


@SOURCES.register
class VideoSource(ConfiguredSource):
    """A video file (optionally looped and paced to its frame rate) or a network stream.

    At the end of a file: ``SourceEnded``, or back to the first frame with ``loop``. A URL that
    stops delivering raises ``SourceError`` so the runner reconnects (live streams do not end).
    ``realtime`` applies to files only; a live stream is paced by its sender.
    """

    kind = "video"
    type = "video"
    Options = VideoOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts: VideoOptions = self._options  # type: ignore[assignment]
        self.url = is_url(self.opts.path)
        self._cap: Any = None
        self._pending: _Decoded | None = None
        self._pacer: Pacer | None = None
        self._index = 0
        self._jpeg: _JpegFrames | None = None  # MJPG read as packets and decoded here
        self._packets = self.opts.reduced_decode  # off once libjpeg could not read this video's frames

    def describe(self) -> str:
        return redact(self.opts.path)

    def open(self) -> None:
        self.close()
        where = self.describe()
        if not self.url:
            path = Path(self.opts.path)
            if not path.is_file():
                raise SourceError(f"video file {where} not found" if not path.exists() else f"{where} is not a file")
        cap = self._capture()
        ok, image = _read(cap, where)
        pending = self._decode(image) if ok else None
        if pending is None and self._jpeg is not None:  # libjpeg cannot read these frames: let FFmpeg decode them
            log.info("source.reduced_decode_off", source=self.type, path=where, reason="frames are not plain JPEG")
            cap.release()
            self._packets = False
            cap = self._capture()
            ok, image = _read(cap, where)
            pending = self._decode(image) if ok else None
        if pending is None:
            cap.release()
            raise SourceError(f"video {where}: opened, but no frame could be decoded")
        self._cap, self._pending = cap, pending
        image = pending.image
        cv2 = load_cv2()
        file_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        rate = self.opts.fps or (file_fps if 0 < file_fps <= 1000 else DEFAULT_FPS)
        self._pacer = Pacer(1.0 / rate) if self.opts.realtime and not self.url else None
        log.info(
            "source.opened",
            source=self.type,
            path=where,
            fps=file_fps,
            width=image.shape[1],
            height=image.shape[0],
            paced_fps=rate if self._pacer else None,
            loop=self.opts.loop,
            reduced_decode=self._jpeg is not None,
        )

    def _capture(self) -> Any:
        """Open the capture; an MJPG stream is read as undecoded packets unless ``_packets`` is off."""
        cv2 = load_cv2()
        where = self.describe()
        try:
            if self.url:
                params = [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                    int(self.opts.open_timeout * 1000),
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                    int(self.opts.read_timeout * 1000),
                ]
                cap = cv2.VideoCapture(self.opts.path, cv2.CAP_FFMPEG, params)
            else:
                cap = cv2.VideoCapture(self.opts.path)
        except Exception as exc:
            raise SourceError(f"cannot open video {where}: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            what = "unreachable, or not a video stream" if self.url else "not a video, or an unsupported codec"
            raise SourceError(f"cannot open video {where}: {what}")
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0).to_bytes(4, "little")
        # CAP_PROP_FORMAT = -1: FFmpeg hands over packets instead of decoded frames (False where unsupported).
        self._jpeg = _JpegFrames() if self._packets and fourcc == b"MJPG" and cap.set(cv2.CAP_PROP_FORMAT, -1) else None
        return cap

    def _decode(self, image: Any) -> _Decoded | None:
        if self._jpeg is None:
            return _Decoded(to_bgr(image, f"video {self.describe()}"))
        return self._jpeg.decode(image, self.shrink_to)

    def read(self, timeout: float) -> Frame | None:
        self._require_open(self._cap)
        if self._pending is None:
            self._pending = self._next_image()
        if self._pacer is not None and not self._pacer.wait(timeout):
            return None
        decoded, self._pending = self._pending, None
        frame = Frame(decoded.image, time.time(), self._index, self.describe(), decoded.full_size, decoded.encoded)
        self._index += 1
        if self._pacer is not None:
            self._pacer.advance()
        return frame

    def _next_image(self) -> _Decoded:
        where = self.describe()
        for _ in range(_MAX_UNDECODABLE):
            ok, image = _read(self._cap, where)
            if not ok:
                break
            decoded = self._decode(image)
            if decoded is not None:
                return decoded
            log.debug("source.frame_undecodable", source=self.type, path=where, frame=self._index)
        else:
            raise SourceError(f"video {where}: {_MAX_UNDECODABLE} frames in a row could not be decoded")
        if self.url:
            raise SourceError(f"video stream {where} stopped delivering frames")
        if not self.opts.loop:
            raise SourceEnded(f"video file {where} ended after {self._index} frames")
        # Rewind; some containers cannot seek, so fall back to reopening the file.
        cv2 = load_cv2()
        if self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            ok, image = _read(self._cap, where)
        if not ok:
            self._cap.release()
            self._cap = self._capture()
            ok, image = _read(self._cap, where)
        decoded = self._decode(image) if ok else None
        if decoded is None:
            raise SourceError(f"video file {where}: cannot restart from the beginning")
        log.debug("source.looped", source=self.type, path=where, frames=self._index)
        return decoded

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = self._pending = None
        if self._pacer is not None:
            self._pacer.reset()


class CameraOptions(Options):
    type: Literal["camera"] = "camera"
    device: int | str = Field(default=0, description="V4L2 index (0) or device path (/dev/video0)")
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0)
    fourcc: str | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description="pixel format, e.g. MJPG: USB cameras need it for HD at full rate",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be >= 0 or a device path (got {value})")
        return value


@SOURCES.register
class CameraSource(ConfiguredSource):
    """A V4L2 camera. width/height/fps are requests: the driver picks the nearest mode (logged).

    ``read`` blocks until the camera's next frame (at most one frame interval on a working camera);
    a camera that stops delivering (unplugged) raises ``SourceError``.
    """

    kind = "video"
    type = "camera"
    Options = CameraOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts: CameraOptions = self._options  # type: ignore[assignment]
        device = self.opts.device
        self.device: int | str = device
        self.node = f"/dev/video{device}" if isinstance(device, int) else device
        self._cap: Any = None
        self._pending: Any = None
        self._index = 0

    def describe(self) -> str:
        return self.node

    def open(self) -> None:
        self.close()
        if not Path(self.node).exists():
            raise SourceError(f"no capture device: camera {self.node} not found")
        cv2 = load_cv2()
        try:
            cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2)
        except Exception as exc:
            raise SourceError(f"cannot open camera {self.node}: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open camera {self.node}: busy, no permission (video group?), or not a capture device"
            )
        opts = self.opts
        if opts.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*opts.fourcc))
        if opts.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, opts.width)
        if opts.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, opts.height)
        if opts.fps:
            cap.set(cv2.CAP_PROP_FPS, opts.fps)
        ok, image = _read(cap, f"camera {self.node}")
        if not ok:
            cap.release()
            raise SourceError(f"camera {self.node}: opened, but delivered no frame")
        self._cap, self._pending = cap, image
        log.info(
            "source.opened",
            source=self.type,
            device=self.node,
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            fps=float(cap.get(cv2.CAP_PROP_FPS)),
            requested=opts.model_dump(exclude_none=True),
        )

    def read(self, timeout: float) -> Frame | None:
        self._require_open(self._cap)
        image, self._pending = self._pending, None
        if image is None:
            ok, image = _read(self._cap, f"camera {self.node}")
            if not ok:
                raise SourceError(f"camera {self.node} stopped delivering frames (unplugged?)")
        frame = Frame(to_bgr(image, f"camera {self.node}"), time.time(), self._index, self.node)
        self._index += 1
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = self._pending = None
