"""Checks a request's tensors against a model's inputs before it is queued, so a bad
request fails alone with a 400 and never reaches a batch shared with other clients, or a
runtime that may take it badly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from agent.errors import InvalidInputError
from agent.runtimes import TensorSpec


def check_feeds(inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Raises InvalidInputError naming the input and what is wrong with it.

    An empty dimension is refused where the model's is dynamic: runtimes do not expect empty
    tensors, and ONNX Runtime aborts the whole process on some (an LSTM given batch 0).
    """
    names = {spec.name for spec in inputs}
    unknown = sorted(set(feeds) - names)
    if unknown:
        raise InvalidInputError(f"unknown input '{unknown[0][:100]}' (model inputs: {', '.join(sorted(names))})")
    for spec in inputs:
        value = feeds.get(spec.name)
        if value is None:
            raise InvalidInputError(f"missing input '{spec.name}'")
        if value.ndim != len(spec.shape):
            raise InvalidInputError(
                f"input '{spec.name}': expected {len(spec.shape)} dimensions {spec.shape_list()}, "
                f"got shape {list(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if want != got and (want is not None or got == 0):
                must = f"must be {want}" if want is not None else "must not be 0"
                raise InvalidInputError(
                    f"input '{spec.name}': dimension {axis} {must} (model shape {spec.shape_list()}), "
                    f"got shape {list(value.shape)}"
                )
        if value.dtype != spec.dtype and not (
            spec.quantization is not None and np.issubdtype(value.dtype, np.floating)
        ):
            raise InvalidInputError(f"input '{spec.name}': expected dtype {spec.dtype.name}, got {value.dtype.name}")
