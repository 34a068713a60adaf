"""Shared request decoding: JSON bodies and tensors built from JSON values."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from agent.errors import RequestError
from agent.runtimes import TensorSpec

JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def loads(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=JSON_OPTS)


def json_dtype(spec: TensorSpec) -> np.dtype[Any]:
    """JSON numbers for a quantized input are real values: the agent quantizes them."""
    return np.dtype(np.float32) if spec.quantization is not None else spec.dtype


def to_array(name: str, value: Any, dtype: np.dtype[Any]) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"input '{name}': cannot convert to {dtype.name}: {exc}") from None


def as_contiguous(value: np.ndarray) -> np.ndarray:
    """orjson serialises only C-contiguous arrays of native dtypes."""
    if value.dtype == np.float16:
        return value.astype(np.float32)
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)
