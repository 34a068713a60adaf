"""How far a shadow version's answers are from the serving version's, by post-processing kind.

Pure functions of two sets of outputs (and the pre-processing's ``meta``), no I/O and no
threads: the shadow's mirror thread feeds one ``Comparator`` per shadow, in the order the
samples were taken. The kind comes from the bundle's ``postprocess`` type:

- ``classification``: top-1 agreement and mean |Δp| of the scores the post-processor reports;
- ``detection``: F1 of boxes matched at IoU >= 0.5 (same label), and the mean IoU of the matches;
- ``vad`` / ``wake_word``: events (speech start/end, wake word) from each version's own
  post-processor agree when the same event is within 100 ms; with no events yet, the per-window
  decision (probability over the threshold) agreement;
- anything else (``raw``): per output, max |Δ| and cosine similarity.

``agreement`` is the one figure a policy judges (docs/shadow.md): top-1 agreement, mean F1,
event F1 (else decision agreement), or mean cosine similarity.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.runtimes.base import TensorSpec

#: Two events (same type) are the same event when their times differ by at most this (s).
EVENT_TOLERANCE_S = 0.1
MATCH_IOU = 0.5


class Comparator(abc.ABC):
    """Accumulates the comparison of paired answers; ``add`` is called from one thread."""

    kind: str = "raw"

    def __init__(self) -> None:
        self.samples = 0

    def add(self, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
            meta: Mapping[str, Any] | None = None) -> None:
        """Raises KeyError/ValueError if an output is missing or the shapes cannot be compared."""
        self._add(serving, shadow, meta or {})
        self.samples += 1

    @abc.abstractmethod
    def _add(self, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
             meta: Mapping[str, Any]) -> None: ...

    @property
    @abc.abstractmethod
    def agreement(self) -> float | None:
        """The figure a policy judges, in [0, 1] (cosine may be negative); None before any sample."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, float | None]:
        """Every figure of this kind, by name (for status and ``/metrics``)."""


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class ClassificationComparator(Comparator):
    kind = "classification"

    def __init__(self, output: str, softmax: bool = False) -> None:
        super().__init__()
        self.output, self.softmax = output, softmax
        self.rows = self.same_top1 = 0
        self.abs_diff_sum = 0.0
        self.values = 0

    def _scores(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(outputs[self.output], np.float64)
        x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
        if self.softmax:
            e = np.exp(x - x.max(axis=1, keepdims=True))
            x = e / e.sum(axis=1, keepdims=True)
        return x

    def _add(self, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
             meta: Mapping[str, Any]) -> None:
        a, b = self._scores(serving), self._scores(shadow)
        if a.shape != b.shape:
            raise ValueError(f"output {self.output!r}: shape {list(a.shape)} against {list(b.shape)}")
        self.rows += len(a)
        self.same_top1 += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
        self.abs_diff_sum += float(np.abs(a - b).sum())
        self.values += a.size

    @property
    def agreement(self) -> float | None:
        return _ratio(self.same_top1, self.rows)

    def metrics(self) -> dict[str, float | None]:
        return {"top1_agreement": _round(self.agreement), "mean_abs_dp": _round(_ratio(self.abs_diff_sum, self.values))}


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of x1,y1,x2,y2 boxes ``a`` (N) against ``b`` (M)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9))


def match_boxes(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                threshold: float = MATCH_IOU) -> list[float]:
    """Greedy one-to-one matching of detections (``box``, ``label``) by IoU, best pairs first:
    the IoU of each match at or over ``threshold``."""
    if not a or not b:
        return []
    iou = _box_iou(np.array([d["box"] for d in a], np.float64), np.array([d["box"] for d in b], np.float64))
    same = np.array([[da.get("label") == db.get("label") for db in b] for da in a])
    iou = np.where(same, iou, 0.0)
    matched: list[float] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), len(b))
        if iou[i, j] < threshold:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        matched.append(float(iou[i, j]))
    return matched


class DetectionComparator(Comparator):
    """Runs each version's answers through the bundle's own detection post-processing."""

    kind = "detection"

    def __init__(self, serving_post: Any, shadow_post: Any) -> None:
        super().__init__()
        self.serving_post, self.shadow_post = serving_post, shadow_post
        self.f1_sum = 0.0
        self.iou_sum = 0.0
        self.matches = 0

    def _add(self, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
             meta: Mapping[str, Any]) -> None:
        a = (self.serving_post(serving, meta) or {}).get("detections", [])
        b = (self.shadow_post(shadow, meta) or {}).get("detections", [])
        ious = match_boxes(a, b)
        self.f1_sum += 1.0 if not a and not b else 2 * len(ious) / (len(a) + len(b))
        self.iou_sum += sum(ious)
        self.matches += len(ious)

    @property
    def agreement(self) -> float | None:
        return _ratio(self.f1_sum, self.samples)

    def metrics(self) -> dict[str, float | None]:
        return {"f1_iou50": _round(self.agreement), "mean_iou": _round(_ratio(self.iou_sum, self.matches))}


def _event_time(event: Mapping[str, Any]) -> float:
    return float(event.get("t", event.get("end", event.get("start", 0.0))))


