"""Where the batch dimension is in each tensor, and how to merge and split requests along it.

Input batch axes come from the model's metadata: the only dynamic axis, or axis 0 when
several are dynamic. Output axes that metadata leaves ambiguous (ONNX models often mark
every dimension dynamic) are learnt from real runs: an axis stays a candidate only while
its size equals the batch total. Until one candidate remains, coalesced jobs are run one
by one, so a guess never returns another client's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.runtimes import TensorSpec


def batch_axis(spec: TensorSpec) -> int | None:
    dynamic = spec.dynamic_axes
    if len(dynamic) == 1:
        return dynamic[0]
    return 0 if dynamic and dynamic[0] == 0 else None


@dataclass
class BatchLayout:
    input_axes: dict[str, int | None]
    output_candidates: dict[str, set[int]]

    @classmethod
    def for_model(cls, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                  output_overrides: Mapping[str, int] | None = None) -> BatchLayout | None:
        """None when no input has a dynamic batch dimension (fixed-batch models never batch)."""
        input_axes = {spec.name: batch_axis(spec) for spec in inputs}
        if all(axis is None for axis in input_axes.values()):
            return None
        overrides = output_overrides or {}
        candidates: dict[str, set[int]] = {}
        for spec in outputs:
            if spec.name in overrides:
                candidates[spec.name] = {overrides[spec.name]}
            elif len(spec.dynamic_axes) == 1:
                candidates[spec.name] = {spec.dynamic_axes[0]}
            else:
                candidates[spec.name] = set(spec.dynamic_axes or range(len(spec.shape)))
        return cls(input_axes, candidates)

    def request_size(self, feeds: Mapping[str, np.ndarray]) -> int | None:
        """Rows in this request, or None when its inputs disagree (then it runs alone)."""
        sizes = {feeds[name].shape[axis] for name, axis in self.input_axes.items() if axis is not None}
        return sizes.pop() if len(sizes) == 1 else None

    def key(self, feeds: Mapping[str, np.ndarray]) -> tuple[object, ...] | None:
        """Requests with equal keys can be concatenated; None means never coalesce."""
        parts: list[object] = []
        for name, axis in self.input_axes.items():
            value = feeds[name]
            if axis is None:
                if value.size > 64:
                    return None
                parts.append((value.dtype.str, value.shape, value.tobytes()))
            else:
                parts.append((value.dtype.str, value.shape[:axis] + value.shape[axis + 1 :]))
        return tuple(parts)

    def merge(self, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        first = feeds_list[0]
        return {
            name: first[name] if axis is None else np.concatenate([f[name] for f in feeds_list], axis=axis)
            for name, axis in self.input_axes.items()
        }

    def learn(self, outputs: Mapping[str, np.ndarray], total: int) -> bool:
        """Narrow output axes with one run's shapes; True when every output axis is known."""
        for name, cands in self.output_candidates.items():
            shape = outputs[name].shape
            cands.intersection_update(a for a in list(cands) if a < len(shape) and shape[a] == total)
        return all(len(c) == 1 for c in self.output_candidates.values())

    @property
    def unusable(self) -> bool:
        return any(not c for c in self.output_candidates.values())

    def split(self, outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
        bounds = np.cumsum(sizes)[:-1]
        parts: list[dict[str, np.ndarray]] = [{} for _ in sizes]
        for name, value in outputs.items():
            (axis,) = self.output_candidates[name]
            for i, chunk in enumerate(np.split(value, bounds, axis=axis)):
                parts[i][name] = chunk
        return parts
