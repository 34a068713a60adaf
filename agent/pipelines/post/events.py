"""Stateful audio event detectors: voice activity segments (Silero VAD) and wake words (microWakeWord).

Both report only transitions (``None`` otherwise), using the audio pre-processing's ``meta``
times (``start``/``end`` in seconds since the stream started). One instance per stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from agent.pipelines.base import POSTPROCESSORS, Postprocessor
from agent.pipelines.options import Bool, Int, Number, ProcessorOptions, Str, only_tensor, option_error
from agent.pipelines.post.simple import output
from agent.runtimes.base import TensorSpec


def _probability(outputs: Mapping[str, np.ndarray], name: str) -> float:
    return float(output(outputs, name).reshape(-1)[0])


def _times(meta: Mapping[str, Any]) -> tuple[float, float]:
    end = float(meta.get("end", meta.get("ts", 0.0)))
    return float(meta.get("start", end)), end


def _output(name: str | None, outputs: Sequence[TensorSpec], default: str) -> TensorSpec:
    """Option ``output`` (``name``), else ``default`` if the model has it, else its only output."""
    if name is None and any(t.name == default for t in outputs):
        name = default
    spec = only_tensor("postprocess", "output", name, outputs, "output")
    if all(d is not None for d in spec.shape) and int(np.prod(spec.shape_list())) != 1:
        raise option_error(
            "postprocess", "output", f"{spec.name!r} has shape {spec.shape_list()}, expected one probability"
        )
    return spec


class VadOptions(ProcessorOptions):
    type: Literal["vad"]
    output: Str | None = None  # default: "output" if the model has it, else its only output
    threshold: Number = Field(default=0.5, ge=0, le=1)
    neg_threshold: Number | None = Field(default=None, ge=0, le=1)  # default: threshold - 0.15 (>= 0.01)
    min_speech_ms: Number = Field(default=250.0, ge=0)
    min_silence_ms: Number = Field(default=100.0, ge=0)
    speech_pad_ms: Number = Field(default=30.0, ge=0)
    report_probability: Bool = False


@POSTPROCESSORS.register
class VoiceActivity(Postprocessor):
    """Speech segments from per-window speech probabilities, with hysteresis (Silero's VADIterator rules).

    Speech starts when the probability reaches ``threshold`` and stays out of silence
    (``< neg_threshold``) for ``min_speech_ms``; it ends after ``min_silence_ms`` below
    ``neg_threshold``. Both edges are widened by ``speech_pad_ms``.
    """

    type = "vad"
    Options = VadOptions

    def __init__(self, options: VadOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        self.threshold = options.threshold
        neg = options.neg_threshold
        if neg is not None and neg > self.threshold:
            raise option_error("postprocess", "neg_threshold", f"must be <= threshold {self.threshold}, got {neg}")
        self.spec = _output(options.output, outputs, "output")
        self.neg_threshold = max(self.threshold - 0.15, 0.01) if neg is None else neg
        self.min_speech = options.min_speech_ms / 1000
        self.min_silence = options.min_silence_ms / 1000
        self.pad = options.speech_pad_ms / 1000
        self.report = options.report_probability
        self.candidate: float | None = None  # start of speech not yet long enough
        self.speaking: float | None = None  # start (padded) of the current segment
        self.last_end = 0.0
        self.silence_since: float | None = None

    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        p = _probability(outputs, self.spec.name)
        start, end = _times(meta)
        self.last_end = end
        event = self._step(p, start, end)
        if self.report:
            return {"probability": round(p, 4), "t": round(end, 3), **(event or {})}
        return event

    def flush(self) -> dict[str, Any] | None:
        """The stream ended while speech was still going on: the segment ends with the audio."""
        if self.speaking is None:
            return None
        end = self.silence_since + self.pad if self.silence_since is not None else self.last_end
        segment = {"event": "speech_end", "start": round(self.speaking, 3), "end": round(min(end, self.last_end), 3)}
        self.speaking = self.silence_since = None
        return segment

    def _step(self, p: float, start: float, end: float) -> dict[str, Any] | None:
        if self.speaking is None:
            if p >= self.threshold and self.candidate is None:
                self.candidate = start
            elif p < self.neg_threshold:
                self.candidate = None
            if self.candidate is not None and end - self.candidate >= self.min_speech:
                self.speaking, self.candidate, self.silence_since = max(0.0, self.candidate - self.pad), None, None
                return {"event": "speech_start", "t": round(self.speaking, 3)}
            return None
        if p >= self.threshold:
            self.silence_since = None
        elif p < self.neg_threshold:
            if self.silence_since is None:
                self.silence_since = start
            if end - self.silence_since >= self.min_silence:
                segment = {
                    "event": "speech_end",
                    "start": round(self.speaking, 3),
                    "end": round(self.silence_since + self.pad, 3),
                }
                self.speaking = self.silence_since = None
                return segment
        return None


class WakeWordOptions(ProcessorOptions):
    type: Literal["wake_word"]
    output: Str | None = None  # default: the model's only output
    threshold: Number = Field(default=0.85, ge=0, le=1)
    refractory_s: Number = Field(default=2.0, ge=0)
    label: Str | None = None  # default: the bundle's first label, else "wake_word"
    window: Int = Field(default=5, ge=1)


@POSTPROCESSORS.register
class WakeWord(Postprocessor):
    """One ``wake_word`` event when the mean of the last ``window`` probabilities exceeds ``threshold``.

    Mirrors microWakeWord's ``sliding_window_size`` / ``probability_cutoff``; after an event
    the window restarts and nothing is reported for ``refractory_s`` seconds.
    """

    type = "wake_word"
    Options = WakeWordOptions

    def __init__(
        self, options: WakeWordOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None
    ) -> None:
        self.spec = _output(options.output, outputs, "")
        self.threshold = options.threshold
        self.refractory = options.refractory_s
        self.label = options.label or (labels[0] if labels else "wake_word")
        self.window: deque[float] = deque(maxlen=options.window)
        self.quiet_until = float("-inf")

    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        p = _probability(outputs, self.spec.name)
        _, t = _times(meta)
        if t < self.quiet_until:
            return None
        self.window.append(p)
        if len(self.window) < (self.window.maxlen or 1):
            return None
        score = sum(self.window) / len(self.window)
        if score <= self.threshold:
            return None
        self.window.clear()
        self.quiet_until = t + self.refractory
        return {"event": "wake_word", "label": self.label, "score": round(score, 4), "t": round(t, 3)}
