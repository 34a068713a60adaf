"""RKNN backend (runtime ``rknn``): ``.rknn`` models on a Rockchip NPU through ``rknnlite`` (rknn-toolkit-lite2).

An ``.rknn`` model is converted for one SoC by rknn-toolkit2 and runs only on that SoC's NPU, so this is
a runtime of its own with no CPU fallback. ``rknnlite`` is imported only when an ``.rknn`` model is
probed or loaded; it needs Rockchip's ``librknnrt.so`` and the vendor RKNPU kernel driver.

rknn-toolkit-lite2 cannot describe a model's tensors, so the inputs and outputs come from the
bundle's ``manifest.json`` next to the model (the installer keeps it there); a model without one
does not load. The delegate is the NPU (``npu``); its ``core_mask`` option picks the cores
(RK3588: ``0_1_2`` for all three; ``auto`` leaves it to the driver, the only choice on RK3566/3568).

Not run on a Rockchip NPU by this project's tests: only the import, selection, load-error and
fallback paths are tested (docs/device-profiles.md, "What was verified where").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agent.errors import RuntimeUnavailableError
from agent.hardware import DelegateSpec
from agent.hardware.profiles import RKNN_CORE_MASKS
from agent.runtimes.base import Backend, LoadReport, Session, TensorSpec

PACKAGE = "rknnlite"
DISTRIBUTION = "rknn-toolkit-lite2"
MANIFEST = "manifest.json"
_CORE_MASK_ATTRS = {"auto": "NPU_CORE_AUTO", "0": "NPU_CORE_0", "1": "NPU_CORE_1", "2": "NPU_CORE_2",
                    "0_1": "NPU_CORE_0_1", "0_1_2": "NPU_CORE_0_1_2", "all": "NPU_CORE_ALL"}


def rknnlite() -> Any:
    """The ``RKNNLite`` class; RuntimeUnavailableError naming the package if it cannot be imported."""
    try:
        from rknnlite.api import RKNNLite
    except Exception as exc:  # ImportError, or librknnrt.so failing to load inside it
        raise RuntimeUnavailableError(f"the Python package {PACKAGE} ({DISTRIBUTION}) is not importable "
                                      f"({type(exc).__name__}: {exc})") from exc
    return RKNNLite


def manifest_specs(model: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs declared by ``manifest.json`` beside ``model``.

    Raises:
        ValueError: no manifest, or one without inputs and outputs.
    """
    try:
        data = orjson.loads((model.parent / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"an .rknn model needs {MANIFEST} beside it declaring its inputs and outputs "
                         f"(rknnlite cannot describe a model): {exc}") from exc

    def specs(key: str) -> list[TensorSpec]:
        entries = data.get(key) if isinstance(data, dict) else None
        if not entries:
            raise ValueError(f"{MANIFEST} declares no {key}: an .rknn model needs them (rknnlite cannot describe it)")
        return [TensorSpec(str(e["name"]), np.dtype(e["dtype"]), tuple(None if d < 0 else int(d) for d in e["shape"]))
                for e in entries]

    return specs("inputs"), specs("outputs")


class RknnSession(Session):
    backend = "rknn"

    def __init__(self, path: Path, rknn: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 report: LoadReport) -> None:
        super().__init__(path, inputs, outputs, report)
        self._rknn = rknn

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._rknn.inference(inputs=[feeds[s.name] for s in self.inputs])
        if results is None or len(results) != len(self.outputs):
            raise RuntimeError(f"rknnlite returned {0 if results is None else len(results)} outputs, "
                               f"{len(self.outputs)} declared")
        return [np.asarray(r) for r in results]

    def close(self) -> None:
        rknn, self._rknn = self._rknn, None
        if rknn is not None:
            rknn.release()


class RknnBackend(Backend):
    """Runtime ``rknn``: the one delegate is the NPU (``npu``), with a ``core_mask`` option."""

    name = "rknn"
    suffixes = (".rknn",)
    cpu_delegate = None
    default_delegate = "npu"

    def version(self) -> str:
        rknnlite()
        try:
            return version(DISTRIBUTION)
        except PackageNotFoundError:
            return "unknown"

    def probe(self, spec: DelegateSpec) -> str | None:
        if spec.name != "npu":
            return f"unknown RKNN delegate {spec.name!r} (the only one is 'npu')"
        mask = str(spec.options.get("core_mask", "auto"))
        if mask not in RKNN_CORE_MASKS:
            return f"unknown core_mask {mask!r} (one of {', '.join(RKNN_CORE_MASKS)})"
        try:
            rknnlite()
        except RuntimeUnavailableError as exc:
            return str(exc)
        return None

    def _load(self, path: Path, spec: DelegateSpec, threads: int | None, options: Mapping[str, Any]) -> Session:
        inputs, outputs = manifest_specs(path)
        cls = rknnlite()
        rknn = cls()
        try:
            ret = rknn.load_rknn(str(path))
            if ret != 0:
                raise RuntimeError(f"load_rknn returned {ret}")
            mask = str(spec.options.get("core_mask", "auto"))
            ret = rknn.init_runtime() if mask == "auto" else rknn.init_runtime(
                core_mask=getattr(cls, _CORE_MASK_ATTRS[mask]))
            if ret != 0:
                raise RuntimeError(f"init_runtime(core_mask={mask}) returned {ret} (a model converted for another "
                                   "SoC, a core this SoC lacks, or no RKNPU driver)")
        except BaseException:
            rknn.release()
            raise
        return RknnSession(path, rknn, inputs, outputs, LoadReport(delegate=spec.name))
