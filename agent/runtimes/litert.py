"""LiteRT (TensorFlow Lite) backend: XNNPACK by default, external delegates (GPU, Edge TPU) by library.

``ai_edge_litert`` is the runtime; ``tflite_runtime`` is imported only when LiteRT is
missing, because tflite-runtime 2.14 crashes with numpy 2.
"""

from __future__ import annotations

import ctypes.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import RuntimeUnavailableError
from agent.hardware import DelegateSpec
from agent.runtimes.base import Backend, LoadReport, Quantization, Session, TensorSpec

_DEFAULT_LIBRARIES = {
    "gpu": "libtensorflowlite_gpu_delegate.so",
    "edgetpu": "libedgetpu.so.1",
}


def _interpreter_module() -> Any:
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter
        except ImportError as exc:
            raise RuntimeUnavailableError("neither ai-edge-litert nor tflite-runtime is installed") from exc
    return interpreter


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if d >= 0 else None for d in dims)
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"])
    quant = Quantization(float(scale), int(zero_point)) if scale and np.issubdtype(dtype, np.integer) else None
    return TensorSpec(detail["name"], dtype, shape, quant)


class LiteRTSession(Session):
    backend = "tflite"

    def __init__(self, path: Path, interp: Any, report: LoadReport) -> None:
        interp.allocate_tensors()
        in_details = interp.get_input_details()
        out_details = interp.get_output_details()
        super().__init__(path, [_spec(d) for d in in_details], [_spec(d) for d in out_details], report)
        self._interp = interp
        self._in = [(d["name"], d["index"], tuple(d["shape"])) for d in in_details]
        self._out = [d["index"] for d in out_details]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        interp = self._interp
        resized = False
        for i, (name, index, shape) in enumerate(self._in):
            value = feeds[name]
            if value.shape != shape:
                interp.resize_tensor_input(index, value.shape, strict=True)
                self._in[i] = (name, index, value.shape)
                resized = True
        if resized:
            interp.allocate_tensors()
        for name, index, _ in self._in:
            interp.set_tensor(index, feeds[name])
        interp.invoke()
        return [interp.get_tensor(index) for index in self._out]

    def close(self) -> None:
        self._interp = None


class LiteRTBackend(Backend):
    name = "tflite"
    suffixes = (".tflite",)
    cpu_delegate = "xnnpack"

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        module = _interpreter_module()
        dist = "ai-edge-litert" if module.__name__.startswith("ai_edge_litert") else "tflite-runtime"
        try:
            return version(dist)
        except PackageNotFoundError:
            return "unknown"

    @staticmethod
    def _library(spec: DelegateSpec) -> str | None:
        return spec.library or _DEFAULT_LIBRARIES.get(spec.name)

    def probe(self, spec: DelegateSpec) -> str | None:
        try:
            _interpreter_module()
        except RuntimeUnavailableError as exc:
            return str(exc)
        if spec.name == self.cpu_delegate:
            return None
        library = self._library(spec)
        if library is None:
            return "no delegate library configured"
        if "/" in library:
            return None if Path(library).exists() else f"library {library} not found"
        stem = library.removeprefix("lib").split(".so")[0]
        if ctypes.util.find_library(stem) is None and not _loadable(library):
            return f"library {library} not found"
        return None

    def _load(self, path: Path, spec: DelegateSpec, threads: int | None, options: Mapping[str, Any]) -> Session:
        module = _interpreter_module()
        delegates = []
        if spec.name != self.cpu_delegate:
            library = self._library(spec)
            delegates.append(module.load_delegate(library, {k: str(v) for k, v in spec.options.items()}))
        interp = module.Interpreter(model_path=str(path), num_threads=threads, experimental_delegates=delegates or None)
        return LiteRTSession(path, interp, LoadReport(delegate=spec.name))


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True
