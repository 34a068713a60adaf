"""TensorFlow Serving REST API (v1): predict in row (``instances``) and columnar (``inputs``)
format, model status and metadata, answered the way TF Serving answers them."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.api.codec import as_contiguous, json_dtype, loads, to_array
from agent.api.offload import encoded
from agent.errors import RequestError
from agent.models.served import ServedModel

_TF_DTYPES = {
    "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF", "int8": "DT_INT8", "uint8": "DT_UINT8",
    "int16": "DT_INT16", "uint16": "DT_UINT16", "int32": "DT_INT32", "uint32": "DT_UINT32", "int64": "DT_INT64",
    "uint64": "DT_UINT64", "bool": "DT_BOOL",
}


def parse_predict(body: bytes | bytearray, model: ServedModel,
                  decoded: Any = None) -> tuple[dict[str, np.ndarray], str, bool]:
    """Returns (feeds, "row"|"columnar", raw_output). ``decoded``: the body, already decoded
    (``agent.api.offload.JsonDecoder``)."""
    request = loads(body) if decoded is None else decoded
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object")
    has_rows, has_cols = "instances" in request, "inputs" in request
    if has_rows == has_cols:
        raise RequestError("request must contain exactly one of 'instances' or 'inputs'")
    raw = request.get("raw_output", False)
    if not isinstance(raw, bool):
        raise RequestError("'raw_output' must be true or false")
    signature = request.get("signature_name")
    if signature not in (None, "", "serving_default"):
        shown = signature[:100] if isinstance(signature, str) else type(signature).__name__
        raise RequestError(f"unknown signature_name {shown!r} (the model has 'serving_default')")
    specs = {s.name: s for s in model.inputs}
    if has_rows:
        return _rows(request["instances"], specs), "row", raw
    return _columns(request["inputs"], specs), "columnar", raw


def _rows(instances: Any, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    # (A list of numbers decoded in the helper process is an array already: agent.api.offload.)
    if not (isinstance(instances, list) or (isinstance(instances, np.ndarray) and instances.ndim)) \
            or not len(instances):
        raise RequestError("'instances' must be a non-empty list")
    if isinstance(instances, list) and all(isinstance(row, dict) for row in instances):
        feeds = {}
        for name in {k for row in instances for k in row}:
            if name not in specs:
                raise RequestError(f"unknown input '{name[:100]}' (model inputs: {', '.join(sorted(specs))})")
            if any(name not in row for row in instances):
                raise RequestError(f"input '{name}' is missing from some instances")
            feeds[name] = to_array(name, [row[name] for row in instances], json_dtype(specs[name]))
        return feeds
    if len(specs) != 1:
        raise RequestError(f"model has {len(specs)} inputs: each instance must be an object keyed by input name")
    (name, spec), = specs.items()
    return {name: to_array(name, instances, json_dtype(spec))}


def _columns(inputs: Any, specs: dict[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):  # a tensor is never an object: it is keyed by input name
        feeds = {}
        for name, value in inputs.items():
            if name not in specs:
                raise RequestError(f"unknown input '{name[:100]}' (model inputs: {', '.join(sorted(specs))})")
            feeds[name] = to_array(name, value, json_dtype(specs[name]))
        return feeds
    if len(specs) != 1:
        raise RequestError(f"model has {len(specs)} inputs: 'inputs' must be an object keyed by input name")
    (name, spec), = specs.items()
    return {name: to_array(name, inputs, json_dtype(spec))}


def format_predict(outputs: dict[str, np.ndarray], fmt: str) -> dict[str, Any]:
    values = {name: as_contiguous(v) for name, v in outputs.items()}
    if fmt == "columnar":
        return {"outputs": encoded(next(iter(values.values()))) if len(values) == 1
                else {name: encoded(v) for name, v in values.items()}}
    if len(values) == 1:
        return {"predictions": encoded(next(iter(values.values())))}
    rows = {v.shape[0] if v.ndim else None for v in values.values()}
    if len(rows) != 1 or None in rows:
        raise RequestError("outputs do not share a batch dimension: use the columnar 'inputs' format")
    n = rows.pop() or 0
    return {"predictions": [{name: v[i] for name, v in values.items()} for i in range(n)]}


def version_status(states: list[dict[str, Any]]) -> dict[str, Any]:
    out = []
    for state in states:
        failed = state["state"] == "FAILED"
        out.append({"version": str(state["version"]), "state": "END" if failed else "AVAILABLE",
                    "status": {"error_code": "UNKNOWN" if failed else "OK",
                               "error_message": state.get("error", "")}})
    return {"model_version_status": out}


def metadata(model: ServedModel) -> dict[str, Any]:
    def tensors(specs: Any) -> dict[str, Any]:
        return {
            s.name: {"dtype": _TF_DTYPES.get(s.dtype.name, "DT_INVALID"), "name": s.name,
                     "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in s.shape_list()],
                                      "unknown_rank": False}}
            for s in specs
        }

    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": tensors(model.inputs), "outputs": tensors(model.outputs),
            "method_name": "tensorflow/serving/predict"}}}},
    }
