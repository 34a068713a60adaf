"""Post-processing: model outputs → compact JSON-able results; the public entry point.

The processors live in ``agent.pipelines.post`` (one module per family) and register
themselves in ``POSTPROCESSORS`` on import; this module imports them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.pipelines.base import POSTPROCESSORS, Postprocessor
from agent.pipelines.post import detection, events, simple
from agent.pipelines.post.options import Options
from agent.runtimes.base import TensorSpec

__all__ = ["Postprocessor", "detection", "events", "make_postprocessor", "simple"]


def make_postprocessor(
    spec: Mapping[str, Any], outputs: Sequence[TensorSpec], labels: list[str] | None = None
) -> Postprocessor:
    """A post-processor for a model with ``outputs``, with the bundle's ``labels`` if it has them.

    Raises:
        PipelineError: unknown type, bad option, or options that do not fit the model's outputs.
    """
    opts = Options(spec, "postprocess")
    cls = POSTPROCESSORS.get_class(opts.get_str("type"))
    post = cls(opts, outputs, labels)  # type: ignore[call-arg]
    opts.finish()
    return post
