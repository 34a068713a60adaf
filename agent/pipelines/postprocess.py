"""Post-processing: model outputs → compact JSON-able results; the public entry point.

The processors live in ``agent.pipelines.post`` (one module per family) and register
themselves in ``POSTPROCESSORS`` on import; this module imports them all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.pipelines.base import POSTPROCESSORS, Postprocessor
from agent.pipelines.options import ProcessorOptions, parse_options
from agent.pipelines.post import detection, events, simple
from agent.runtimes.base import TensorSpec

__all__ = ["Postprocessor", "detection", "events", "make_postprocessor", "simple"]


def make_postprocessor(
    spec: Mapping[str, Any] | ProcessorOptions, outputs: Sequence[TensorSpec], labels: list[str] | None = None
) -> Postprocessor:
    """A post-processor for a model with ``outputs``, with the bundle's ``labels`` if it has them.

    ``spec`` is the manifest's ``postprocess`` object (or its validated options).

    Raises:
        PipelineError: unknown type, bad option, or options that do not fit the model's outputs.
    """
    options = parse_options(POSTPROCESSORS, spec, "postprocess")
    return POSTPROCESSORS.get_class(options.type)(options, outputs, labels)
