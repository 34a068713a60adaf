"""Build a bundle from a model file (or a model directory) and optional extra files.

This module must not import ``agent``: test vectors are produced by running the model
through an injected ``runner`` callable, which the CLI builds from the agent's runtimes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from cloud_sync.bundles.archive import write_archive
from cloud_sync.bundles.manifest import MANIFEST_NAME, RUNTIME_SUFFIXES, SCHEMA_VERSION, Manifest, check_npy
from cloud_sync.errors import ManifestError

log = structlog.get_logger(__name__)

Runner = Callable[[Path, dict[str, np.ndarray]], Mapping[str, np.ndarray]]
SUFFIX_RUNTIMES = {suffix: runtime for runtime, suffix in RUNTIME_SUFFIXES.items()}


def bundle_file_name(name: str, version: int) -> str:
    """The archive file name, which is also the TUF target's base name."""
    return f"{name}-{version}.bundle"


def runtime_for(model_path: Path) -> str:
    """``onnx`` or ``tflite`` from the file suffix.

    Raises:
        ManifestError: unknown suffix.
    """
    runtime = SUFFIX_RUNTIMES.get(model_path.suffix.lower())
    if runtime is None:
        raise ManifestError(f"cannot tell the runtime from '{model_path.name}' (expected .onnx or .tflite)",
                            field="runtime")
    return runtime


def find_model(model_dir: Path) -> Path:
    found = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix.lower() in SUFFIX_RUNTIMES)
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise ManifestError(f"{what} .onnx/.tflite model file in {model_dir}", field="model")
    return found[0]


def build_bundle(model_path: Path, out_dir: Path, *, name: str, version: int, runtime: str | None = None,
                 files: Iterable[Path] = (), manifest_extra: Mapping[str, Any] | None = None,
                 test_vectors: Sequence[Mapping[str, Any]] | None = None, compress: bool = True) -> Path:
    """Write ``out_dir/<name>-<version>.bundle`` and return its path.

    ``model_path`` is a model file, or a directory holding exactly one model file plus any
    other files to include (and optionally a ``manifest.json`` whose fields are used as
    defaults). The model is stored as ``model.onnx`` / ``model.tflite`` so an installed
    bundle matches the models-directory layout; extra files keep their base names.
    ``manifest_extra`` adds or overrides manifest fields (inputs, outputs, preprocess, ...).

    Raises:
        ManifestError: the resulting manifest is invalid or names a file not supplied.
        FileNotFoundError: ``model_path`` or one of ``files`` does not exist.
    """
    model_path = Path(model_path)
    sources: dict[str, Path] = {}
    base: dict[str, Any] = {}
    if model_path.is_dir():
        model_dir = model_path
        model_path = find_model(model_dir)
        for item in sorted(model_dir.rglob("*")):
            rel = item.relative_to(model_dir).as_posix()
            if item.is_file() and not item.is_symlink() and item != model_path and rel != MANIFEST_NAME:
                sources[rel] = item
        if (model_dir / MANIFEST_NAME).is_file():
            base = json.loads((model_dir / MANIFEST_NAME).read_text())
    elif not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    runtime = runtime or runtime_for(model_path)
    model_name = f"model{RUNTIME_SUFFIXES.get(runtime, model_path.suffix)}"
    sources[model_name] = model_path
    for item in files:
        extra = Path(item)
        if not extra.is_file():
            raise FileNotFoundError(f"file not found: {extra}")
        sources[extra.name] = extra
    data: dict[str, Any] = {**base, **dict(manifest_extra or {})}
    data.update(schema_version=SCHEMA_VERSION, name=name, version=version, runtime=runtime, model=model_name)
    listed = [f for f in sources if f != model_name]
    data["files"] = sorted(set(data.get("files", [])) | set(listed))
    if test_vectors is not None:
        data["test_vectors"] = list(test_vectors)
    manifest = Manifest.from_dict(data)
    out = write_archive(Path(out_dir) / bundle_file_name(name, version), manifest, sources, compress=compress)
    log.info("bundle.built", name=name, version=version, runtime=runtime, path=str(out),
             bytes=out.stat().st_size, files=len(sources))
    return out


def tensor_value(array: np.ndarray) -> dict[str, Any]:
    """An inline manifest tensor (``dtype``, ``shape``, flat ``data``) from a numpy array."""
    array = np.asarray(array)
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.reshape(-1).tolist()}


def tensor_array(value: Mapping[str, Any], root: Path | None = None, *, field: str = "tensor") -> np.ndarray:
    """The numpy array a manifest tensor describes (``file`` is read from ``root``).

    Raises:
        ManifestError: naming ``field``: a file that is not a plain numeric ``.npy`` array of the
            declared shape (checked from its header before its data is read), or inline data
            that does not fit the dtype.
    """
    if value.get("file") is not None:
        if root is None:
            raise ValueError("a file tensor needs the bundle root")
        path = root / value["file"]
        check_npy(path, value["shape"], field=f"{field}.file")
        try:
            array = np.load(path, allow_pickle=False)
            return np.asarray(array, dtype=value["dtype"]).reshape(value["shape"])
        except (ValueError, OSError, EOFError) as exc:  # changed since checked, or data past the header is bad
            raise ManifestError(f"not a readable .npy file: {exc}", field=f"{field}.file") from None
    try:
        return np.asarray(value["data"], dtype=value["dtype"]).reshape(value["shape"])
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. 1000 for an int8 tensor
        raise ManifestError(f"data does not fit {value['dtype']}: {exc}", field=f"{field}.data") from None


def generate_test_vectors(model_path: Path, inputs: Mapping[str, np.ndarray], runner: Runner, *,
                          rtol: float = 1e-4, atol: float = 1e-5) -> list[dict[str, Any]]:
    """Run the model once on ``inputs`` and record the outputs as one test vector.

    ``runner(model_path, feeds) -> {output name: array}`` is injected (the CLI builds it from
    the agent's runtime for the model's suffix), so this module never imports ``agent``.
    """
    feeds = {name: np.asarray(value) for name, value in inputs.items()}
    outputs = runner(Path(model_path), feeds)
    vector = {
        "inputs": {name: tensor_value(value) for name, value in feeds.items()},
        "expected": {name: tensor_value(np.asarray(value)) for name, value in outputs.items()},
        "rtol": rtol,
        "atol": atol,
    }
    log.info("bundle.test_vector_generated", model=str(model_path), inputs=list(feeds), outputs=list(outputs))
    return [vector]
