"""The bundle manifest (``manifest.json``): a versioned, validated schema.

This module owns the schema and its validation only: pure functions of bytes, no I/O
except :meth:`Manifest.check_files`, which checks that every named file exists in an
extracted bundle. Every validation error is a :class:`ManifestError` whose ``field`` names
the offending field in the manifest's own terms (``test_vectors[0].atol``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from cloud_sync.errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
RUNTIME_SUFFIXES = {"onnx": ".onnx", "tflite": ".tflite", "hef": ".hef", "rknn": ".rknn"}
DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64")

_INTEGER_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")

Runtime = Literal["onnx", "tflite", "hef", "rknn"]  # hef: HailoRT, rknn: Rockchip NPU (compiled models)
DType = Literal["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64"]
Dim = Annotated[int, Field(ge=-1)]
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}$")
#: Deepest nesting of JSON arrays and objects a manifest may use (the schema itself needs 6).
MAX_DEPTH = 32
#: Largest ``.npy`` test-vector file (its data is read into memory while the bundle is tested).
MAX_TENSOR_FILE_BYTES = 64 << 20


def check_relative_path(value: str) -> str:
    """A bundle-relative POSIX path: no absolute path, no ``..``, no backslash, not empty."""
    if not value or value.startswith("/") or "\\" in value or "\x00" in value:
        raise ValueError(f"must be a relative path inside the bundle, got {value!r}")
    parts = PurePosixPath(value).parts
    if any(p in ("..", ".") for p in parts) or value.endswith("/"):
        raise ValueError(f"must be a relative path inside the bundle, got {value!r}")
    return value


BundlePath = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(check_relative_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Model):
    """A model input or output: ``-1`` in ``shape`` marks a dynamic dimension.

    ``allow_nonfinite`` (outputs only): NaN or infinity in this output is a valid answer. Without
    it, an answer holding one counts as a failed request in the installer's health window.
    """

    name: str = Field(min_length=1)
    dtype: DType
    shape: list[Dim]
    allow_nonfinite: StrictBool | None = None  # JSON true/false only ("yes" and 1 are errors)


class TensorValue(_Model):
    """A concrete tensor: inline ``data`` (flat, row-major) or a ``.npy`` ``file`` in the bundle."""

    dtype: DType
    shape: list[Annotated[int, Field(ge=0)]]
    data: list[Any] | None = None
    file: BundlePath | None = None

    @field_validator("file")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".npy"):
            raise ValueError("must be a .npy file")
        return value

    @model_validator(mode="after")
    def _data_or_file(self) -> TensorValue:
        if (self.data is None) == (self.file is None):
            raise ValueError("exactly one of 'data' or 'file' is required")
        if self.data is not None:
            for i, v in enumerate(self.data):
                if isinstance(v, bool) and self.dtype != "bool":
                    raise ValueError(f"data[{i}]: must be a number")
                if not isinstance(v, int | float):
                    raise ValueError(f"data[{i}]: must be a number or boolean")
            size = math.prod(self.shape)
            if len(self.data) != size:
                raise ValueError(f"data has {len(self.data)} values but shape {self.shape} needs {size}")
        return self


class TestVector(_Model):
    """Inputs, the outputs the model must produce, and the tolerance (numpy ``allclose``)."""

    __test__ = False  # not a pytest class
    inputs: dict[str, TensorValue] = Field(min_length=1)
    expected: dict[str, TensorValue] = Field(min_length=1)
    rtol: Annotated[float, Field(ge=0)] = 1e-4
    atol: Annotated[float, Field(ge=0)] = 1e-5


class Processing(BaseModel):
    """A pre/post-processing step: an object with a ``type``; the other keys belong to that type."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = Field(min_length=1)


