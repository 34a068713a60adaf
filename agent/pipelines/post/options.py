"""Reading a processor's manifest options and checking them against the model's tensors.

Every error names the option as ``preprocess.<key>`` / ``postprocess.<key>`` and the
mismatch, so a bad manifest is rejected at install with a message that says what to fix.
Unknown options are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.pipelines.base import PipelineError
from agent.runtimes.base import TensorSpec

_MISSING: Any = object()


class Options:
    """One processor's options; each ``get_*`` marks its key as used, ``finish`` rejects the rest."""

    def __init__(self, spec: Mapping[str, Any], where: str) -> None:
        if not isinstance(spec, Mapping):
            raise PipelineError(f"{where}: must be an object with a 'type', got {type(spec).__name__}")
        self.spec = dict(spec)
        self.where = where
        self._used = {"type"}

    def error(self, key: str, reason: str) -> PipelineError:
        return PipelineError(f"{self.where}.{key}: {reason}")

    def has(self, key: str) -> bool:
        return key in self.spec

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self._used.add(key)
        if key in self.spec and self.spec[key] is not None:
            return self.spec[key]
        if default is _MISSING:
            raise self.error(key, "required")
        return default

    def get_str(self, key: str, default: Any = _MISSING, choices: Sequence[str] | None = None) -> Any:
        value = self.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def get_float(
        self, key: str, default: Any = _MISSING, *, min: float | None = None, max: float | None = None
    ) -> Any:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        if (min is not None and value < min) or (max is not None and value > max):
            raise self.error(key, f"must be in [{min}, {max}], got {value!r}")
        return float(value)

    def get_int(self, key: str, default: Any = _MISSING, *, min: int | None = None) -> Any:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        if min is not None and value < min:
            raise self.error(key, f"must be >= {min}, got {value!r}")
        return value

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def get_floats(self, key: str, default: Any = _MISSING, length: int | None = None) -> Any:
        value = self.get(key, default)
        if value is None:
            return None
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise self.error(key, f"must be a non-empty list of numbers, got {value!r}")
        if length is not None and len(value) != length:
            raise self.error(key, f"must have {length} values, got {len(value)}")
        return [float(v) for v in value]

    def get_mapping(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value is not None and not isinstance(value, Mapping):
            raise self.error(key, f"must be an object, got {value!r}")
        return value

    def finish(self) -> None:
        """Raises PipelineError for options this processor does not know."""
        unknown = sorted(set(self.spec) - self._used)
        if unknown:
            raise self.error(unknown[0], f"unknown option for type {self.spec.get('type')!r}")


def find_tensor(
    opts: Options, key: str, tensors: Sequence[TensorSpec], what: str, default: str | None = None
) -> TensorSpec:
    """The tensor named by option ``key`` (or ``default``), or a PipelineError listing the model's names."""
    name = opts.get_str(key, default)
    for spec in tensors:
        if spec.name == name:
            return spec
    known = ", ".join(repr(t.name) for t in tensors)
    raise opts.error(key, f"{name!r} is not a model {what} (model {what}s: {known})")


def only_tensor(opts: Options, key: str, tensors: Sequence[TensorSpec], what: str) -> TensorSpec:
    """Option ``key`` if given, else the model's only ``what``."""
    if opts.has(key) or len(tensors) != 1:
        if not opts.has(key):
            raise opts.error(
                key, f"required: the model has {len(tensors)} {what}s ({', '.join(t.name for t in tensors)})"
            )
        return find_tensor(opts, key, tensors, what)
    opts.get(key, None)
    return tensors[0]
