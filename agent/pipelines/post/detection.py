"""Object detection: SSD-style (MediaPipe anchors) and YOLO-style decoding, NMS, source coordinates.

Decoders give boxes as x1, y1, x2, y2 in model-input pixels; ``to_source`` undoes the
pre-processing's letterbox/stretch using its ``meta`` (``scale``, ``pad``, ``source_size``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.pipelines.anchors import ssd_anchors
from agent.pipelines.base import POSTPROCESSORS, PipelineError, Postprocessor
from agent.pipelines.post.options import Options, find_tensor, only_tensor
from agent.pipelines.post.simple import output
from agent.runtimes.base import TensorSpec


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


Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]
"""Boxes (x1,y1,x2,y2 model pixels), scores, class indices, keypoints (N,K,2 model pixels) or None."""


@POSTPROCESSORS.register
class Detection(Postprocessor):
    """``{"detections": [{"box", "score", "label"}]}`` in source-image pixels, after threshold and NMS.

    ``format`` picks the decoder: ``mediapipe_ssd`` or ``yolo``.
    """

    type = "detection"

    def __init__(self, opts: Options, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        fmt = opts.get_str("format", None, ("mediapipe_ssd", "yolo"))
        if fmt is None:
            raise opts.error("format", "required: mediapipe_ssd or yolo")
        self.decoder: SSDDecoder | YoloDecoder = (SSDDecoder if fmt == "mediapipe_ssd" else YoloDecoder)(
            opts, outputs, labels
        )
        self.labels = self.decoder.labels
        self.score_threshold = opts.get_float("score_threshold", self.decoder.score_threshold, min=0, max=1)
        self.iou_threshold = opts.get_float("iou_threshold", self.decoder.iou_threshold, min=0, max=1)
        self.max_detections = opts.get_int("max_detections", 100, min=1)
        self.per_class = not opts.get_bool("class_agnostic", False)

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

    def __init__(self, opts: Options, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        names = {t.name for t in outputs}
        self.boxes = find_tensor(opts, "boxes", outputs, "output", "regressors" if "regressors" in names else None)
        self.scores = find_tensor(
            opts, "scores", outputs, "output", "classificators" if "classificators" in names else None
        )
        size = opts.get_int("input_size", 128, min=1)
        self.width = opts.get_int("input_width", size, min=1)
        self.height = opts.get_int("input_height", size, min=1)
        strides = [int(s) for s in opts.get_floats("strides", [8, 16, 16, 16])]
        layers = opts.get_int("num_layers", len(strides), min=1)
        if layers != len(strides):
            raise opts.error("num_layers", f"{layers} layers but {len(strides)} strides {strides}")
        self.anchors = ssd_anchors(
            input_width=self.width,
            input_height=self.height,
            strides=strides,
            min_scale=opts.get_float("min_scale", 0.1484375),
            max_scale=opts.get_float("max_scale", 0.75),
            anchor_offset=opts.get_float("anchor_offset", 0.5),
            aspect_ratios=opts.get_floats("aspect_ratios", [1.0]),
            interpolated_scale_aspect_ratio=opts.get_float("interpolated_scale_aspect_ratio", 1.0),
            reduce_boxes_in_lowest_layer=opts.get_bool("reduce_boxes_in_lowest_layer", False),
            fixed_anchor_size=opts.get_bool("fixed_anchor_size", True),
        )
        self.xyxy_scale = np.array(
            [
                opts.get_float(k, float(d))
                for k, d in (
                    ("x_scale", self.width),
                    ("y_scale", self.height),
                    ("w_scale", self.width),
                    ("h_scale", self.height),
                )
            ],
            np.float32,
        )
        self.clip = opts.get_float("score_clipping", 100.0, min=0)
        self.keypoints = opts.get_bool("keypoints", False)
        label = opts.get_str("label", "face")
        self.labels = labels or [label]
        count = len(self.anchors)
        bshape, sshape = self.boxes.shape, self.scores.shape
        if len(bshape) != 3 or (bshape[2] is not None and (bshape[2] < 4 or bshape[2] % 2)):
            raise opts.error(
                "boxes",
                f"{self.boxes.name!r} has shape {self.boxes.shape_list()}, expected [1, anchors, 4 + 2 x keypoints]",
            )
        if len(sshape) != 3:
            raise opts.error(
                "scores", f"{self.scores.name!r} has shape {self.scores.shape_list()}, expected [1, anchors, classes]"
            )
        for key, spec in (("boxes", self.boxes), ("scores", self.scores)):
            if spec.shape[1] is not None and spec.shape[1] != count:
                raise opts.error(
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

    def __init__(self, opts: Options, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        self.labels = labels
        self.spec = only_tensor(opts, "output", outputs, "output")
        shape = self.spec.shape
        if len(shape) != 3:
            raise opts.error("output", f"{self.spec.name!r} has shape {self.spec.shape_list()}, expected 3-D")
        layout = opts.get_str("layout", "auto", ("auto", "v5", "v8"))
        if layout == "auto":
            a, b = shape[1], shape[2]
            if labels and a == 4 + len(labels):
                layout = "v8"
            elif labels and b == 5 + len(labels):
                layout = "v5"
            elif a is not None and b is not None:
                layout = "v8" if a < b else "v5"
            else:
                raise opts.error(
                    "layout", f"required (v5 or v8): {self.spec.name!r} has dynamic shape {self.spec.shape_list()}"
                )
        self.layout = layout
        width = shape[1] if layout == "v8" else shape[2]
        extra = 4 if layout == "v8" else 5
        if width is not None and width <= extra:
            raise opts.error(
                "layout",
                f"{layout} needs more than {extra} values per box; "
                f"{self.spec.name!r} has shape {self.spec.shape_list()}",
            )
        if labels and width is not None and width - extra != len(labels):
            raise opts.error(
                "output",
                f"{self.spec.name!r} ({layout}) has {width - extra} classes but the bundle has {len(labels)} labels",
            )
        self.normalized = opts.get_bool("normalized", False)

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
