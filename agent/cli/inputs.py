"""Turn files given to ``edge-agent predict`` into input tensors for a model's metadata."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agent.api.datatypes import DATATYPES
from agent.errors import RequestError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _dtype(meta: dict[str, Any]) -> np.dtype[Any]:
    # Quantized inputs take float values: the agent quantizes them.
    if meta.get("parameters", {}).get("scale"):
        return np.dtype(np.float32)
    return DATATYPES.get(meta["datatype"], np.dtype(np.float32))


def load_image(path: Path, meta: dict[str, Any], normalize: str) -> np.ndarray:
    import cv2  # the pipelines' own image library (a device dependency); no second one for the CLI

    shape = meta["shape"]
    if len(shape) != 4:
        raise RequestError(f"input '{meta['name']}' has shape {shape}: an image needs a 4-D input")
    nchw = shape[1] in (1, 3) and shape[3] not in (1, 3)
    h, w, c = (shape[2], shape[3], shape[1]) if nchw else (shape[1], shape[2], shape[3])
    if h < 1 or w < 1:
        raise RequestError(f"input '{meta['name']}' has dynamic height/width {shape}; cannot size the image")
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR)
    if image is None:
        raise RequestError(f"{path}: not an image OpenCV can read")
    if c != 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    pixels = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    scaled = {"unit": pixels / 255.0, "signed": pixels / 127.5 - 1.0, "none": pixels}[normalize]
    if nchw:
        scaled = scaled.transpose(2, 0, 1)
    return scaled[None].astype(_dtype(meta))


def load_wav(path: Path, meta: dict[str, Any]) -> np.ndarray:
    """16-bit PCM, mixed down to mono, scaled to [-1, 1]; cut or zero-padded to a fixed length."""
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise RequestError(f"{path}: only 16-bit PCM WAV is supported")
            frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
            samples = frames.reshape(-1, wav.getnchannels()).mean(axis=1) / 32768.0
    except wave.Error as exc:
        raise RequestError(f"{path}: not a WAV file: {exc}") from None
    shape = meta["shape"]
    length = shape[-1] if shape and shape[-1] > 0 else len(samples)
    data = np.zeros(length, np.float32)
    data[: min(length, len(samples))] = samples[:length]
    return data.reshape([1] * (len(shape) - 1) + [length]).astype(_dtype(meta))


def load_input(path: Path, meta: dict[str, Any], normalize: str = "unit") -> np.ndarray:
    """Decode one file for the input described by ``meta`` (an OIP metadata tensor entry)."""
    if not path.is_file():
        raise RequestError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in IMAGE_SUFFIXES:
        return load_image(path, meta, normalize)
    if suffix == ".wav":
        return load_wav(path, meta)
    if suffix == ".json":
        try:
            return np.asarray(orjson.loads(path.read_bytes()), dtype=_dtype(meta))
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise RequestError(f"{path}: not a JSON array of numbers: {exc}") from None
    raise RequestError(f"{path}: unsupported file type {suffix or '(none)'} (use .npy, .json, .wav or an image)")
