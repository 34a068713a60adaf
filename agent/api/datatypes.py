"""Open Inference Protocol tensor datatypes and their numpy dtypes (shared by server and client)."""

from __future__ import annotations

from typing import Any

import numpy as np

DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(t) for name, t in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype(dtype: np.dtype[Any]) -> str:
    """OIP name of a numpy dtype; BYTES for anything without a fixed-size equivalent."""
    return _NAMES.get(dtype, "BYTES")
