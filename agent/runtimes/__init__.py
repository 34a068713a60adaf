"""Runtime backends by name (``onnx``, ``tflite``, ``hef``, ``rknn``) and by model file suffix.

Every backend is registered whatever is installed: each imports its runtime package only when a
model is probed or loaded, and is "unavailable" (with the package named) where it is missing.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import RuntimeUnavailableError
from agent.runtimes.base import Backend, LoadReport, Quantization, Session, TensorSpec
from agent.runtimes.hailo import HailoBackend
from agent.runtimes.litert import LiteRTBackend
from agent.runtimes.onnx import OnnxBackend
from agent.runtimes.rknn import RknnBackend

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (OnnxBackend, LiteRTBackend, HailoBackend, RknnBackend)
}
MODEL_FILES = {f"model{suffix}": name for name, cls in BACKENDS.items() for suffix in cls.suffixes}


def get_backend(name: str) -> Backend:
    """Raises RuntimeUnavailableError for a runtime this agent does not know."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise RuntimeUnavailableError(f"unknown runtime {name!r} (known: {', '.join(BACKENDS)})") from None


def backend_for_file(path: Path) -> Backend:
    for cls in BACKENDS.values():
        if path.suffix in cls.suffixes:
            return cls()
    raise RuntimeUnavailableError(f"no runtime for {path.name} (expected {', '.join(MODEL_FILES)})")


__all__ = ["BACKENDS", "MODEL_FILES", "Backend", "LoadReport", "Quantization", "Session", "TensorSpec",
           "backend_for_file", "get_backend"]
