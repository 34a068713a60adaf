"""Open Inference Protocol (KServe v2 / Triton) REST: infer with JSON tensors and with the
binary tensor data extension, model metadata and readiness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.api.codec import MAX_DIMS, as_contiguous, dumps, loads, to_array
from agent.api.datatypes import DATATYPES, datatype
from agent.api.offload import encoded
from agent.api.shm import Region, SharedMemory, SharedMemoryError, tensor_span
from agent.errors import RequestError
from agent.models.served import ServedModel

PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
HEADER = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    feeds: dict[str, np.ndarray]
    request_id: str | None = None
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output -> binary
    binary_default: bool = False
    raw_output: bool = False
    # requested outputs written into a shared-memory region: name -> (region, offset, byte size)
    shm_outputs: dict[str, tuple[Region, int, int]] = field(default_factory=dict)
    preprocess: str | None = None  # the frame's colour order when the manifest's pre-processing is asked for
    # With ``preprocess``: inputs left in their shared-memory region (region, offset), their feed a
    # placeholder of the right shape and dtype; the model's thread reads them (agent.api.frames).
    shm_inputs: dict[str, tuple[Region, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """A binary request's JSON header, decoded and checked once: a client sends the same header
    bytes with every request of the same shapes, and those only need their tensors sliced out."""

    specs: Any  # the model version's output specs it was made for (compared by identity)
    inputs: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]  # name, dtype, shape, offset, count
    size: int  # binary bytes the inputs claim
    outputs: dict[str, bool]
    binary_default: bool
    raw_output: bool
    preprocess: str | None

    def request(self, binary: memoryview) -> InferRequest:
        feeds = {name: np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
                 for name, dtype, shape, offset, count in self.inputs}
        return InferRequest(feeds, None, dict(self.outputs), self.binary_default, self.raw_output,
                            preprocess=self.preprocess)


Plans = dict[tuple[str, int, bytes], _Plan]  # by model name, version and header bytes
_MAX_PLANS = 256


def json_bytes(body: bytes | bytearray, header_length: str | None) -> int:
    """How much of an infer request's body is JSON (all of it without the binary extension)."""
    if header_length is None:
        return len(body)
    return int(header_length) if header_length.isascii() and header_length.isdigit() and len(header_length) <= 12 \
        else 0  # (refused by ``parse_infer``)


