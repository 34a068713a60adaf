"""Real test media made on the fly: videos (OpenCV writer), image directories, WAV files (espeak-ng, sox).

Synthetic content is chosen so a test can check it after lossy coding: a saturated red square
whose position encodes the frame number, and per-image solid colours.
"""

from __future__ import annotations

import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

SQUARE = 16  # side of the moving square, pixels
RED = (0, 0, 255)  # BGR


def square_x(i: int, n: int, width: int) -> int:
    """Left edge of the moving square in frame ``i`` of ``n`` (so a test can read the frame number back)."""
    return round(i * (width - SQUARE) / max(n - 1, 1))


def square_frames(n: int = 20, size: tuple[int, int] = (160, 120)) -> list[np.ndarray]:
    """Gray frames with a red square moving left to right, vertically centred."""
    w, h = size
    frames = []
    for i in range(n):
        img = np.full((h, w, 3), 64, np.uint8)
        x, y = square_x(i, n, w), (h - SQUARE) // 2
        img[y : y + SQUARE, x : x + SQUARE] = RED
        frames.append(img)
    return frames


def find_square(img: np.ndarray) -> float:
    """Centre x of the red square in a BGR frame (red high, blue low), or NaN if absent."""
    mask = (img[:, :, 2] > 180) & (img[:, :, 0] < 100)
    xs = np.nonzero(mask)[1]
    return float(xs.mean()) if xs.size else float("nan")


def photo_frames(
    photo: Path, n: int = 20, size: tuple[int, int] = (320, 240), scales: tuple[float, float] = (0.5, 0.9)
) -> tuple[list[np.ndarray], list[tuple[float, float, float]]]:
    """A photo moved and scaled across a gray canvas; returns frames and, per frame, (x, y, scale):
    the photo's top-left corner and the factor mapping photo coordinates into the frame,
    so a box known in the photo maps to ``(x + bx * s, y + by * s, ...)`` in the frame."""
    src = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    if src is None:
        raise FileNotFoundError(photo)
    w, h = size
    frames, placements = [], []
    for i in range(n):
        t = i / max(n - 1, 1)
        s = (scales[0] + (scales[1] - scales[0]) * t) * min(w / src.shape[1], h / src.shape[0])
        pw, ph = max(1, round(src.shape[1] * s)), max(1, round(src.shape[0] * s))
        x, y = round((w - pw) * t), round((h - ph) * (1 - t))
        canvas = np.full((h, w, 3), 128, np.uint8)
        canvas[y : y + ph, x : x + pw] = cv2.resize(src, (pw, ph), interpolation=cv2.INTER_AREA)
        frames.append(canvas)
        placements.append((float(x), float(y), pw / src.shape[1]))
    return frames, placements


def make_video(
    path: Path,
    frames: Sequence[np.ndarray] | None = None,
    fps: float = 10,
    codec: str = "MJPG",
    size: tuple[int, int] = (160, 120),
    n: int = 20,
) -> Path:
    """Write ``frames`` (default: ``square_frames(n, size)``) with OpenCV; ``codec`` MJPG (.avi) or mp4v (.mp4)."""
    frames = list(frames) if frames is not None else square_frames(n, size)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec} to {path}")
    try:
        for f in frames:
            writer.write(f)
    finally:
        writer.release()
    return path


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]  # BGR


def make_images(
    directory: Path, n: int = 4, size: tuple[int, int] = (64, 48), ext: str = ".png", corrupt: Sequence[str] = ()
) -> list[np.ndarray]:
    """Solid-colour images ``000<ext>``, ``001<ext>``...; each name in ``corrupt`` gets garbage bytes.
    Returns the images written, in file-name order."""
    directory.mkdir(parents=True, exist_ok=True)
    w, h = size
    images = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = COLORS[i % len(COLORS)]
        if not cv2.imwrite(str(directory / f"{i:03d}{ext}"), img):
            raise RuntimeError(f"cannot write {directory / f'{i:03d}{ext}'}")
        images.append(img)
    for name in corrupt:
        (directory / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image" * 10)
    return images


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, sampwidth: int = 2) -> Path:
    """Float samples in [-1, 1], shape (n,) or (n, channels), as integer PCM of ``sampwidth`` bytes."""
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if sampwidth == 1:
        raw = np.clip(np.round(data * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif sampwidth == 2:
        raw = np.clip(np.round(data * 32768), -32768, 32767).astype("<i2").tobytes()
    elif sampwidth == 3:
        ints = np.clip(np.round(data * 8388608), -8388608, 8388607).astype("<i4")
        raw = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    elif sampwidth == 4:
        raw = np.clip(np.round(data * 2147483648), -2147483648, 2147483647).astype("<i4").tobytes()
    else:
        raise ValueError(sampwidth)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(sampwidth)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def silence_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    return write_wav(path, np.zeros(round(seconds * rate)), rate)


def tone_wav(
    path: Path, seconds: float, freq: float = 440.0, rate: int = 16000, amplitude: float = 0.5, sampwidth: int = 2
) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    return write_wav(path, amplitude * np.sin(2 * np.pi * freq * t), rate, sampwidth)


def speech_wav(path: Path, text: str, rate: int = 16000, voice: str = "en") -> Path:
    """``text`` spoken by espeak-ng, resampled by sox to ``rate`` Hz mono 16-bit."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
        subprocess.run(
            ["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", "-e", "signed-integer", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def sox_convert(src: Path, dest: Path, *args: str) -> Path:
    """``sox src <args> dest``, e.g. ``("-e", "floating-point", "-b", "32")``."""
    subprocess.run(["sox", str(src), *args, str(dest)], check=True, capture_output=True)
    return dest
