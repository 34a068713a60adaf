"""The runtime interface: one loaded model instance behind ``Session``, one kind of runtime behind ``Backend``.

Backends implement the underscore methods; the public wrappers here own quantization,
error conversion and the delegate fallback walk, so every backend behaves the same.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import structlog

from agent.errors import InferenceError, ModelLoadError, RequestError, RuntimeUnavailableError
from agent.hardware import DelegateSpec

log = structlog.get_logger(__name__)

#: Delegates that plugins (``[agent] plugins``) add on top of a CPU session, by name: the factory
#: gets the CPU session and the profile's spec and returns the session to serve. Listed in a
#: device profile like any delegate; without the plugin, the name is just unavailable.
LAYERED_DELEGATES: dict[str, Callable[[Session, DelegateSpec], Session]] = {}


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of an integer tensor: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int

    def quantize(self, values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
        info = np.iinfo(dtype)
        q = np.round(np.asarray(values, np.float32) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        return ((values.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a model input or output; ``None`` marks a dynamic dimension."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    quantization: Quantization | None = None

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if d is None)

    def shape_list(self) -> list[int]:
        return [-1 if d is None else d for d in self.shape]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype.name, "shape": self.shape_list()}
        if self.quantization:
            out["quantization"] = {"scale": self.quantization.scale, "zero_point": self.quantization.zero_point}
        return out


@dataclass
class LoadReport:
    """Which delegate/EP a session ended up on, and why the ones before it were skipped."""

    delegate: str
    fallbacks: list[str] = field(default_factory=list)


class Session(abc.ABC):
    """One loaded model. Not thread-safe: the agent gives each session one worker thread."""

    backend: ClassVar[str]

    def __init__(self, path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 report: LoadReport) -> None:
        self.path = path
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.report = report

    @property
    def delegate(self) -> str:
        return self.report.delegate

    def run(self, feeds: Mapping[str, np.ndarray], *, raw_outputs: bool = False) -> dict[str, np.ndarray]:
        """Run one inference.

        Float feeds for quantized inputs are quantized with the tensor's scale and zero point;
        feeds already in the quantized dtype pass through. Quantized outputs are dequantized
        to float32 unless ``raw_outputs``.

        Raises:
            RequestError: a feed does not fit the model (caught before the runtime sees it).
            InferenceError: the runtime failed.
        """
        prepared: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise RequestError(f"missing input '{spec.name}'")
            prepared[spec.name] = self._prepare(spec, feeds[spec.name])
        try:
            results = self._run(prepared)
        except Exception as exc:
            raise InferenceError(f"{self.backend} inference failed: {exc}") from exc
        out: dict[str, np.ndarray] = {}
        for spec, value in zip(self.outputs, results, strict=True):
            dequantize = spec.quantization is not None and not raw_outputs
            out[spec.name] = spec.quantization.dequantize(value) if dequantize else value  # type: ignore[union-attr]
        return out

    @staticmethod
    def _prepare(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
        if spec.quantization is not None and value.dtype != spec.dtype:
            if not np.issubdtype(value.dtype, np.floating):
                raise RequestError(
                    f"input '{spec.name}': quantized {spec.dtype.name} input takes {spec.dtype.name} "
                    f"(raw) or float (quantized by the agent), got {value.dtype.name}"
                )
            return spec.quantization.quantize(value, spec.dtype)
        if value.dtype != spec.dtype:
            raise RequestError(f"input '{spec.name}': expected dtype {spec.dtype.name}, got {value.dtype.name}")
        return np.require(value, requirements="C")

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run with feeds already in the model's dtypes; return outputs in ``self.outputs`` order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources early (default: leave it to the garbage collector)."""


class Backend(abc.ABC):
    """A runtime (ONNX Runtime, LiteRT, HailoRT, RKNN) and the delegates/EPs it can use."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    #: The last resort, tried after every list. None for runtimes whose compiled models run only on
    #: their NPU (``hef``, ``rknn``): they try the listed entries, else ``default_delegate``.
    cpu_delegate: ClassVar[str | None]
    default_delegate: ClassVar[str | None] = None

    @abc.abstractmethod
    def version(self) -> str:
        """Runtime version; raises RuntimeUnavailableError when the runtime is not installed."""

    @abc.abstractmethod
    def probe(self, spec: DelegateSpec) -> str | None:
        """Return None if ``spec`` can be used on this device, else the reason it cannot."""

    @abc.abstractmethod
    def _load(self, path: Path, spec: DelegateSpec, threads: int | None, options: Mapping[str, Any]) -> Session:
        """Load ``path`` on exactly the delegate/EP ``spec``; raise on any failure."""

    def choose(self, specs: Sequence[DelegateSpec]) -> tuple[DelegateSpec, list[str]]:
        """The first usable delegate in ``specs`` (CPU last), with reasons for those skipped."""
        skipped: list[str] = []
        for spec in self._with_cpu(specs):
            reason = self._probe(spec)
            if reason is None:
                return spec, skipped
            skipped.append(f"{spec.name}: {reason}")
        raise RuntimeUnavailableError(f"{self.name}: no usable delegate ({'; '.join(skipped)})")

    def load(self, path: Path, specs: Sequence[DelegateSpec], *, threads: int | None = None,
             options: Mapping[str, Any] | None = None) -> Session:
        """Load ``path`` on the first delegate/EP of ``specs`` that works, falling back to CPU.

        Raises:
            RuntimeUnavailableError: this runtime is not installed.
            ModelLoadError: the model failed on every delegate, CPU included (path + runtime reason).
        """
        self.version()
        skipped: list[str] = []
        last_error = "no delegate tried"
        for spec in self._with_cpu(specs):
            reason = self._probe(spec)
            if reason is None:
                try:
                    session = self._load_on(path, spec, threads, options or {})
                except Exception as exc:  # noqa: BLE001 - native delegates raise anything; next one
                    reason = f"failed to load: {exc}".strip()
                    last_error = str(exc).strip() or type(exc).__name__
                else:
                    session.report.fallbacks[:0] = skipped
                    if skipped:
                        log.warning("runtime.delegate_fallback", model=str(path), delegate=spec.name,
                                    skipped=skipped)
                    return session
            skipped.append(f"{spec.name}: {reason}")
            if spec.name == self.cpu_delegate:
                break
        raise ModelLoadError(str(path), last_error)

    def _probe(self, spec: DelegateSpec) -> str | None:
        if spec.name in LAYERED_DELEGATES and self.cpu_delegate is not None:
            return None
        return self.probe(spec)

    def _load_on(self, path: Path, spec: DelegateSpec, threads: int | None, options: Mapping[str, Any]) -> Session:
        layered = LAYERED_DELEGATES.get(spec.name)
        if layered is not None and self.cpu_delegate is not None:
            return layered(self._load(path, DelegateSpec(name=self.cpu_delegate), threads, options), spec)
        return self._load(path, spec, threads, options)

    def _with_cpu(self, specs: Sequence[DelegateSpec]) -> list[DelegateSpec]:
        if self.cpu_delegate is None:
            default = [DelegateSpec(name=self.default_delegate)] if self.default_delegate else []
            return list(specs) or default
        ordered = [s for s in specs if s.name != self.cpu_delegate]
        cpu = next((s for s in specs if s.name == self.cpu_delegate), DelegateSpec(name=self.cpu_delegate))
        return [*ordered, cpu]
