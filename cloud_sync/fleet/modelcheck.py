"""Fleet-side model check: load an ONNX or TFLite file with the runtime's own Python package
(``onnxruntime``, ``ai_edge_litert``), read its input/output specs, run a test input.

This is what ``bundle build --describe/--test-input`` and model uploads use to describe a model
and to record the test vector a device must reproduce, so it follows the device's conventions
without importing ``agent``: dynamic dimensions are ``-1``; float feeds for quantized (integer)
inputs are quantized with the tensor's scale and zero point; quantized outputs are dequantized
to float32. Loading runs on the CPU (ONNX Runtime's CPU provider, LiteRT's default XNNPACK).

A runtime parsing a hostile or truncated file may crash the process, so the upload pipeline
calls :func:`check_isolated`, which runs the check in a child process with a memory cap and a
timeout (``python -m cloud_sync.fleet.modelcheck``); ``bundle build`` loads in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.bundles.build import runtime_for
from cloud_sync.errors import BadTestInputError, CloudSyncError, ModelCheckTimeoutError, NotAModelError

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
TFLITE_MAGIC = b"TFL3"  # flatbuffer file identifier, bytes 4..8
ONLY_INPUT = ""  # feeds key of a single unnamed test input (a plain .npy): the model's only input


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the manifest describes it; ``-1`` marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: float | None = None  # affine quantization of an integer tensor: real = (q - zero_point) * scale
    zero_point: int = 0

    def spec(self) -> dict[str, Any]:
        """The manifest's ``inputs``/``outputs`` entry."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec(), "scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorInfo:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]), data.get("scale"),
                   int(data.get("zero_point", 0)))


