"""ONNX Runtime backend: execution providers chosen from the device profile, verified after load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import RuntimeUnavailableError
from agent.hardware import DelegateSpec
from agent.runtimes.base import Backend, LoadReport, Session, TensorSpec

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def _spec(arg: Any) -> TensorSpec:
    if arg.type not in _ORT_TYPES:
        raise ValueError(f"tensor '{arg.name}' has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or []))
    return TensorSpec(arg.name, np.dtype(_ORT_TYPES[arg.type]), shape)


class OnnxSession(Session):
    backend = "onnx"

    def __init__(self, path: Path, sess: Any, report: LoadReport) -> None:
        super().__init__(path, [_spec(i) for i in sess.get_inputs()], [_spec(o) for o in sess.get_outputs()], report)
        self._sess = sess
        self._names = [o.name for o in self.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._sess.run(self._names, feeds))

    def close(self) -> None:
        self._sess = None


class OnnxBackend(Backend):
    name = "onnx"
    suffixes = (".onnx",)
    cpu_delegate = "CPUExecutionProvider"

    def _ort(self) -> Any:
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeUnavailableError(f"onnxruntime is not installed: {exc}") from exc
        return onnxruntime

    def version(self) -> str:
        return str(self._ort().__version__)

    def probe(self, spec: DelegateSpec) -> str | None:
        try:
            available = self._ort().get_available_providers()
        except RuntimeUnavailableError as exc:
            return str(exc)
        if spec.name not in available:
            return f"not in this onnxruntime build (has {', '.join(available)})"
        return None

    def _load(self, path: Path, spec: DelegateSpec, threads: int | None, options: Mapping[str, Any]) -> Session:
        ort = self._ort()
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: ORT's warnings duplicate what we log
        # An explicit count also stops ONNX Runtime from pinning threads to cores, which fails (and
        # logs an error per thread) under systemd's sandbox and cgroup CPU limits.
        so.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        so.inter_op_num_threads = int(options.get("inter_op_threads", 1))
        so.enable_cpu_mem_arena = bool(options.get("memory_arena", False))
        spinning = "1" if options.get("allow_spinning", False) else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        providers: list[Any] = [(spec.name, dict(spec.options))]
        if spec.name != self.cpu_delegate:
            providers.append(self.cpu_delegate)
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        active = sess.get_providers()
        if not active or active[0] != spec.name:
            # ORT silently drops an EP it cannot initialise; treat that as a failed load.
            raise RuntimeError(f"{spec.name} was not initialised (active: {', '.join(active)})")
        return OnnxSession(path, sess, LoadReport(delegate=spec.name))
