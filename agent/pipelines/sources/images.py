"""Still images from a directory, in sorted file-name order, optionally paced and looped.

Unreadable files are skipped with a log line (a half-copied JPEG must not stop a stream); a
whole pass without one readable image is an error, so a loop over garbage cannot spin.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field

from agent.pipelines.base import SOURCES, Frame, SourceEnded, SourceError
from agent.pipelines.sources._common import ConfiguredSource, Options, Pacer, load_cv2, to_bgr
from agent.validation import PathStr

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm")


class ImagesOptions(Options):
    type: Literal["images"] = "images"
    path: PathStr = Field(min_length=1, description="directory of images")
    fps: float | None = Field(default=None, gt=0, description="pacing; default: as fast as possible")
    loop: bool = False
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES


@SOURCES.register
class ImagesSource(ConfiguredSource):
    """Each image in ``path`` (non-recursive, sorted by name) becomes one frame.

    The directory is listed again at the start of every pass, so files added while looping are
    picked up. End of a pass without ``loop``: ``SourceEnded``.
    """

    kind = "video"
    type = "images"
    Options = ImagesOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts: ImagesOptions = self._options  # type: ignore[assignment]
        self.dir = Path(self.opts.path)
        self._files: list[Path] | None = None
        self._pos = 0
        self._delivered_in_pass = 0
        self._pending: Any = None
        self._pending_path = ""
        self._pacer = Pacer(1.0 / self.opts.fps) if self.opts.fps else None
        self._index = 0

    def describe(self) -> str:
        return str(self.dir)

    def _list(self) -> list[Path]:
        if not self.dir.is_dir():
            raise SourceError(
                f"image directory {self.dir} not found" if not self.dir.exists() else f"{self.dir} is not a directory"
            )
        suffixes = {s.lower() for s in self.opts.suffixes}
        files = sorted(p for p in self.dir.iterdir() if p.suffix.lower() in suffixes and p.is_file())
        if not files:
            raise SourceError(f"image directory {self.dir} has no images ({', '.join(sorted(suffixes))})")
        return files

    def open(self) -> None:
        self.close()
        load_cv2()
        self._files = self._list()
        self._pos = self._delivered_in_pass = 0
        log.info("source.opened", source=self.type, path=str(self.dir), images=len(self._files))

    def _next_image(self) -> tuple[Any, Path]:
        cv2 = load_cv2()
        while True:
            assert self._files is not None
            if self._pos >= len(self._files):
                if self._delivered_in_pass == 0:
                    raise SourceError(f"image directory {self.dir}: none of {len(self._files)} files is readable")
                if not self.opts.loop:
                    raise SourceEnded(f"image directory {self.dir}: all {len(self._files)} files delivered")
                self._files, self._pos, self._delivered_in_pass = self._list(), 0, 0
            path = self._files[self._pos]
            self._pos += 1
            try:
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # gray/BGRA/16-bit → 8-bit BGR
            except Exception as exc:  # noqa: BLE001 - cv2.error on exotic corrupt files
                log.warning("source.image_skipped", path=str(path), reason=str(exc))
                continue
            if image is None:
                log.warning("source.image_skipped", path=str(path), reason="unreadable or not an image")
                continue
            self._delivered_in_pass += 1
            return image, path

    def read(self, timeout: float) -> Frame | None:
        self._require_open(self._files)
        if self._pending is None:
            self._pending, path = self._next_image()
            self._pending_path = str(path)
        if self._pacer is not None and not self._pacer.wait(timeout):
            return None
        image, self._pending = self._pending, None
        frame = Frame(to_bgr(image, f"image {self._pending_path}"), time.time(), self._index, self._pending_path)
        self._index += 1
        if self._pacer is not None:
            self._pacer.advance()
        return frame

    def close(self) -> None:
        self._files = None
        self._pending = None
        if self._pacer is not None:
            self._pacer.reset()
