"""Object detection: SSD-style (MediaPipe anchors) and YOLO-style decoding, NMS, source coordinates.

Decoders give boxes as x1, y1, x2, y2 in model-input pixels; ``to_source`` undoes the
pre-processing's letterbox/stretch using its ``meta`` (``scale``, ``pad``, ``source_size``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field

from agent.pipelines.anchors import ssd_anchors
from agent.pipelines.base import POSTPROCESSORS, PipelineError, Postprocessor
from agent.pipelines.options import (
    Bool,
    Int,
    Number,
    Numbers,
    ProcessorOptions,
    Section,
    Str,
    find_tensor,
    only_tensor,
    option_error,
)
from agent.pipelines.post.simple import output
from agent.runtimes.base import TensorSpec

_error = partial(option_error, "postprocess")
T = TypeVar("T")


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one x1,y1,x2,y2 box with each of ``boxes``."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_detections: int, classes: np.ndarray | None = None
) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first; per class when ``classes`` is given."""
    if classes is not None and len(boxes):
        # Shift each class into its own region so boxes of different classes never overlap.
        span = float(boxes.max() - boxes.min()) + 1.0
        boxes = boxes + (classes.astype(np.float64) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order) and len(keep) < max_detections:
        best, order = order[0], order[1:]
        keep.append(int(best))
        order = order[iou(boxes[best], boxes[order]) <= iou_threshold]
    return np.asarray(keep, np.int64)


