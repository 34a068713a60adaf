"""SSD anchors as MediaPipe's ``SsdAnchorsCalculator`` generates them (pure numpy, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    return (min_scale + max_scale) / 2 if count == 1 else min_scale + (max_scale - min_scale) * index / (count - 1)


def ssd_anchors(
    *,
    input_width: int,
    input_height: int,
    strides: Sequence[int],
    min_scale: float = 0.1484375,
    max_scale: float = 0.75,
    anchor_offset: float = 0.5,
    aspect_ratios: Sequence[float] = (1.0,),
    interpolated_scale_aspect_ratio: float = 1.0,
    reduce_boxes_in_lowest_layer: bool = False,
    fixed_anchor_size: bool = True,
) -> np.ndarray:
    """Anchors as (x_center, y_center, width, height), normalized to the input, shape (count, 4).

    Consecutive layers with the same stride share one feature map (MediaPipe's rule), so face
    detection short range (strides 8, 16, 16, 16) gives 16x16x2 + 8x8x6 = 896 anchors.
    """
    layers = len(strides)
    out: list[np.ndarray] = []
    layer = 0
    while layer < layers:
        sizes: list[tuple[float, float]] = []  # (width, height) per anchor in a cell
        last = layer
        while last < layers and strides[last] == strides[layer]:
            scale = _scale(min_scale, max_scale, last, layers)
            if last == 0 and reduce_boxes_in_lowest_layer:
                pairs = [(1.0, 0.1), (2.0, scale), (0.5, scale)]
            else:
                pairs = [(ar, scale) for ar in aspect_ratios]
                if interpolated_scale_aspect_ratio > 0:
                    nxt = 1.0 if last == layers - 1 else _scale(min_scale, max_scale, last + 1, layers)
                    pairs.append((interpolated_scale_aspect_ratio, math.sqrt(scale * nxt)))
            sizes += [(s * math.sqrt(ar), s / math.sqrt(ar)) for ar, s in pairs]
            last += 1
        fm_h, fm_w = math.ceil(input_height / strides[layer]), math.ceil(input_width / strides[layer])
        ys, xs = np.meshgrid(
            (np.arange(fm_h) + anchor_offset) / fm_h, (np.arange(fm_w) + anchor_offset) / fm_w, indexing="ij"
        )
        wh = np.ones((len(sizes), 2)) if fixed_anchor_size else np.asarray(sizes)
        centers = np.stack([xs.ravel(), ys.ravel()], axis=1)
        grid = np.concatenate([np.repeat(centers, len(sizes), axis=0), np.tile(wh, (len(centers), 1))], axis=1)
        out.append(grid)
        layer = last
    return np.concatenate(out).astype(np.float32)
