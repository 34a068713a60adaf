"""Classification (top-k with labels) and raw outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.pipelines.base import POSTPROCESSORS, PipelineError, Postprocessor
from agent.pipelines.post.options import Options, find_tensor, only_tensor
from agent.runtimes.base import TensorSpec


def output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Output ``name`` as an array; raises PipelineError if the model did not return it."""
    try:
        return np.asarray(outputs[name])
    except KeyError:
        raise PipelineError(f"model returned no output {name!r} (got {', '.join(outputs)})") from None


@POSTPROCESSORS.register
class Classification(Postprocessor):
    """``{"labels": [{"label", "index", "score"}]}``: the top ``top_k`` scores over ``threshold``."""

    type = "classification"

    def __init__(self, opts: Options, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        self.spec = only_tensor(opts, "output", outputs, "output")
        self.top_k = opts.get_int("top_k", 5, min=1)
        self.threshold = opts.get_float("threshold", 0.0)
        self.softmax = opts.get_bool("softmax", False)
        self.labels = labels
        classes = self.spec.shape[-1] if self.spec.shape else 1
        if labels is not None and classes is not None and len(labels) != classes:
            raise opts.error(
                "output", f"{self.spec.name!r} has {classes} classes but the bundle has {len(labels)} labels"
            )

    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        scores = output(outputs, self.spec.name).astype(np.float64).reshape(-1)
        if self.softmax:
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        order = np.argsort(-scores, kind="stable")[: self.top_k]
        return {
            "labels": [
                {"label": self._label(int(i)), "index": int(i), "score": round(float(scores[i]), 5)}
                for i in order
                if scores[i] >= self.threshold
            ]
        }

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels and index < len(self.labels) else str(index)


@POSTPROCESSORS.register
class Raw(Postprocessor):
    """``{"outputs": {name: nested lists}}``, for debugging; ``outputs`` picks a subset."""

    type = "raw"

    def __init__(self, opts: Options, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        names = opts.get("outputs", [t.name for t in outputs])
        if not isinstance(names, list):
            raise opts.error("outputs", f"must be a list of output names, got {names!r}")
        for name in names:
            find_tensor(Options({"outputs": name}, "postprocess"), "outputs", outputs, "output")
        self.names = names

    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        return {"outputs": {name: output(outputs, name).tolist() for name in self.names}}
