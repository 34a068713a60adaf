"""Shared request decoding: JSON bodies and tensors built from JSON values."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from agent.api.offload import Unconvertible
from agent.errors import RequestError
from agent.runtimes import TensorSpec

JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def loads(body: bytes | bytearray | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=JSON_OPTS)


def json_dtype(spec: TensorSpec) -> np.dtype[Any]:
    """JSON numbers for a quantized input are real values: the agent quantizes them."""
    return np.dtype(np.float32) if spec.quantization is not None else spec.dtype


#: What JSON values a tensor of each numpy kind takes, by the kind numpy infers from them:
#: numbers for numbers (no strings, no nulls, no objects), true/false for booleans.
_ACCEPTS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
MAX_DIMS = 32  # numpy's limit in 1.x; no model has more


def to_array(name: str, value: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """A JSON value (a number or nested lists of them) as an array of ``dtype``.

    Raises:
        RequestError: ragged lists, strings, nulls or objects, floats for an integer tensor,
            integers out of its range, or more than 32 dimensions.
    """
    if isinstance(value, Unconvertible):  # (decoded in the helper process: agent.api.offload)
        raise RequestError(f"input '{name}': cannot convert to {dtype.name}: {value.message}")
    try:
        array = np.asarray(value)  # numpy infers the kind: a string or null anywhere shows in it
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise RequestError(f"input '{name}': cannot convert to {dtype.name}: {exc}") from None
    if array.ndim > MAX_DIMS:
        raise RequestError(f"input '{name}': more than {MAX_DIMS} dimensions")
    if array.dtype == dtype or array.size == 0:
        return array.astype(dtype, copy=False)
    kind = array.dtype.kind
    if kind not in _ACCEPTS.get(dtype.kind, ""):
        wanted = "true/false" if dtype.kind == "b" else "integers" if dtype.kind in "iu" else "numbers"
        found = {"U": "strings", "S": "strings", "O": "nulls, objects or out-of-range integers", "f": "floats",
                 "b": "booleans"}.get(kind, array.dtype.name)
        raise RequestError(f"input '{name}': {dtype.name} takes {wanted}, got {found}")
    if dtype.kind in "iu" and not np.can_cast(array.dtype, dtype):
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise RequestError(f"input '{name}': values outside the range of {dtype.name} [{info.min}, {info.max}]")
    return array.astype(dtype, copy=False)


def as_contiguous(value: np.ndarray) -> np.ndarray:
    """orjson serialises only C-contiguous arrays of native dtypes."""
    if value.dtype == np.float16:
        return value.astype(np.float32)
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)
