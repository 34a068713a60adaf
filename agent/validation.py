"""Shared pydantic plumbing: path fields that resolve relative to their file, and readable error keys.

Owns what every validated file needs: which fields are paths (the ``RelativeToFile`` marker, so a
new path field cannot be forgotten by a hand-kept list), fields whose type is built on first use
(``Deferred``), and how a pydantic error location becomes the key a user wrote
(``stream.cam.source.fps``, not ``stream.cam.source.video.fps``). It validates nothing itself and
imports nothing of the agent, so any module can use it.
"""

from __future__ import annotations

import importlib
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel, Field, GetCoreSchemaHandler, TypeAdapter
from pydantic_core import CoreSchema, ErrorDetails, core_schema


@dataclass(frozen=True)
class RelativeToFile:
    """Field marker: a relative path in a config file is relative to that file's directory; ``~`` expands.

    ``urls``: the field may also hold a URL (``rtsp://...``) or ``-`` (stdin), which are left alone.
    """

    urls: bool = False

    def resolve(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str) or not value or (self.urls and ("://" in value or value == "-")):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)


ConfigPath = Annotated[Path, RelativeToFile()]
"""A filesystem path; relative to the config file it was written in."""

PathStr = Annotated[str, RelativeToFile()]
"""A filesystem path kept as a string; relative to the config file."""

PathOrUrl = Annotated[str, RelativeToFile(urls=True)]
"""A file path (relative to the config file) or a URL / ``-``, kept as a string."""


