"""Checks a request's tensors against a model's inputs before it is queued, so a bad
request fails alone with a 400 and never reaches a batch shared with other clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from agent.errors import RequestError
from agent.runtimes import TensorSpec


def check_feeds(inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Raises RequestError naming the input and what is wrong with it."""
    names = {spec.name for spec in inputs}
    unknown = sorted(set(feeds) - names)
    if unknown:
        raise RequestError(f"unknown input '{unknown[0]}' (model inputs: {', '.join(sorted(names))})")
    for spec in inputs:
        value = feeds.get(spec.name)
        if value is None:
            raise RequestError(f"missing input '{spec.name}'")
        if value.ndim != len(spec.shape):
            raise RequestError(
                f"input '{spec.name}': expected {len(spec.shape)} dimensions {spec.shape_list()}, "
                f"got shape {list(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if want is not None and want != got:
                raise RequestError(
                    f"input '{spec.name}': dimension {axis} must be {want} (model shape {spec.shape_list()}), "
                    f"got shape {list(value.shape)}"
                )
        if value.dtype != spec.dtype and not (
            spec.quantization is not None and np.issubdtype(value.dtype, np.floating)
        ):
            raise RequestError(f"input '{spec.name}': expected dtype {spec.dtype.name}, got {value.dtype.name}")