def parse_infer(body: bytes | bytearray, header_length: str | None, model: ServedModel,
                plans: Plans | None = None, decoded: Any = None, *,
                shm: SharedMemory | None = None) -> InferRequest:
    """Decode a JSON or binary-extension infer request; every problem is a RequestError naming it.

    Every field is type-checked (a wrong type is a 400, never a 500). ``plans`` (owned by the
    caller) remembers binary headers already decoded, by their bytes. ``decoded``: the JSON part,
    already decoded (``agent.api.offload.JsonDecoder``). ``shm``: the registered shared-memory
    regions that tensors may name (None: shared memory is refused, as over TCP by default).
    """
    if header_length is None:
        header, binary = loads(body) if decoded is None else decoded, memoryview(b"")
    else:
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 12):
            raise RequestError(f"{HEADER} must be an integer, got {header_length[:40]!r}")
        hlen = int(header_length)
        if not 0 < hlen <= len(body):
            raise RequestError(f"{HEADER} is {hlen} but the body has {len(body)} bytes")
        view = memoryview(body)
        binary = view[hlen:]
        key = (model.name, model.version, bytes(view[:hlen]))
        plan = plans.get(key) if plans is not None else None
        if plan is not None and plan.specs is model.outputs and plan.size == len(binary):
            return plan.request(binary)
        header = loads(key[2]) if decoded is None else decoded
    if not isinstance(header, dict):
        raise RequestError("request body must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string")
    params = _parameters(header, "request")
    request = InferRequest({}, request_id=request_id,
                           binary_default=_flag(params, "binary_data_output", "request"),
                           raw_output=_flag(params, "raw_output", "request"),
                           preprocess=_preprocess(params))
    offset = 0
    layout = []  # for the plan: where each binary input lies
    binary_inputs = True
    for entry in inputs:
        name, array, used, from_binary = _input(entry, binary, offset, shm, request)
        if name in request.feeds:
            raise RequestError(f"input '{name}' given twice")
        request.feeds[name] = array
        layout.append((name, array.dtype, array.shape, offset, array.size))
        offset += used
        binary_inputs = binary_inputs and from_binary
    if offset != len(binary):
        raise RequestError(f"binary data has {len(binary) - offset} bytes not claimed by any input")
    outputs = header.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise RequestError("'outputs' must be a list")
    known = {s.name for s in model.outputs}
    for out in outputs or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise RequestError("each requested output must be an object with a 'name'")
        out_name = out["name"]
        if out_name not in known:
            raise RequestError(f"unknown output '{out_name[:100]}' (model outputs: {', '.join(sorted(known))})")
        where = f"output '{out_name}'"
        oparams = _parameters(out, where)
        if "classification" in oparams:
            raise RequestError(f"{where}: the classification extension is not supported")
        binary_data = oparams.get("binary_data", request.binary_default)
        if not isinstance(binary_data, bool):
            raise RequestError(f"{where}: parameters.binary_data must be true or false")
        request.outputs[out_name] = binary_data
        if "shared_memory_region" in oparams:
            region, at, size = tensor_span(oparams, where)
            chosen = _region(shm, region, where)
            chosen.check_span(where, at, size)
            request.shm_outputs[out_name] = (chosen, at, size)
    if (plans is not None and header_length is not None and request.request_id is None and binary_inputs
            and not request.shm_outputs):
        # ids differ per request: no plan for them
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plans[key] = _Plan(model.outputs, tuple(layout), len(binary), dict(request.outputs),
                           request.binary_default, request.raw_output, request.preprocess)
    return request


def _preprocess(params: dict[str, Any]) -> str | None:
    """The frame's colour order if the request asks for the manifest's pre-processing (agent.api.frames)."""
    if not _flag(params, "preprocess", "request"):
        if "frame_color" in params:
            raise RequestError("request: parameters.frame_color applies only with parameters.preprocess = true")
        return None
    color = params.get("frame_color", "bgr")
    if color not in ("bgr", "rgb"):
        shown = color[:20] if isinstance(color, str) else type(color).__name__
        raise RequestError(f"request: parameters.frame_color must be 'bgr' or 'rgb', got {shown!r}")
    return str(color)


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    params = entry.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}: 'parameters' must be an object")
    return params


