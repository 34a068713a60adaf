"""HailoRT backend (runtime ``hef``): compiled ``.hef`` models on a Hailo-8 / 8L / 10H through ``hailo_platform``.

HailoRT is not a LiteRT delegate: it runs models compiled for the chip by Hailo's Dataflow Compiler
(``.hef``), so it is a runtime of its own with no CPU fallback. ``hailo_platform`` (HailoRT's Python
wheel, or ``python3-hailort`` from Raspberry Pi OS's ``hailo-all``) is imported only when a ``.hef``
model is probed or loaded; without it the runtime is unavailable and says which package is missing.

Uses HailoRT's InferModel API (HailoRT 4.18+): one ``VDevice`` per session with the round-robin
scheduler, so several models share the chip; inputs keep the HEF's format (usually uint8, quantized
on the chip), outputs are dequantized to float32 by HailoRT. Models with on-chip or host NMS outputs
are refused (their results are lists of boxes, not tensors).

Not run on a Hailo by this project's tests: only the import, selection, load-error and fallback
paths are tested (docs/device-profiles.md, "What was verified where").
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import RuntimeUnavailableError
from agent.hardware import DelegateSpec
from agent.runtimes.base import Backend, LoadReport, Session, TensorSpec

PACKAGE = "hailo_platform"
_DEFAULT_TIMEOUT_MS = 10000


def hailo_platform() -> Any:
    """The ``hailo_platform`` module; RuntimeUnavailableError naming the package if it cannot be imported."""
    try:
        import hailo_platform as module
    except Exception as exc:  # ImportError, or HailoRT's MissingPyHRTLib / version-mismatch errors
        raise RuntimeUnavailableError(
            f"the Python package {PACKAGE} (HailoRT) is not importable ({type(exc).__name__}: {exc})") from exc
    return module


def _dtype(hp: Any, format_type: Any) -> np.dtype[Any]:
    for name, dtype in (("UINT8", np.uint8), ("UINT16", np.uint16), ("FLOAT32", np.float32)):
        if format_type == getattr(hp.FormatType, name):
            return np.dtype(dtype)
    raise ValueError(f"unsupported HailoRT format type {format_type}")


class HailoSession(Session):
    """One configured ``.hef`` model; a request of N rows is N bindings in one ``run``."""

    backend = "hef"

    def __init__(self, path: Path, hp: Any, vdevice: Any, infer_model: Any, configured: Any, *,
                 report: LoadReport, timeout_ms: int) -> None:
        inputs = [TensorSpec(s.name, _dtype(hp, s.format.type), (None, *(int(d) for d in s.shape)))
                  for s in infer_model.inputs]
        outputs = [TensorSpec(s.name, np.dtype(np.float32), (None, *(int(d) for d in s.shape)))
                   for s in infer_model.outputs]
        super().__init__(path, inputs, outputs, report)
        self._vdevice = vdevice
        self._configured = configured
        self._timeout_ms = timeout_ms

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = {value.shape[0] if value.ndim else 1 for value in feeds.values()}
        if len(rows) != 1:
            raise ValueError(f"inputs have different batch sizes {sorted(rows)}")
        count = rows.pop()
        outs = {s.name: np.empty((count, *(d or 0 for d in s.shape[1:])), s.dtype) for s in self.outputs}
        bindings = [
            self._configured.create_bindings(
                input_buffers={s.name: np.ascontiguousarray(feeds[s.name][i]) for s in self.inputs},
                output_buffers={s.name: outs[s.name][i] for s in self.outputs},
            )
            for i in range(count)
        ]
        self._configured.run(bindings, self._timeout_ms)
        return [outs[s.name] for s in self.outputs]

    def close(self) -> None:
        configured, vdevice = self._configured, self._vdevice
        self._configured = self._vdevice = None
        if configured is not None:
            configured.shutdown()
        if vdevice is not None:
            vdevice.release()


class HailoBackend(Backend):
    """Runtime ``hef``: the one delegate is the Hailo device (``hailo``), options from ``[[runtimes.hef]]``."""

    name = "hef"
    suffixes = (".hef",)
    cpu_delegate = None
    default_delegate = "hailo"

    def version(self) -> str:
        hp = hailo_platform()
        try:
            return str(getattr(hp, "__version__", None) or version("hailort"))
        except PackageNotFoundError:
            return "unknown"

    def probe(self, spec: DelegateSpec) -> str | None:
        if spec.name != "hailo":
            return f"unknown Hailo delegate {spec.name!r} (the only one is 'hailo')"
        try:
            hailo_platform()
        except RuntimeUnavailableError as exc:
            return str(exc)
        return None

    def _load(self, path: Path, spec: DelegateSpec, threads: int | None, options: Mapping[str, Any]) -> Session:
        hp = hailo_platform()
        params = hp.VDevice.create_params()
        round_robin = spec.options.get("scheduling", "round-robin") != "none"
        params.scheduling_algorithm = (hp.HailoSchedulingAlgorithm.ROUND_ROBIN if round_robin
                                       else hp.HailoSchedulingAlgorithm.NONE)
        vdevice = hp.VDevice(params)
        try:
            infer_model = vdevice.create_infer_model(str(path))
            if spec.options.get("batch_size"):
                infer_model.set_batch_size(int(spec.options["batch_size"]))
            for stream in infer_model.outputs:
                if stream.is_nms:
                    raise ValueError(f"output '{stream.name}' is an NMS output (a list of boxes): "
                                     "not supported by edge-agent's hef runtime")
                stream.set_format_type(hp.FormatType.FLOAT32)
            configured = infer_model.configure()
            if not round_robin:
                configured.activate()
            return HailoSession(path, hp, vdevice, infer_model, configured, report=LoadReport(delegate=spec.name),
                                timeout_ms=int(spec.options.get("timeout_ms", _DEFAULT_TIMEOUT_MS)))
        except BaseException:
            vdevice.release()
            raise
