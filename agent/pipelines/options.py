"""Processing options: the pydantic base of every pre/post-processor's options, and what they share.

A processor's options model checks what can be checked without the model (types, ranges,
choices, unknown keys); its constructor checks the rest against the model's tensors. Every error
names the option as ``preprocess.<key>`` / ``postprocess.<key>`` and says what is wrong, so a bad
manifest is rejected at install and a bad stream config at start-up. Unknown options are errors:
a typo must not silently fall back to a default.

``Overrides`` validates a stream's ``pre``/``post`` table, which overrides the manifest key by key
and so may be partial. Nothing here runs a model or does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, create_model
from pydantic import model_validator as _model_validator
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from agent.pipelines.base import PipelineError
from agent.validation import discriminated_union, error_key, type_tags

if TYPE_CHECKING:
    from agent.pipelines.base import Registry
    from agent.runtimes.base import TensorSpec

# Strict scalars: a manifest's "5" is not a number and 1 is not true, as in JSON Schema. A float
# field takes integers.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Numbers = Annotated[tuple[Number, ...], Field(min_length=1)]
"""A non-empty list of numbers (JSON arrays and TOML lists)."""


class Section(BaseModel):
    """A table of options: frozen, unknown keys are errors, ``null`` means "the default"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @_model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and any(v is None for v in data.values()):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ProcessorOptions(Section):
    """Base of a processor's options; a subclass narrows ``type`` to ``Literal["its type"]``."""

    type: str


def option_error(where: str, key: str, reason: str) -> PipelineError:
    """``PipelineError("preprocess.size: ...")``: the one shape of every processing option error."""
    return PipelineError(f"{where}.{key}: {reason}")


_WHAT = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}
_BOUND = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _reason(err: ErrorDetails, model: type[BaseModel], key: str) -> str:
    """What is wrong, in manifest terms ("must be >= 1, got 0"), for option ``key`` of ``model``."""
    kind, got, ctx = err["type"], err.get("input"), err.get("ctx", {})
    if kind == "extra_forbidden":
        return f"unknown option for type {type_tags(model)[0]!r}" if "." not in key else "unknown option"
    if kind == "missing":
        field = model.model_fields.get(key)
        choices = _choices(field.annotation) if field is not None else None
        return f"required: {' or '.join(choices)}" if choices else "required"
    if kind == "literal_error":
        expected = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return f"must be one of {expected}, got {got!r}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in _WHAT:
        return f"must be {_WHAT[kind]}, got {got!r}"
    if kind in _BOUND:
        bound = next(v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt"))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {_BOUND[kind]} {bound}, got {got!r}"
    if kind in ("too_short", "too_long"):
        limit = ctx.get("min_length", ctx.get("max_length"))
        bound = "at least" if kind == "too_short" else "at most"
        return f"must have {bound} {limit} values, got {ctx.get('actual_length')}"
    return f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {got!r}"


def _choices(annotation: Any) -> tuple[str, ...] | None:
    return tuple(str(a) for a in get_args(annotation)) if get_origin(annotation) is Literal else None


def parse_options(registry: Registry[Any], spec: Mapping[str, Any] | ProcessorOptions, where: str) -> ProcessorOptions:
    """The options model of ``spec``'s type, validated.

    Raises:
        PipelineError: no or unknown ``type`` (lists the known ones), or an option that is unknown,
            missing or invalid (named as ``<where>.<key>``).
    """
    if isinstance(spec, ProcessorOptions):
        return spec
    if not isinstance(spec, Mapping):
        raise PipelineError(f"{where}: must be an object with a 'type', got {type(spec).__name__}")
    kind = spec.get("type")
    if kind is None:
        raise option_error(where, "type", "required")
    if not isinstance(kind, str):
        raise option_error(where, "type", f"must be a string, got {kind!r}")
    model: type[ProcessorOptions] = registry.get_class(kind).Options
    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = error_key(err["loc"], dict(spec)) or "type"
        raise option_error(where, key, _reason(err, model, key)) from None


def find_tensor(where: str, key: str, name: str | None, tensors: Sequence[TensorSpec], what: str) -> TensorSpec:
    """The tensor called ``name`` (given as option ``key``), or a PipelineError listing the model's names."""
    for spec in tensors:
        if spec.name == name:
            return spec
    known = ", ".join(repr(t.name) for t in tensors)
    raise option_error(where, key, f"{name!r} is not a model {what} (model {what}s: {known})")


def only_tensor(where: str, key: str, name: str | None, tensors: Sequence[TensorSpec], what: str) -> TensorSpec:
    """The tensor named by option ``key`` if given, else the model's only ``what``."""
    if name is None and len(tensors) != 1:
        names = ", ".join(t.name for t in tensors)
        raise option_error(where, key, f"required: the model has {len(tensors)} {what}s ({names})")
    return tensors[0] if name is None else find_tensor(where, key, name, tensors, what)


def partial_model(model: type[ProcessorOptions]) -> type[ProcessorOptions]:
    """``model`` with every option optional (``type`` stays required): what a stream may override.

    Field constraints and validators carry over, so a partial option is checked as the full one is.
    """
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name != "type":
            extra = [*field.metadata, *([Field(discriminator=field.discriminator)] if field.discriminator else [])]
            annotation = Annotated[(field.annotation, *extra)] if extra else field.annotation
            fields[name] = (Optional[annotation], None)  # noqa: UP045 - a type built at run time
    return create_model(f"Partial{model.__name__}", __base__=model, __module__=model.__module__, **fields)


class Overrides:
    """Validates a stream's ``pre`` / ``post`` table against the processors registered in ``registry``.

    The table overrides the bundle manifest's processing key by key, so it may be partial. With a
    ``type``, its keys are checked against that type's options (all optional); without one, every
    key must be an option of at least one registered type and valid there. The merged result is
    checked in full when the stream starts (``parse_options``).
    """

    def __init__(self, registry: Registry[Any], what: str) -> None:
        self.what = what
        self.partials = {kind: partial_model(cls.Options) for kind, cls in registry.items()}
        self._typed: TypeAdapter[Any] = TypeAdapter(discriminated_union(list(self.partials.values())))

    def __call__(self, value: dict[str, Any]) -> dict[str, Any]:
        if "type" in value:
            self._typed.validate_python(value)
            return value
        for key, item in value.items():
            owners = [(kind, m) for kind, m in self.partials.items() if key in m.model_fields]
            if not owners:
                error = PydanticCustomError("unknown_option", "unknown key: no {what} type has this option",
                                            {"what": self.what})
                details: InitErrorDetails = {"type": error, "loc": (key,), "input": item}
                raise ValidationError.from_exception_data(self.what, [details])
            failures = []
            for kind, model in owners:
                try:
                    model.model_validate({"type": kind, key: item})
                    break
                except ValidationError as exc:
                    failures.append(exc)
            else:
                raise failures[0]
        return value

    def annotation(self) -> Any:
        """The field type: the table as written (a dict), checked by this validator."""
        return Annotated[dict[str, Any], AfterValidator(self)]