def to_source(boxes: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Boxes in model-input pixels → source-image pixels (undo letterbox padding and scaling), clipped."""
    sx, sy = meta.get("scale", (1.0, 1.0))
    px, py = meta.get("pad", (0.0, 0.0))
    out = (boxes - np.array([px, py, px, py])) / np.array([sx, sy, sx, sy])
    if "source_size" in meta:
        w, h = meta["source_size"]
        out = np.clip(out, 0, [w, h, w, h])
    return out


def _or(value: T | None, default: T) -> T:
    """``value`` unless it is None (an option left to its default, which depends on the model)."""
    return default if value is None else value


Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]
"""Boxes (x1,y1,x2,y2 model pixels), scores, class indices, keypoints (N,K,2 model pixels) or None."""


class SSDOptions(Section):
    """``format = "mediapipe_ssd"``: outputs and anchor generation (MediaPipe's SsdAnchorsCalculator)."""

    boxes: Str | None = None  # default: "regressors" if the model has it
    scores: Str | None = None  # default: "classificators" if the model has it
    input_size: Int = Field(default=128, ge=1)
    input_width: Int | None = Field(default=None, ge=1)  # default: input_size
    input_height: Int | None = Field(default=None, ge=1)
    strides: tuple[Int, ...] = Field(default=(8, 16, 16, 16), min_length=1)
    num_layers: Int | None = Field(default=None, ge=1)  # default: len(strides)
    min_scale: Number = 0.1484375
    max_scale: Number = 0.75
    anchor_offset: Number = 0.5
    aspect_ratios: Numbers = (1.0,)
    interpolated_scale_aspect_ratio: Number = 1.0
    reduce_boxes_in_lowest_layer: Bool = False
    fixed_anchor_size: Bool = True
    x_scale: Number | None = None  # default: the input width
    y_scale: Number | None = None  # default: the input height
    w_scale: Number | None = None
    h_scale: Number | None = None
    score_clipping: Number = Field(default=100.0, ge=0)
    keypoints: Bool = False
    label: Str = "face"  # when the bundle has no labels


class YoloOptions(Section):
    """``format = "yolo"``: one output, v5 or v8 layout."""

    output: Str | None = None  # default: the model's only output
    layout: Literal["auto", "v5", "v8"] = "auto"
    normalized: Bool = False  # boxes in 0..1 rather than input pixels


class DetectionOptions(ProcessorOptions, SSDOptions, YoloOptions):
    type: Literal["detection"]
    format: Literal["mediapipe_ssd", "yolo"]
    score_threshold: Number | None = Field(default=None, ge=0, le=1)  # default: the format's
    iou_threshold: Number | None = Field(default=None, ge=0, le=1)
    max_detections: Int = Field(default=100, ge=1)
    class_agnostic: Bool = False


_FORMAT_KEYS = {"mediapipe_ssd": frozenset(SSDOptions.model_fields), "yolo": frozenset(YoloOptions.model_fields)}


@POSTPROCESSORS.register
class Detection(Postprocessor):
    """``{"detections": [{"box", "score", "label"}]}`` in source-image pixels, after threshold and NMS.

    ``format`` picks the decoder: ``mediapipe_ssd`` or ``yolo``.
    """

    type = "detection"
    Options = DetectionOptions

    def __init__(
        self, options: DetectionOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None
    ) -> None:
        fmt = options.format
        other = "yolo" if fmt == "mediapipe_ssd" else "mediapipe_ssd"
        foreign = sorted(options.model_fields_set & (_FORMAT_KEYS[other] - _FORMAT_KEYS[fmt]))
        if foreign:
            raise _error(foreign[0], f"applies to format {other} only (this is {fmt})")
        self.decoder: SSDDecoder | YoloDecoder = (SSDDecoder if fmt == "mediapipe_ssd" else YoloDecoder)(
            options, outputs, labels
        )
        self.labels = self.decoder.labels
        self.score_threshold = _or(options.score_threshold, self.decoder.score_threshold)
        self.iou_threshold = _or(options.iou_threshold, self.decoder.iou_threshold)
        self.max_detections = options.max_detections
        self.per_class = not options.class_agnostic

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels and index < len(self.labels) else str(index)

    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        boxes, scores, classes, points = self.decoder.decode(outputs, meta)
        mask = scores >= self.score_threshold
        boxes, scores, classes = boxes[mask], scores[mask], classes[mask]
        points = None if points is None else points[mask]
        keep = nms(boxes, scores, self.iou_threshold, self.max_detections, classes if self.per_class else None)
        mapped = to_source(boxes[keep], meta)
        result = []
        for j, i in enumerate(keep):
            det: dict[str, Any] = {
                "box": [round(float(v), 1) for v in mapped[j]],
                "score": round(float(scores[i]), 4),
                "label": self._label(int(classes[i])),
            }
            if points is not None:
                pts = to_source(np.concatenate([points[i], points[i]], axis=1), meta)[:, :2]
                det["keypoints"] = [[round(float(x), 1), round(float(y), 1)] for x, y in pts]
            result.append(det)
        return {"detections": result}


class SSDDecoder:
    """MediaPipe SSD (e.g. face detection short range): anchors from options, box decoding, sigmoid scores.

    Uses plain NMS; MediaPipe blends overlapping faces ("weighted NMS"), which moves boxes a little.
    """

    score_threshold, iou_threshold = 0.5, 0.3

    def __init__(self, opts: SSDOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        names = {t.name for t in outputs}
        default_boxes = "regressors" if "regressors" in names else None
        default_scores = "classificators" if "classificators" in names else None
        self.boxes = find_tensor("postprocess", "boxes", _or(opts.boxes, default_boxes), outputs, "output")
        self.scores = find_tensor("postprocess", "scores", _or(opts.scores, default_scores), outputs, "output")
        self.width = _or(opts.input_width, opts.input_size)
        self.height = _or(opts.input_height, opts.input_size)
        strides = list(opts.strides)
        layers = _or(opts.num_layers, len(strides))
        if layers != len(strides):
            raise _error("num_layers", f"{layers} layers but {len(strides)} strides {strides}")
        self.anchors = ssd_anchors(
            input_width=self.width,
            input_height=self.height,
            strides=strides,
            min_scale=opts.min_scale,
            max_scale=opts.max_scale,
            anchor_offset=opts.anchor_offset,
            aspect_ratios=list(opts.aspect_ratios),
            interpolated_scale_aspect_ratio=opts.interpolated_scale_aspect_ratio,
            reduce_boxes_in_lowest_layer=opts.reduce_boxes_in_lowest_layer,
            fixed_anchor_size=opts.fixed_anchor_size,
        )
        self.xyxy_scale = np.array(
            [
                _or(opts.x_scale, float(self.width)),
                _or(opts.y_scale, float(self.height)),
                _or(opts.w_scale, float(self.width)),
                _or(opts.h_scale, float(self.height)),
            ],
            np.float32,
        )
        self.clip = opts.score_clipping
        self.keypoints = opts.keypoints
        self.labels = labels or [opts.label]
        count = len(self.anchors)
        bshape, sshape = self.boxes.shape, self.scores.shape
        if len(bshape) != 3 or (bshape[2] is not None and (bshape[2] < 4 or bshape[2] % 2)):
            raise _error(
                "boxes",
                f"{self.boxes.name!r} has shape {self.boxes.shape_list()}, expected [1, anchors, 4 + 2 x keypoints]",
            )
        if len(sshape) != 3:
            raise _error(
                "scores", f"{self.scores.name!r} has shape {self.scores.shape_list()}, expected [1, anchors, classes]"
            )
        for key, spec in (("boxes", self.boxes), ("scores", self.scores)):
            if spec.shape[1] is not None and spec.shape[1] != count:
                raise _error(
                    "strides",
                    f"num_layers {layers} with strides {strides} on a {self.width}x"
                    f"{self.height} input give {count} anchors, but output {spec.name!r} "
                    f"({key}) has {spec.shape[1]}",
                )

    def decode(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Decoded:
        raw = output(outputs, self.boxes.name).reshape(-1, self.boxes.shape[-1] or 4).astype(np.float32)
        logits = output(outputs, self.scores.name).astype(np.float64)  # exp(100) overflows float32
        logits = logits.reshape(len(raw), -1)
        if len(raw) != len(self.anchors):
            raise PipelineError(f"output {self.boxes.name!r} has {len(raw)} boxes for {len(self.anchors)} anchors")
        classes = logits.argmax(axis=1)
        scores = 1 / (1 + np.exp(-np.clip(logits.max(axis=1), -self.clip, self.clip)))
        a = self.anchors
        cx = raw[:, 0] / self.xyxy_scale[0] * a[:, 2] + a[:, 0]
        cy = raw[:, 1] / self.xyxy_scale[1] * a[:, 3] + a[:, 1]
        w = raw[:, 2] / self.xyxy_scale[2] * a[:, 2]
        h = raw[:, 3] / self.xyxy_scale[3] * a[:, 3]
        size = np.array([self.width, self.height, self.width, self.height], np.float32)
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * size
        points = None
        if self.keypoints and raw.shape[1] > 4:
            kp = raw[:, 4:].reshape(len(raw), -1, 2)
            kx = kp[:, :, 0] / self.xyxy_scale[0] * a[:, 2:3] + a[:, 0:1]
            ky = kp[:, :, 1] / self.xyxy_scale[1] * a[:, 3:4] + a[:, 1:2]
            points = np.stack([kx * self.width, ky * self.height], axis=2)
        return boxes, scores, classes, points


class YoloDecoder:
    """YOLO outputs: [1, N, 5 + C] (v5: xywh, objectness, classes) or [1, 4 + C, N] (v8: xywh, classes)."""

    score_threshold, iou_threshold = 0.25, 0.45

    def __init__(self, opts: YoloOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        self.labels = labels
        self.spec = only_tensor("postprocess", "output", opts.output, outputs, "output")
        shape = self.spec.shape
        if len(shape) != 3:
            raise _error("output", f"{self.spec.name!r} has shape {self.spec.shape_list()}, expected 3-D")
        layout: str = opts.layout
        if layout == "auto":
            a, b = shape[1], shape[2]
            if labels and a == 4 + len(labels):
                layout = "v8"
            elif labels and b == 5 + len(labels):
                layout = "v5"
            elif a is not None and b is not None:
                layout = "v8" if a < b else "v5"
            else:
                raise _error(
                    "layout", f"required (v5 or v8): {self.spec.name!r} has dynamic shape {self.spec.shape_list()}"
                )
        self.layout = layout
        width = shape[1] if layout == "v8" else shape[2]
        extra = 4 if layout == "v8" else 5
        if width is not None and width <= extra:
            raise _error(
                "layout",
                f"{layout} needs more than {extra} values per box; "
                f"{self.spec.name!r} has shape {self.spec.shape_list()}",
            )
        if labels and width is not None and width - extra != len(labels):
            raise _error(
                "output",
                f"{self.spec.name!r} ({layout}) has {width - extra} classes but the bundle has {len(labels)} labels",
            )
        self.normalized = opts.normalized

    def decode(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Decoded:
        x = output(outputs, self.spec.name).astype(np.float32)
        x = x.reshape(x.shape[-2:])
        if self.layout == "v8":
            x = x.T
            cls = x[:, 4:]
        else:
            cls = x[:, 5:] * x[:, 4:5]
        classes = cls.argmax(axis=1)
        scores = cls[np.arange(len(cls)), classes]
        xy, wh = x[:, :2], x[:, 2:4]
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
        if self.normalized:
            w, h = meta.get("input_size", (1, 1))
            boxes = boxes * np.array([w, h, w, h], np.float32)
        return boxes, scores, classes, None