def _flag(params: dict[str, Any], name: str, where: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{where}: parameters.{name} must be true or false")
    return value


_NO_PARAMETERS: dict[str, Any] = {}
#: Largest dimension accepted in a request: LiteRT keeps dimensions in int32.
MAX_DIM = 2**31 - 1
#: A shape's size with its zero dimensions taken as 1: far above any real tensor, far below numpy's limit.
MAX_NOMINAL_BYTES = 2**48


def _shape(name: str, shape: Any) -> list[int]:
    if type(shape) is list and len(shape) <= MAX_DIMS:
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                break
        else:
            return shape
    raise RequestError(f"input '{name}': 'shape' must be a list of at most {MAX_DIMS} integers from 0 to {MAX_DIM}")


def _region(shm: SharedMemory | None, name: str, where: str) -> Region:
    if shm is None:
        raise SharedMemoryError(f"{where}: shared memory is not served on this listener (over TCP it needs "
                                "api.tcp_shared_memory = true)")
    return shm.get(name)


def _input(entry: Any, binary: memoryview, offset: int, shm: SharedMemory | None = None,
           request: InferRequest | None = None) -> tuple[str, np.ndarray, int, bool]:
    """(name, array, binary bytes used, whether it came from the binary part). A shared-memory input
    of a ``request`` with ``preprocess`` is left in its region (``InferRequest.shm_inputs``)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise RequestError("each input must be an object with a 'name'")
    name = entry["name"][:200]
    shape = _shape(name, entry.get("shape"))
    dt_name = entry.get("datatype")
    if not isinstance(dt_name, str) or dt_name not in DATATYPES:
        shown = dt_name[:40] if isinstance(dt_name, str) else dt_name if dt_name is None else type(dt_name).__name__
        raise RequestError(f"input '{name}': unsupported datatype {shown!r} (supported: {', '.join(DATATYPES)})")
    dtype = DATATYPES[dt_name]
    count = math.prod(shape)
    if not count and math.prod(d or 1 for d in shape) * dtype.itemsize > MAX_NOMINAL_BYTES:
        # Empty, but numpy could not even shape it (a non-empty shape is bounded by the data it needs).
        raise RequestError(f"input '{name}': shape {shape} is beyond any tensor's size")
    params = entry.get("parameters")
    if params is None:
        params = _NO_PARAMETERS
    elif type(params) is not dict:
        raise RequestError(f"input '{name}': 'parameters' must be an object")
    if "shared_memory_region" in params:
        where = f"input '{name}'"
        region_name, at, size = tensor_span(params, where)
        region = _region(shm, region_name, where)
        if size != count * dtype.itemsize:
            raise SharedMemoryError(f"{where}: shared_memory_byte_size {size} does not match shape {shape} of "
                                    f"{dt_name} ({count * dtype.itemsize} bytes)")
        region.check_span(where, at, size)
        if request is not None and request.preprocess is not None:
            request.shm_inputs[name] = (region, at)
            return name, np.broadcast_to(np.zeros((), dtype), shape), 0, False  # no memory: read later
        return name, region.read(at, dtype, shape), 0, False
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size != count * dtype.itemsize:
            raise RequestError(f"input '{name}': binary_data_size {size!r} does not match shape {shape} of "
                               f"{dt_name} ({count * dtype.itemsize} bytes)")
        if offset + size > len(binary):
            raise RequestError(f"input '{name}': binary data is truncated ({len(binary) - offset} of {size} bytes)")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return name, array, size, True
    if "data" not in entry:
        raise RequestError(f"input '{name}': needs 'data' or parameters.binary_data_size")
    array = to_array(name, entry["data"], dtype)
    if array.size != count:
        raise RequestError(f"input '{name}': 'data' has {array.size} elements but shape {shape} needs {count}")
    return name, array.reshape(shape), 0, False


def format_infer(model: ServedModel, request: InferRequest, outputs: dict[str, np.ndarray],
                 parameters: dict[str, Any] | None = None) -> tuple[bytes, int | None]:
    """Returns (body, header length or None when no output is binary); ``parameters``: the response's."""
    wanted = request.outputs or dict.fromkeys(outputs, request.binary_default)
    entries: list[dict[str, Any]] = []
    chunks: list[Any] = []  # buffers (numpy arrays of bytes): joined once
    for name, binary in wanted.items():
        value = as_contiguous(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype(value.dtype), "shape": list(value.shape)}
        span = request.shm_outputs.get(name)
        if span is not None:
            region, at, size = span
            region.write(f"output '{name}'", at, size, value)
            entry["parameters"] = {"shared_memory_region": region.name, "shared_memory_offset": at,
                                   "shared_memory_byte_size": value.nbytes}
        elif binary:
            data = value.reshape(-1).view(np.uint8)  # copied once, into the body (no tobytes() first)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = encoded(value.reshape(-1))
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version), "outputs": entries}
    if request.request_id is not None:
        response["id"] = request.request_id
    if parameters:
        response["parameters"] = parameters
    header = dumps(response)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def metadata(model: ServedModel, versions: Sequence[int]) -> dict[str, Any]:
    def tensors(specs: Any) -> list[dict[str, Any]]:
        out = []
        for s in specs:
            entry: dict[str, Any] = {"name": s.name, "datatype": datatype(s.dtype), "shape": s.shape_list()}
            if s.quantization is not None:
                entry["parameters"] = {"scale": s.quantization.scale, "zero_point": s.quantization.zero_point}
            out.append(entry)
        return out

    return {"name": model.name, "versions": [str(v) for v in versions], "platform": PLATFORMS[model.runtime],
            "inputs": tensors(model.inputs), "outputs": tensors(model.outputs)}