@dataclass(frozen=True)
class Deferred:
    """Field marker: validate with the type ``module.name``, imported when a value first needs it.

    For types whose import is heavy (the unions built from the pipeline registries, which import
    every source and processor): a config without streams never pays for them. Errors nest under
    the field's key as usual.
    """

    module: str
    name: str

    def resolve(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        adapter: list[TypeAdapter[Any]] = []

        def validate(value: Any) -> Any:
            if not adapter:
                adapter.append(TypeAdapter(self.resolve()))
            return adapter[0].validate_python(value)

        return core_schema.no_info_plain_validator_function(validate)


def _members(annotation: Any) -> tuple[Any, list[Any]]:
    """(annotation without Annotated, the Annotated metadata)."""
    metadata: list[Any] = []
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        metadata += extra
    return annotation, metadata


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_tags(model: type[BaseModel]) -> tuple[Any, ...]:
    """The values of ``model``'s ``type: Literal[...]`` discriminator, or () if it has none."""
    field = model.model_fields.get("type")
    if field is None:
        return ()
    annotation, _ = _members(field.annotation)
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def discriminated_union(models: Sequence[type[BaseModel]]) -> Any:
    """The union of ``models`` discriminated on their ``type`` field (the model itself if only one)."""
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007 - built at run time


def _pick(models: Sequence[type[BaseModel]], value: Any) -> type[BaseModel] | None:
    """The member of a (discriminated) union of models that ``value`` is meant for."""
    if len(models) == 1:
        return models[0]
    tag = value.get("type") if isinstance(value, dict) else None
    return next((m for m in models if tag is not None and tag in type_tags(m)), None)


def resolve_paths(model: type[BaseModel], tree: Any, base: Path) -> None:
    """Rewrite in place every relative path in ``tree`` (raw input for ``model``) whose field is marked.

    Runs on the file's own values before environment and command-line overrides are merged, which
    stay relative to the working directory.
    """
    if not isinstance(tree, dict):
        return
    for name, field in model.model_fields.items():
        if name in tree:
            tree[name] = _resolve(field.annotation, list(field.metadata), tree[name], base)


def _resolve(annotation: Any, metadata: list[Any], value: Any, base: Path) -> Any:
    annotation, more = _members(annotation)
    marker = next((m for m in [*metadata, *more] if isinstance(m, RelativeToFile)), None)
    if marker is not None:
        return marker.resolve(value, base)
    deferred = next((m for m in [*metadata, *more] if isinstance(m, Deferred)), None)
    if deferred is not None:
        return _resolve(deferred.resolve(), [], value, base)
    if _is_union(annotation):
        members = [a for a in get_args(annotation) if a is not type(None)]
        marked = next((a for a in members if any(isinstance(m, RelativeToFile) for m in _members(a)[1])), None)
        if marked is not None:
            return _resolve(marked, [], value, base)
        model = _pick([a for a in members if is_model(a)], value)
        if model is not None:
            resolve_paths(model, value, base)
        return value
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            value[key] = _resolve(args[1], [], item, base)
    elif origin in (list, tuple) and isinstance(value, list) and args:
        value[:] = [_resolve(args[0], [], item, base) for item in value]
    elif is_model(annotation):
        resolve_paths(annotation, value, base)
    return value


_PATHLIKE = re.compile(r"(^|_)(path|dir|file|root)$")


def path_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(dotted field, marked) for every field of ``model`` and its sub-models that holds a path.

    A path is a ``Path``, a marked field, or a string named like one (``path``, ``*_dir``, ``*_file``,
    ``*_root``). For tests: an unmarked one would resolve against the working directory.
    """
    for name, field in model.model_fields.items():
        yield from _path_fields(field.annotation, list(field.metadata), f"{prefix}{name}", set())


def _path_fields(annotation: Any, metadata: list[Any], where: str, seen: set[Any]) -> Iterator[tuple[str, bool]]:
    annotation, more = _members(annotation)
    deferred = next((m for m in [*metadata, *more] if isinstance(m, Deferred)), None)
    if deferred is not None:
        yield from _path_fields(deferred.resolve(), [], where, seen)
        return
    marked = any(isinstance(m, RelativeToFile) for m in [*metadata, *more])
    if annotation is Path or marked or (annotation is str and _PATHLIKE.search(where.rsplit(".", 1)[-1])):
        yield where, marked
        return
    if is_model(annotation):
        if annotation not in seen:
            for name, field in annotation.model_fields.items():
                yield from _path_fields(field.annotation, list(field.metadata), f"{where}.{name}", seen | {annotation})
        return
    for arg in get_args(annotation):
        if arg is not type(None) and not isinstance(arg, str | int):
            yield from _path_fields(arg, [], f"{where}.*" if get_origin(annotation) in (dict, list, tuple) else where,
                                    seen)


_ABSENT: Any = object()


def error_key(loc: Sequence[str | int], tree: Any, index: str = ".{}") -> str:
    """The key a user wrote for a pydantic error location, following the raw input ``tree``.

    Drops what pydantic adds but the user never wrote: the tag of a discriminated union
    (``source.video.fps`` → ``source.fps``) and the member names of a union of scalars
    (``device.int``). ``index`` formats list positions (``".{}"`` → ``a.0``, ``"[{}]"`` → ``a[0]``).
    """
    out = ""
    node = tree
    for i, part in enumerate(loc):
        step = index.format(part) if isinstance(part, int) else (f".{part}" if out else str(part))
        if isinstance(node, dict):
            nxt = loc[i + 1] if i + 1 < len(loc) else None
            if part == node.get("type") and nxt is not None and (part not in node or nxt in node):
                continue  # a discriminated union's tag
            out += step
            node = node.get(part, _ABSENT)
        elif isinstance(node, list) and isinstance(part, int):
            out += step
            node = node[part] if 0 <= part < len(node) else _ABSENT
        elif node is _ABSENT:
            out += step  # not in the input (a missing table): name it as the model does
        else:
            break  # a scalar: what follows names pydantic's internals (union members, ...)
    return out


def error_reason(err: ErrorDetails) -> str:
    """Pydantic's message, without the "Value error, " prefix of a validator's own message."""
    if err["type"] in ("value_error", "assertion_error") and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return err["msg"]