class LoadedModel:
    """A model loaded on the CPU: ``inputs``, ``outputs``, ``run(feeds)``. Not thread-safe."""

    def __init__(self, runtime: str, path: Path, impl: Any, inputs: list[TensorInfo], outputs: list[TensorInfo],
                 ) -> None:
        self.runtime = runtime
        self.path = path
        self._impl = impl
        self.inputs = inputs
        self.outputs = outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for ``feeds`` (one per input, by name; ``""`` for a single-input model).

        Raises:
            BadTestInputError: a feed is missing, unknown, of the wrong dtype or shape, or the run failed.
        """
        prepared = self.prepare(feeds)
        try:
            raw = self._run_onnx(prepared) if self.runtime == "onnx" else self._run_tflite(prepared)
        except Exception as exc:  # noqa: BLE001 - native runtimes raise anything for a bad shape
            raise BadTestInputError(f"the model failed on the test input: {_one_line(exc)}", field="test_input") \
                from None
        out: dict[str, np.ndarray] = {}
        for info, value in zip(self.outputs, raw, strict=True):
            array = np.asarray(value)
            if info.scale and np.issubdtype(array.dtype, np.integer):
                array = ((array.astype(np.float32) - info.zero_point) * info.scale).astype(np.float32)
            out[info.name] = array
        return out

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays the runtime is given: by input name, quantized where the input is.

        Raises:
            BadTestInputError: as :meth:`run`.
        """
        feeds = dict(feeds)
        if list(feeds) == [ONLY_INPUT]:
            if len(self.inputs) != 1:
                names = ", ".join(i.name for i in self.inputs)
                raise BadTestInputError(f"the model has {len(self.inputs)} inputs ({names}): send an .npz file "
                                        "with one array per input name", field="test_input")
            feeds = {self.inputs[0].name: feeds[ONLY_INPUT]}
        unknown = sorted(set(feeds) - {i.name for i in self.inputs})
        if unknown:
            raise BadTestInputError(f"unknown input '{unknown[0]}' (inputs: {', '.join(i.name for i in self.inputs)})",
                                    field="test_input")
        prepared: dict[str, np.ndarray] = {}
        for info in self.inputs:
            if info.name not in feeds:
                raise BadTestInputError(f"missing input '{info.name}'", field="test_input")
            value = np.asarray(feeds[info.name])
            want = np.dtype(info.dtype)
            if info.scale and np.issubdtype(want, np.integer) and np.issubdtype(value.dtype, np.floating):
                limits = np.iinfo(want)
                quantized = np.round(value.astype(np.float32) / info.scale) + info.zero_point
                value = np.clip(quantized, limits.min, limits.max).astype(want)
            if value.dtype != want:
                raise BadTestInputError(f"input '{info.name}': expected dtype {want.name}, got {value.dtype.name}",
                                        field="test_input")
            fits = len(value.shape) == len(info.shape) and all(
                d in (-1, v) for d, v in zip(info.shape, value.shape, strict=True))
            if not fits:
                raise BadTestInputError(f"input '{info.name}': shape {list(value.shape)} does not fit "
                                        f"{list(info.shape)}", field="test_input")
            prepared[info.name] = np.require(value, requirements="C")
        return prepared

    def _run_onnx(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        return list(self._impl.run([o.name for o in self.outputs], feeds))

    def _run_tflite(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        interp = self._impl
        details = interp.get_input_details()
        resized = False
        for detail in details:
            value = feeds[detail["name"]]
            if tuple(detail["shape"]) != value.shape:
                interp.resize_tensor_input(detail["index"], value.shape, strict=True)
                resized = True
        if resized:
            interp.allocate_tensors()
        for detail in details:
            interp.set_tensor(detail["index"], feeds[detail["name"]])
        interp.invoke()
        return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


def sniff_runtime(path: Path, filename: str | None = None) -> str:
    """``onnx`` or ``tflite``: by the file name's suffix, else by the TFLite file identifier."""
    for name in (filename, path.name):
        if name and Path(name).suffix.lower() in (".onnx", ".tflite"):
            return runtime_for(Path(name))
    with path.open("rb") as fh:
        head = fh.read(8)
    return "tflite" if head[4:8] == TFLITE_MAGIC else "onnx"


def load_model(path: Path, runtime: str | None = None, *, threads: int = 1) -> LoadedModel:
    """Load ``path`` with ONNX Runtime or LiteRT on the CPU.

    Raises:
        NotAModelError: the runtime cannot load it (or the runtime package is missing).
    """
    runtime = runtime or sniff_runtime(path)
    try:
        return _load_onnx(path, threads) if runtime == "onnx" else _load_tflite(path, threads)
    except CloudSyncError:
        raise
    except Exception as exc:  # noqa: BLE001 - runtimes raise their own types (and RuntimeError, ValueError)
        raise NotAModelError(f"{runtime} cannot load {path.name}: {_one_line(exc)}") from None


def _load_onnx(path: Path, threads: int) -> LoadedModel:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise NotAModelError(f"onnxruntime is not installed: {exc}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def info(arg: Any) -> TensorInfo:
        if arg.type not in _ORT_TYPES:
            raise NotAModelError(f"tensor '{arg.name}' has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        return TensorInfo(arg.name, _ORT_TYPES[arg.type], shape)

    return LoadedModel("onnx", path, session, [info(i) for i in session.get_inputs()],
                       [info(o) for o in session.get_outputs()])


def _load_tflite(path: Path, threads: int) -> LoadedModel:
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError as exc:
        raise NotAModelError(f"ai-edge-litert is not installed: {exc}") from None
    interp = litert.Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()

    def info(detail: Mapping[str, Any]) -> TensorInfo:
        signature = detail.get("shape_signature")
        dims = signature if signature is not None and len(signature) else detail["shape"]
        dtype = np.dtype(detail["dtype"])
        scale, zero_point = detail.get("quantization", (0.0, 0))
        quantized = bool(scale) and np.issubdtype(dtype, np.integer)
        return TensorInfo(detail["name"], dtype.name, tuple(int(d) if d >= 0 else -1 for d in dims),
                          float(scale) if quantized else None, int(zero_point) if quantized else 0)

    return LoadedModel("tflite", path, interp, [info(d) for d in interp.get_input_details()],
                       [info(d) for d in interp.get_output_details()])


# -- isolation: the check in a child process -----------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    runtime: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    feeds: dict[str, np.ndarray]  # the test input as the model was given it (by name, quantized); {} without one
    results: dict[str, np.ndarray]  # outputs for ``feeds``

    def specs(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [i.spec() for i in self.inputs], "outputs": [o.spec() for o in self.outputs]}


def check_isolated(path: Path, runtime: str, feeds: Mapping[str, np.ndarray] | None = None, *,
                   timeout_s: float = 120.0, memory_bytes: int = 8 << 30) -> CheckResult:
    """Load ``path`` (and run ``feeds``) in a child process capped at ``memory_bytes`` of address space.

    Raises:
        NotAModelError: it cannot be loaded, or the runtime crashed or ran out of memory on it.
        BadTestInputError: the feeds do not fit the model, or running them failed.
        ModelCheckTimeoutError: it took longer than ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="edge-fleet-check-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "cloud_sync.fleet.modelcheck", str(path), "--runtime", runtime,
               "--out", str(work), "--memory-bytes", str(memory_bytes)]
        if feeds:
            np.savez(work / "feeds.npz", allow_pickle=False, **{f"in_{i}": v for i, v in enumerate(feeds.values())})
            (work / "feed_names.json").write_text(json.dumps(list(feeds)))
            cmd += ["--feeds", str(work / "feeds.npz")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise ModelCheckTimeoutError(f"loading and running the model took more than {timeout_s:g} s") from None
        result = work / "result.json"
        if proc.returncode == 0 and result.is_file():
            data = json.loads(result.read_text())
            given: dict[str, np.ndarray] = {}
            outputs: dict[str, np.ndarray] = {}
            if feeds:
                with np.load(work / "outputs.npz", allow_pickle=False) as npz:
                    outputs = {name: npz[f"out_{i}"] for i, name in enumerate(data["output_names"])}
                    given = {name: npz[f"in_{i}"] for i, name in enumerate(data["input_names"])}
            return CheckResult(data["runtime"], [TensorInfo.from_dict(t) for t in data["inputs"]],
                               [TensorInfo.from_dict(t) for t in data["outputs"]], given, outputs)
        error = work / "error.json"
        if error.is_file():
            failure = json.loads(error.read_text())
            cls = BadTestInputError if failure.get("code") == BadTestInputError.code else NotAModelError
            raise cls(failure.get("message", "the model check failed"), field=failure.get("field"))
        if proc.returncode < 0:
            raise NotAModelError(f"the {runtime} runtime crashed on this file (signal {-proc.returncode}): "
                                 "not a valid model")
        stderr = proc.stderr.decode(errors="replace").strip()
        detail = _one_line(stderr.splitlines()[-1] if stderr else "no output")
        if "MemoryError" in stderr or "bad_alloc" in stderr:
            raise NotAModelError(f"loading the model needs more than {memory_bytes} bytes of memory")
        raise NotAModelError(f"the model check failed (exit {proc.returncode}): {detail}")


def _child(argv: Sequence[str] | None = None) -> int:
    """``python -m cloud_sync.fleet.modelcheck MODEL --runtime R --out DIR [--feeds F.npz]``."""
    parser = argparse.ArgumentParser(prog="python -m cloud_sync.fleet.modelcheck")
    parser.add_argument("model", type=Path)
    parser.add_argument("--runtime", choices=("onnx", "tflite"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--feeds", type=Path)
    parser.add_argument("--memory-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    if args.memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    try:
        model = load_model(args.model, args.runtime)
        result: dict[str, Any] = {"runtime": model.runtime, "inputs": [i.to_dict() for i in model.inputs],
                                  "outputs": [o.to_dict() for o in model.outputs], "output_names": [],
                                  "input_names": []}
        if args.feeds:
            names = json.loads((args.feeds.parent / "feed_names.json").read_text())
            with np.load(args.feeds, allow_pickle=False) as npz:
                feeds = model.prepare({name: npz[f"in_{i}"] for i, name in enumerate(names)})
            outputs = model.run(feeds)
            result["output_names"], result["input_names"] = list(outputs), list(feeds)
            np.savez(args.out / "outputs.npz", allow_pickle=False,
                     **{f"out_{i}": v for i, v in enumerate(outputs.values())},
                     **{f"in_{i}": v for i, v in enumerate(feeds.values())})
    except (NotAModelError, BadTestInputError) as exc:
        (args.out / "error.json").write_text(json.dumps({"code": exc.code, "message": exc.reason,
                                                         "field": exc.field}))
        return 1
    except MemoryError:
        (args.out / "error.json").write_text(json.dumps({"code": NotAModelError.code, "message":
                                                         f"loading the model needs more than {args.memory_bytes} "
                                                         "bytes of memory"}))
        return 1
    (args.out / "result.json").write_text(json.dumps(result))
    return 0


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]


if __name__ == "__main__":
    sys.exit(_child())
