"""ONNX Runtime backend: execution providers chosen from the device profile, verified after load."""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.errors import RuntimeUnavailableError
from agent.hardware import DelegateSpec
from agent.runtimes.base import Backend, LoadReport, Session, TensorSpec

log = structlog.get_logger(__name__)

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
        # Linux wheels since 1.29 collect usage telemetry by default: a thread, a SQLite file under
        # ~/.cache and ~2 MB of memory on a device that must not phone home. Read at import only.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
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
        providers: list[Any] = [(spec.name, dict(spec.options))]
        if spec.name != self.cpu_delegate:
            providers.append(self.cpu_delegate)
        cache_dir = options.get("cache_dir")
        cached = _cached_model(ort, path, Path(cache_dir)) if cache_dir and spec.name == self.cpu_delegate else None
        sess = None
        if cached is not None and cached.is_file():
            try:
                so = self._options(ort, threads, options)
                so.add_session_config_entry("session.load_model_format", "ORT")
                sess = ort.InferenceSession(str(cached), sess_options=so, providers=providers)
            except Exception as exc:  # noqa: BLE001 - a bad cache entry must never stop the model: rebuild it
                log.warning("runtime.cache_unusable", model=str(path), cache=str(cached), reason=str(exc))
                cached.unlink(missing_ok=True)
                sess = None
        if sess is None:
            so = self._options(ort, threads, options)
            tmp = None
            if cached is not None:  # this load also writes the optimised graph for the next one
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
                so.optimized_model_filepath = str(tmp)
                so.add_session_config_entry("session.save_model_format", "ORT")
            try:
                sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
            finally:
                if tmp is not None and cached is not None:
                    _publish(tmp, cached)
        active = sess.get_providers()
        if not active or active[0] != spec.name:
            # ORT silently drops an EP it cannot initialise; treat that as a failed load.
            raise RuntimeError(f"{spec.name} was not initialised (active: {', '.join(active)})")
        return OnnxSession(path, sess, LoadReport(delegate=spec.name))

    @staticmethod
    def _options(ort: Any, threads: int | None, options: Mapping[str, Any]) -> Any:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: ORT's warnings duplicate what we log
        # An explicit count also stops ONNX Runtime from pinning threads to cores, which fails (and
        # logs an error per thread) under systemd's sandbox and cgroup CPU limits.
        so.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        so.inter_op_num_threads = int(options.get("inter_op_threads", 1))
        so.enable_cpu_mem_arena = bool(options.get("memory_arena", False))
        spinning = "1" if options.get("allow_spinning", False) else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        return so


def _cpu_signature() -> str:
    """What an optimised graph may depend on besides the model: architecture and CPU features."""
    flags = ""
    try:
        with Path("/proc/cpuinfo").open() as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}:{flags.split(':', 1)[-1].strip()}"


def _cached_model(ort: Any, path: Path, cache_dir: Path) -> Path | None:
    """Where the optimised copy of ``path`` lives: keyed by its bytes, ONNX Runtime's version and the CPU."""
    try:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    digest.update(f"|{ort.__version__}|{_cpu_signature()}".encode())
    return cache_dir / "onnx" / f"{digest.hexdigest()[:32]}.ort"


def _publish(tmp: Path, cached: Path) -> None:
    """Move a freshly written optimised graph into place (atomic), or drop a partial one."""
    try:
        if tmp.is_file() and tmp.stat().st_size > 0:
            tmp.replace(cached)
        else:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("runtime.cache_not_written", cache=str(cached), reason=str(exc))
        tmp.unlink(missing_ok=True)