class Constraints(_Model):
    """What a device needs to install the bundle."""

    min_agent_version: str | None = None
    runtimes: list[Runtime] = Field(default_factory=list)
    accelerators: list[str] = Field(default_factory=list)

    @field_validator("min_agent_version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and not VERSION_RE.match(value):
            raise ValueError("must be a dotted numeric version such as '0.2.0'")
        return value


class Manifest(_Model):
    """``manifest.json``, schema version 1. See docs/bundles.md for every field."""

    schema_version: Literal[1]
    name: str
    version: Annotated[int, Field(gt=0)]
    runtime: Runtime
    model: BundlePath
    files: list[BundlePath] = Field(default_factory=list)
    labels: BundlePath | None = None
    description: str | None = None
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    preprocess: Processing | None = None
    postprocess: Processing | None = None
    test_vectors: list[TestVector] = Field(default_factory=list)
    constraints: Constraints = Field(default_factory=Constraints)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must be 1-64 chars of a-z, 0-9, '.', '_', '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        # Raised as ManifestError (not ValueError) so the field path is ours, not pydantic's.
        suffix = RUNTIME_SUFFIXES[self.runtime]
        if not self.model.endswith(suffix):
            raise ManifestError(f"runtime '{self.runtime}' needs a {suffix} model file", field="model")
        if self.model == MANIFEST_NAME or MANIFEST_NAME in self.files:
            raise ManifestError(f"'{MANIFEST_NAME}' is reserved", field="files")
        self._check_specs("inputs", self.inputs)
        self._check_specs("outputs", self.outputs)
        for i, spec in enumerate(self.inputs):
            if spec.allow_nonfinite is not None:
                raise ManifestError("only outputs may allow non-finite values", field=f"inputs[{i}].allow_nonfinite")
        for i, spec in enumerate(self.outputs):
            if spec.allow_nonfinite and not spec.dtype.startswith("float"):
                raise ManifestError(f"a {spec.dtype} output cannot be non-finite",
                                    field=f"outputs[{i}].allow_nonfinite")
        for i, vector in enumerate(self.test_vectors):
            self._check_vector(i, "inputs", vector.inputs, self.inputs, exact=True)
            self._check_vector(i, "expected", vector.expected, self.outputs, exact=False)
        return self

    @staticmethod
    def _check_specs(field: str, specs: list[TensorSpec]) -> None:
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            if spec.name in seen:
                raise ManifestError(f"duplicate tensor name '{spec.name}'", field=f"{field}[{i}].name")
            seen.add(spec.name)

    @staticmethod
    def _check_vector(index: int, field: str, values: dict[str, TensorValue], specs: list[TensorSpec],
                      *, exact: bool) -> None:
        if not specs:  # no declared specs: nothing to check against
            return
        by_name = {s.name: s for s in specs}
        where = f"test_vectors[{index}].{field}"
        for name, value in values.items():
            spec = by_name.get(name)
            if spec is None:
                raise ManifestError(f"unknown tensor (declared: {', '.join(by_name)})", field=f"{where}.{name}")
            # A quantized (integer) output is compared after the device dequantizes it, so its
            # expected values may be float32.
            dequantized = not exact and value.dtype == "float32" and spec.dtype in _INTEGER_DTYPES
            if value.dtype != spec.dtype and not dequantized:
                raise ManifestError(f"dtype {value.dtype} does not match declared {spec.dtype}",
                                    field=f"{where}.{name}.dtype")
            fits = len(value.shape) == len(spec.shape) and all(
                d in (-1, v) for d, v in zip(spec.shape, value.shape, strict=True))
            if not fits:
                raise ManifestError(f"shape {value.shape} does not fit declared {spec.shape}",
                                    field=f"{where}.{name}.shape")
        missing = [n for n in by_name if n not in values]
        if exact and missing:
            raise ManifestError(f"missing input(s) {', '.join(missing)}", field=where)

    # -- helpers -----------------------------------------------------------------------------

    def referenced_files(self) -> Iterator[tuple[str, str]]:
        """``(field, path)`` for every file the manifest names, the model first."""
        yield "model", self.model
        for i, item in enumerate(self.files):
            yield f"files[{i}]", item
        if self.labels is not None:
            yield "labels", self.labels
        for i, vector in enumerate(self.test_vectors):
            for group, values in (("inputs", vector.inputs), ("expected", vector.expected)):
                for name, value in values.items():
                    if value.file is not None:
                        yield f"test_vectors[{i}].{group}.{name}.file", value.file

    def nonfinite_outputs(self) -> frozenset[str]:
        """Names of the outputs whose answers may hold NaN or infinity."""
        return frozenset(spec.name for spec in self.outputs if spec.allow_nonfinite)

    def check_files(self, root: Path) -> None:
        """Check that every named file exists as a regular file under ``root`` (an extracted bundle),
        and that each ``.npy`` test-vector file holds a plain array of its declared shape.

        Raises:
            ManifestError: naming the field whose file is missing or does not fit.
        """
        for field, rel in self.referenced_files():
            path = root / rel
            if path.is_symlink() or not path.is_file():
                raise ManifestError(f"file '{rel}' is not in the bundle", field=field)
        for i, vector in enumerate(self.test_vectors):
            for group, values in (("inputs", vector.inputs), ("expected", vector.expected)):
                for name, value in values.items():
                    if value.file is not None:
                        check_npy(root / value.file, value.shape, field=f"test_vectors[{i}].{group}.{name}.file")

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate parsed JSON.

        Raises:
            ManifestError: naming the first invalid field.
        """
        if not isinstance(data, dict):
            raise ManifestError("must be a JSON object", field=MANIFEST_NAME)
        declared = data.get("schema_version")
        if declared != SCHEMA_VERSION:
            raise ManifestError(f"unsupported schema version {declared!r} (this agent reads {SCHEMA_VERSION})",
                                field="schema_version")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _to_manifest_error(exc) from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        """Parse and validate ``manifest.json`` bytes.

        Raises:
            ManifestError: malformed JSON (field ``manifest.json``) or an invalid field.
        """
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"malformed JSON: {exc}", field=MANIFEST_NAME) from None
        except RecursionError:
            raise ManifestError(f"nested deeper than {MAX_DEPTH} levels", field=MANIFEST_NAME) from None
        if _depth(data) > MAX_DEPTH:  # pydantic and the pipelines walk processing objects recursively
            raise ManifestError(f"nested deeper than {MAX_DEPTH} levels", field=MANIFEST_NAME)
        return cls.from_dict(data)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def check_npy(path: Path, shape: list[int], *, field: str) -> None:
    """``path`` must be a ``.npy`` file of a plain numeric array of exactly ``shape``, whose size
    matches its header; only the header is read (a pickled object array is never loaded).

    Raises:
        ManifestError: naming ``field``.
    """
    import numpy as np  # only where test vectors are read

    fmt = np.lib.format
    try:
        with path.open("rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                found, _fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                found, _fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            data_bytes = path.stat().st_size - fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ManifestError(f"not a readable .npy file: {exc}", field=field) from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise ManifestError(f"holds {dtype} values, not numbers (pickled objects are refused)", field=field)
    if list(found) != list(shape):
        raise ManifestError(f"holds shape {list(found)}, the manifest declares {list(shape)}", field=field)
    if data_bytes > MAX_TENSOR_FILE_BYTES:
        raise ManifestError(f"{data_bytes} bytes is over the {MAX_TENSOR_FILE_BYTES} byte test-vector cap", field=field)
    if data_bytes != math.prod(found) * dtype.itemsize:
        raise ManifestError(f"holds {data_bytes} data bytes, its header needs {math.prod(found) * dtype.itemsize}",
                            field=field)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or MANIFEST_NAME


def _to_manifest_error(exc: ValidationError) -> ManifestError:
    err = exc.errors(include_url=False)[0]
    kind, ctx = err["type"], err.get("ctx") or {}
    messages = {
        "missing": "required",
        "extra_forbidden": "unknown field",
        "greater_than_equal": f"must be >= {ctx.get('ge', 0):g}",
        "greater_than": f"must be > {ctx.get('gt', 0):g}",
        "model_type": "must be a JSON object",
        "dict_type": "must be a JSON object",
        "list_type": "must be a JSON array",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "string_too_short": "must not be empty",
        "too_short": "must not be empty",
    }
    message = messages.get(kind) or str(err["msg"]).removeprefix("Value error, ")
    return ManifestError(message, field=_loc(tuple(err["loc"])))