def match_events(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                 tolerance: float = EVENT_TOLERANCE_S) -> int:
    """Events of the same type whose times (``t``, or a segment's ``start`` and ``end``) are within
    ``tolerance``, matched one to one in time order."""
    used: set[int] = set()
    matched = 0
    for ea in a:
        for j, eb in enumerate(b):
            if j in used or ea.get("event") != eb.get("event"):
                continue
            keys = [k for k in ("t", "start", "end") if k in ea and k in eb]
            if keys and all(abs(float(ea[k]) - float(eb[k])) <= tolerance for k in keys):
                used.add(j)
                matched += 1
                break
    return matched


class EventComparator(Comparator):
    """Voice activity or wake word: each version's own stateful post-processor sees the same sampled
    windows; their events are matched within 100 ms."""

    kind = "events"

    def __init__(self, output: str, threshold: float, serving_post: Any, shadow_post: Any) -> None:
        super().__init__()
        self.output, self.threshold = output, threshold
        self.serving_post, self.shadow_post = serving_post, shadow_post
        self.serving_events: list[dict[str, Any]] = []
        self.shadow_events: list[dict[str, Any]] = []
        self.same_decision = 0
        self.windows = 0
        self.abs_diff_sum = 0.0

    def _add(self, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
             meta: Mapping[str, Any]) -> None:
        p = np.asarray(serving[self.output], np.float64).reshape(-1)
        q = np.asarray(shadow[self.output], np.float64).reshape(-1)
        if p.shape != q.shape:
            raise ValueError(f"output {self.output!r}: {p.size} values against {q.size}")
        self.windows += p.size
        self.same_decision += int(((p >= self.threshold) == (q >= self.threshold)).sum())
        self.abs_diff_sum += float(np.abs(p - q).sum())
        if "end" in meta or "ts" in meta:  # events need the stream's times; a bare predict has none
            for post, events, outputs in ((self.serving_post, self.serving_events, serving),
                                          (self.shadow_post, self.shadow_events, shadow)):
                event = post(outputs, meta) if post is not None else None
                if event is not None and "event" in event:
                    events.append({k: event[k] for k in ("event", "t", "start", "end") if k in event})
                    del events[:-1000]  # a long-running shadow keeps the recent events only

    @property
    def event_f1(self) -> float | None:
        a, b = self.serving_events, self.shadow_events
        if not a and not b:
            return None
        return 2 * match_events(a, b) / (len(a) + len(b))

    @property
    def agreement(self) -> float | None:
        f1 = self.event_f1
        return f1 if f1 is not None else _ratio(self.same_decision, self.windows)

    def metrics(self) -> dict[str, float | None]:
        return {"event_f1": _round(self.event_f1), "events_serving": float(len(self.serving_events)),
                "events_shadow": float(len(self.shadow_events)),
                "decision_agreement": _round(_ratio(self.same_decision, self.windows)),
                "mean_abs_dp": _round(_ratio(self.abs_diff_sum, self.windows))}


class RawComparator(Comparator):
    """Every output both versions have: the largest |Δ| seen and the mean cosine similarity."""

    kind = "raw"

    def __init__(self) -> None:
        super().__init__()
        self.max_abs = 0.0
        self.cosine_sum = 0.0
        self.pairs = 0

    def _add(self, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
             meta: Mapping[str, Any]) -> None:
        names = [n for n in serving if n in shadow]
        if not names:
            raise KeyError(f"no output in common (serving {', '.join(serving)}; shadow {', '.join(shadow)})")
        for name in names:
            a = np.asarray(serving[name], np.float64).reshape(-1)
            b = np.asarray(shadow[name], np.float64).reshape(-1)
            if a.shape != b.shape:
                raise ValueError(f"output {name!r}: {a.size} values against {b.size}")
            if a.size:
                self.max_abs = max(self.max_abs, float(np.abs(a - b).max()))
            self.cosine_sum += cosine(a, b)
            self.pairs += 1

    @property
    def agreement(self) -> float | None:
        return _ratio(self.cosine_sum, self.pairs)

    def metrics(self) -> dict[str, float | None]:
        return {"max_abs_diff": _round(self.max_abs) if self.pairs else None, "cosine": _round(self.agreement)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; two all-zero vectors are identical (1.0), one all-zero is unrelated (0.0)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    value = float(np.dot(a, b) / (na * nb))
    return max(-1.0, min(1.0, value)) if math.isfinite(value) else 0.0


def make_comparator(post: Mapping[str, Any] | None, serving_outputs: Sequence[TensorSpec],
                    shadow_outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> Comparator:
    """The comparator for the bundle's ``postprocess`` spec (None or unknown: raw tensors).

    Raises:
        PipelineError: the spec does not fit the models' outputs.
    """
    kind = (post or {}).get("type")
    if kind not in ("classification", "detection", "vad", "wake_word"):
        return RawComparator()
    from agent.pipelines.postprocess import make_postprocessor

    assert post is not None
    serving = make_postprocessor(post, serving_outputs, labels)
    shadow = make_postprocessor(post, shadow_outputs, labels)
    if kind == "classification":
        return ClassificationComparator(serving.spec.name, bool(getattr(serving, "softmax", False)))  # type: ignore[attr-defined]
    if kind == "detection":
        return DetectionComparator(serving, shadow)
    threshold = float(getattr(serving, "threshold", 0.5))
    return EventComparator(serving.spec.name, threshold, serving, shadow)  # type: ignore[attr-defined]
