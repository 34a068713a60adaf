"""Predict on a camera frame: the agent applies the image pre-processing the model's bundle
manifest declares (the one its streams use), so a local camera client sends the frame as
captured instead of re-implementing resize, letterbox, colour order, normalisation and
quantization.

A v2 infer request asks for it with ``"parameters": {"preprocess": true}`` and one input: the
frame, ``UINT8`` ``[H, W, 3]`` in OpenCV's BGR order (``"frame_color": "rgb"`` for RGB),
``[H, W, 4]`` BGRA or ``[H, W]`` grey, optionally with a leading batch of 1. The frame can
come from a shared-memory region, so nothing is copied through the socket. The pre-processing
runs on the model's thread, just before the call; the answer's ``parameters.preprocess`` holds
the resize's ``scale`` and ``pad`` (model pixels) and both sizes, to map boxes back to the frame.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from agent.api.shm import Region
from agent.errors import NoPreprocessingError, PipelineError, RequestError
from agent.models.served import ServedModel
from agent.models.worker import Feeds, Prepare
from agent.pipelines.base import Frame, Preprocessor

FRAME_COLORS = ("bgr", "rgb")
#: Largest frame side accepted (8K is 7680): bounds the resize's work and intermediates.
MAX_SIDE = 16384
_MANIFEST_MAX_BYTES = 1 << 20
_CACHE_KEY = "api.frame_preprocessors"
#: Largest frame buffer a model thread keeps between requests (a 4K RGB frame is ~25 MB).
_KEEP_BYTES = 32 << 20


async def frame_preprocessor(model: ServedModel, color: str) -> Preprocessor:
    """The version's image pre-processor for frames in ``color`` order, built once (in a thread:
    it reads the manifest) and kept with the version.

    Raises:
        NoPreprocessingError: the manifest declares no image pre-processing, or cannot be read.
    """
    built: dict[str, Preprocessor] | str | None = model.cache.get(_CACHE_KEY)
    if built is None:
        built = await asyncio.to_thread(_build, model)
        model.cache[_CACHE_KEY] = built
    if isinstance(built, str):  # why not (kept: a version's manifest does not change while it is loaded)
        raise NoPreprocessingError(built)
    preprocessor: Preprocessor = built[color]
    return preprocessor


def _build(model: ServedModel) -> dict[str, Preprocessor] | str:
    """Both colour orders' pre-processors, or why the version has none."""
    from agent.pipelines.preprocess import make_preprocessor

    where = f"model {model.name}@{model.version}"
    path = model.source.directory / "manifest.json"
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MANIFEST_MAX_BYTES + 1)
        manifest = orjson.loads(raw) if len(raw) <= _MANIFEST_MAX_BYTES else None
    except FileNotFoundError:
        return (f"{where} was not installed from a bundle: no manifest declares its "
                                    "pre-processing (send the model's own input instead)")
    except (OSError, orjson.JSONDecodeError) as exc:
        return (f"{where}: its manifest cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
    spec = manifest.get("preprocess") if isinstance(manifest, dict) else None
    if not isinstance(spec, dict) or spec.get("type") != "image":
        kind = f"'{str(spec.get('type'))[:40]}'" if isinstance(spec, dict) else "no"
        return (f"{where}: its manifest declares {kind} pre-processing; predict applies only "
                                    "image pre-processing (send the model's own input instead)")
    try:
        # Frames arrive BGR (as OpenCV captures them) or RGB: the RGB case is the manifest's
        # conversion with the colour order swapped, so no request pays an extra pass over the frame.
        swapped = {**spec, "color": "bgr" if spec.get("color", "rgb") == "rgb" else "rgb"}
        return {"bgr": make_preprocessor(spec, model.inputs, model.outputs),
                "rgb": make_preprocessor(swapped, model.inputs, model.outputs)}
    except PipelineError as exc:
        return (f"{where}: its manifest's pre-processing does not fit the model: {exc}")


def frame_prepare(preprocessor: Preprocessor, feeds: Mapping[str, np.ndarray],
                  in_region: Mapping[str, tuple[Region, int]] | None = None) -> tuple[Prepare, dict[str, Any]]:
    """Check the request's one input is a frame; returns what turns it into the model's feeds (run
    on the model's thread) and the dict that then holds where the frame went (``scale``, ``pad``).

    A frame still in its shared-memory region (``in_region``: input name -> region, offset) is read
    there, into the thread's own buffer: a camera client sends the same size again and again, and a
    fresh ~1 MB array per request costs its page faults (~150 µs for 640x480x3 here), not its copy.

    Raises:
        RequestError: not exactly one input, or not a uint8 frame of a usable shape.
    """
    if len(feeds) != 1:
        raise RequestError(f"parameters.preprocess: send one input, the frame (got {len(feeds)})")
    (name, frame), = feeds.items()
    image = frame[0] if frame.ndim == 4 and frame.shape[0] == 1 else frame
    if frame.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise RequestError(f"parameters.preprocess: input '{name}' must be a UINT8 frame [H, W, 3] (or [H, W], "
                           f"[H, W, 4], with an optional leading 1), got {list(frame.shape)} "
                           f"{frame.dtype.name}")
    if not (1 <= image.shape[0] <= MAX_SIDE and 1 <= image.shape[1] <= MAX_SIDE):
        raise RequestError(f"parameters.preprocess: frame {image.shape[1]}x{image.shape[0]} is outside "
                           f"1..{MAX_SIDE} pixels a side")
    where: dict[str, Any] = {}
    source = (in_region or {}).get(name)

    def prepare(_feeds: Feeds) -> Feeds:
        pixels = image
        if source is not None:
            region, offset = source
            pixels = _buffer(image.shape)
            region.read_into(offset, pixels)
        prepared = next(iter(preprocessor(Frame(pixels, time.time(), 0, "predict"))))
        meta = prepared.meta
        where.update(scale=list(meta["scale"]), pad=list(meta["pad"]), input_size=list(meta["input_size"]),
                     source_size=list(meta["source_size"]))
        return prepared.feeds

    return prepare, where


_local = threading.local()


def _buffer(shape: tuple[int, ...]) -> np.ndarray:
    """This thread's frame buffer of ``shape`` (kept up to ``_KEEP_BYTES``; larger ones are not kept)."""
    kept: np.ndarray | None = getattr(_local, "frame", None)
    if kept is not None and kept.shape == shape:
        return kept
    array = np.empty(shape, np.uint8)
    if array.nbytes <= _KEEP_BYTES:
        _local.frame = array
    return array
