"""The small interfaces every pipeline part implements, and their registries.

A ``Source`` delivers ``Frame``s or ``AudioChunk``s from a blocking device or file (it runs
on its own thread); a ``Preprocessor`` turns them into model feeds; a ``Postprocessor``
turns model outputs into a compact JSON-able result (or nothing). Parts are looked up by
``type`` strings from the manifest or the agent config; each part's class carries its pydantic
``Options`` model (``type: Literal[...]``), and the config's discriminated unions are built from
these registries, so a new part registers once.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

# The parts raise these; they live with the other agent errors (one hierarchy), named here for the parts.
from agent.errors import PipelineError, SourceEnded, SourceError  # noqa: F401
from agent.validation import discriminated_union, type_tags

if TYPE_CHECKING:
    from pydantic import BaseModel

    from agent.runtimes.base import TensorSpec


@dataclass(frozen=True)
class Frame:
    """One video frame: HxWx3 uint8 in BGR order (OpenCV's), as captured.

    A source that decoded the frame smaller than captured (``Source.shrink_to``) sets ``full_size``
    so results map back to the captured frame, and may keep the compressed frame (``encoded``, a JPEG)
    for snapshots at full resolution.
    """

    image: np.ndarray
    ts: float  # capture time, time.time()
    index: int
    source: str
    full_size: tuple[int, int] | None = None  # (width, height) as captured, when ``image`` is smaller
    encoded: bytes | None = None  # the frame as captured, JPEG

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frame as captured."""
        return self.full_size or (self.image.shape[1], self.image.shape[0])


@dataclass(frozen=True)
class AudioChunk:
    """Consecutive mono float32 samples in [-1, 1] at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int
    ts: float  # capture time of the first sample
    offset: int  # index of the first sample since the source started
    source: str


Item = Frame | AudioChunk


class Source(abc.ABC):
    """A blocking producer of frames or audio; one thread per source calls ``read``."""

    kind: ClassVar[str]  # "video" or "audio"
    type: ClassVar[str]  # registry key
    # Set by the stream: the size (w, h) the pre-processing shrinks a w x h frame to. A source that can
    # decode smaller for free (MJPG: libjpeg's DCT scaling) decodes to no less than that.
    shrink_to: Callable[[int, int], tuple[int, int]] | None = None

    @abc.abstractmethod
    def open(self) -> None:
        """Raises SourceError if the device/file/URL cannot be opened."""

    @abc.abstractmethod
    def read(self, timeout: float) -> Item | None:
        """The next item, or None if none arrived within ``timeout``.

        Raises:
            SourceEnded: a finite source is done.
            SourceError: the source failed or disappeared (the runner reopens it with backoff).
        """

    def close(self) -> None:  # noqa: B027 - optional
        """Release the device or file."""


@dataclass
class Prepared:
    """Feeds for one inference, plus what post-processing needs to map results back."""

    feeds: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. scale/pad for boxes, window start/end times


class Preprocessor(abc.ABC):
    """Turns source items into zero or more model inputs (audio windows overlap; frames map 1:1)."""

    type: ClassVar[str]
    Options: ClassVar[builtins.type[BaseModel]]  # the manifest's ``preprocess`` object for this type

    @abc.abstractmethod
    def __init__(self, options: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] = ()) -> None:
        """Check ``options`` (an instance of ``Options``) against the model's tensors.

        Raises:
            PipelineError: the options do not fit the model (names ``preprocess.<key>``).
        """

    @abc.abstractmethod
    def __call__(self, item: Item) -> Iterator[Prepared]:
        """Raises PipelineError for an item it cannot use (wrong format)."""

    def update(self, outputs: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional
        """Model state carried to the next window (e.g. Silero VAD's ``stateN`` → ``state``)."""


class Postprocessor(abc.ABC):
    """Turns outputs into a result dict, or None when there is nothing to report."""

    type: ClassVar[str]
    Options: ClassVar[builtins.type[BaseModel]]  # the manifest's ``postprocess`` object for this type

    @abc.abstractmethod
    def __init__(self, options: Any, outputs: Sequence[TensorSpec], labels: list[str] | None = None) -> None:
        """Check ``options`` (an instance of ``Options``) against the model's outputs and labels.

        Raises:
            PipelineError: the options do not fit the model (names ``postprocess.<key>``).
        """

    @abc.abstractmethod
    def __call__(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, Any] | None:
        """Raises PipelineError if the outputs do not fit this post-processor."""

    def flush(self) -> dict[str, Any] | None:
        """At the end of a finite source: close what is still open (e.g. a speech segment)."""
        return None


T = TypeVar("T")


class Registry(dict[str, type[T]]):
    """``type`` string → class; ``register`` is a class decorator.

    Every class has an ``Options`` pydantic model whose ``type`` is ``Literal[cls.type]``.
    """

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, cls: type[T]) -> type[T]:
        """Raises TypeError (at import) if the class's ``Options`` do not declare its ``type``."""
        kind = cls.type  # type: ignore[attr-defined]
        options = getattr(cls, "Options", None)
        if options is None or type_tags(options) != (kind,):
            raise TypeError(f"{cls.__name__}.Options needs a field type: Literal[{kind!r}]")
        self[kind] = cls
        return cls

    def options_union(self) -> Any:
        """The discriminated union (on ``type``) of every registered class's ``Options``."""
        return discriminated_union([cls.Options for cls in self.values()])  # type: ignore[attr-defined]

    def get_class(self, name: str) -> type[T]:
        try:
            return self[name]
        except KeyError:
            raise PipelineError(f"unknown {self.what} type {name!r} (known: {', '.join(sorted(self))})") from None


SOURCES: Registry[Source] = Registry("source")
PREPROCESSORS: Registry[Preprocessor] = Registry("pre-processing")
POSTPROCESSORS: Registry[Postprocessor] = Registry("post-processing")
Factory = Callable[..., Any]
