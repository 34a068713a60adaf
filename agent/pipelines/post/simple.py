"""Classification (top-k with labels) and raw outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
from pydantic import Field

from agent.pipelines.base import POSTPROCESSORS, PipelineError, Postprocessor
from agent.pipelines.options import Bool, Int, Number, ProcessorOptions, Str, find_tensor, only_tensor, option_error
from agent.runtimes.base import TensorSpec

_error = partial(option_error, "postprocess")


def output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Output ``name`` as an array; raises PipelineError if the model did not return it."""
    try:
        return np.asarray(outputs[name])
    except KeyError:
        raise PipelineError(f"model returned no output {name!r} (got {', '.join(outputs)})") from None


class ClassificationOptions(ProcessorOptions):
    type: Literal["classification"]
    output: Str | None = None  # default: the model's only output
    top_k: Int = Field(default=5, ge=1)
    threshold: Number = 0.0
    softmax: Bool = False


@POSTPROCESSORS.register
class Classification(Postprocessor):
    """``{"labels": [{"label", "index", "score"}]}``: the top ``top_k`` scores over ``threshold``."""

    type = "classification"
    Options = ClassificationOptions

    def __init__(
        self, options: ClassificationOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None
    ) -> None:
        self.spec = only_tensor("postprocess", "output", options.output, outputs, "output")
        self.top_k = options.top_k
        self.threshold = options.threshold
        self.softmax = options.softmax
        self.labels = labels
        classes = self.spec.shape[-1] if self.spec.shape else 1
        if labels is not None and classes is not None and len(labels) != classes:
            raise _error("output", f"{self.spec.name!r} has {classes} classes but the bundle has {len(labels)} labels")

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


class RawOptions(ProcessorOptions):
    type: Literal["raw"]
    outputs: tuple[Str, ...] | None = None  # default: all of them


@POSTPROCESSORS.register
class Raw(Postprocessor):
    """``{"outputs": {name: nested lists}}``, for debugging; ``outputs`` picks a subset."""

    type = "raw"
    Options = RawOptions

    def __init__(self, options: RawOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        names = list(options.outputs) if options.outputs is not None else [t.name for t in outputs]
        for name in names:
            find_tensor("postprocess", "outputs", name, outputs, "output")
        self.names = names

    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        return {"outputs": {name: output(outputs, name).tolist() for name in self.names}}
