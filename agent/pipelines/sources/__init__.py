"""Frame and audio sources, registered in ``SOURCES`` by ``type``; ``create_source`` builds one from config.

Sources only capture: they deliver BGR uint8 frames or mono float32 audio at the input's own
size and rate. Resizing, resampling and windowing belong to the pre-processors; reconnecting
with backoff belongs to the runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.pipelines.base import SOURCES, PipelineError, Source
from agent.pipelines.sources import alsa, images, pcm, video, wav
from agent.pipelines.sources._common import Options, SourceOptionError, to_bgr
from agent.pipelines.sources.alsa import AlsaSource
from agent.pipelines.sources.images import ImagesSource
from agent.pipelines.sources.pcm import PcmSource
from agent.pipelines.sources.video import CameraSource, VideoSource
from agent.pipelines.sources.wav import WavSource, read_wav_header

__all__ = [
    "AlsaSource",
    "CameraSource",
    "ImagesSource",
    "Options",
    "PcmSource",
    "SourceOptionError",
    "VideoSource",
    "WavSource",
    "alsa",
    "create_source",
    "images",
    "pcm",
    "read_wav_header",
    "to_bgr",
    "video",
    "wav",
]


def create_source(spec: Mapping[str, Any] | Options) -> Source:
    """A closed source from ``{"type": ..., **options}`` or validated options (open it on the thread that reads it).

    Raises:
        PipelineError: no or unknown ``type`` (lists the known ones).
        SourceOptionError: an option is unknown, missing or invalid (names the option).
    """
    if isinstance(spec, Options):
        spec = dict(spec)
    if not isinstance(spec, Mapping):
        raise PipelineError(f"source spec must be a table of options, not {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise PipelineError(f"source spec needs a 'type' (one of: {', '.join(sorted(SOURCES))})")
    cls = SOURCES.get_class(kind)
    return cls(**{k: v for k, v in spec.items() if k != "type"})
