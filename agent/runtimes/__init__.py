"""Runtime backends by name (``onnx``, ``tflite``) and by model file suffix."""

from __future__ import annotations

from pathlib import Path

from agent.errors import RuntimeUnavailableError
from agent.runtimes.base import Backend, LoadReport, Quantization, Session, TensorSpec
from agent.runtimes.litert import LiteRTBackend
from agent.runtimes.onnx import OnnxBackend

BACKENDS: dict[str, type[Backend]] = {OnnxBackend.name: OnnxBackend, LiteRTBackend.name: LiteRTBackend}
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
