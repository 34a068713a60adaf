"""Pre-processing declared in the bundle manifest: frames and audio chunks → model feeds.

``make_preprocessor`` builds one from the manifest's ``preprocess`` object and checks it
against the model's inputs at construction, so a mismatched bundle is rejected at install.
This module owns the arithmetic only (resize, normalize, resample, windows, features); it
does no I/O and never runs the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from agent.pipelines.base import PREPROCESSORS, AudioChunk, Frame, Item, PipelineError, Prepared, Preprocessor
from agent.pipelines.options import (
    Bool,
    Int,
    Number,
    Numbers,
    ProcessorOptions,
    Section,
    Str,
    find_tensor,
    option_error,
    parse_options,
)
from agent.runtimes.base import TensorSpec

# OpenCV is imported where frames are resized, not here: importing this module (the config does, for
# the option models) must not cost an audio-only device OpenCV's ~16 MB.

_error = partial(option_error, "preprocess")


def make_preprocessor(
    spec: Mapping[str, Any] | ProcessorOptions, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] = ()
) -> Preprocessor:
    """A pre-processor for a model with ``inputs`` (and ``outputs``, to check carried state).

    ``spec`` is the manifest's ``preprocess`` object (or its validated options).

    Raises:
        PipelineError: unknown type, bad option, or options that do not fit the model's inputs.
    """
    options = parse_options(PREPROCESSORS, spec, "preprocess")
    return PREPROCESSORS.get_class(options.type)(options, inputs, outputs)


def _fill_shape(spec: TensorSpec, size: int, key: str) -> tuple[int, ...]:
    """``spec``'s shape for ``size`` elements: batch (leading None) 1, one other None inferred."""
    shape = [1 if d is None and i == 0 and len(spec.shape) > 1 else d for i, d in enumerate(spec.shape)]
    known = math.prod(d for d in shape if d is not None)
    if shape.count(None) > 1 or size % max(known, 1):
        raise _error(key, f"{size} values do not fit input {spec.name!r} of shape {spec.shape_list()}")
    filled = tuple(size // known if d is None else d for d in shape)
    if math.prod(filled) != size:
        raise _error(key, f"{size} values do not fit input {spec.name!r} of shape {spec.shape_list()}")
    return filled


class ImageOptions(ProcessorOptions):
    """``preprocess`` for frames (docs/processing.md); defaults come from the model's input."""

    type: Literal["image"]
    input: Str | None = None  # default: the only image-shaped input
    layout: Literal["nhwc", "nchw"] | None = None  # default: from the input's shape
    size: Annotated[Numbers, Field(min_length=2, max_length=2)] | None = None  # [width, height]
    resize: Literal["stretch", "letterbox"] = "stretch"
    pad_value: Number = Field(default=0.0, ge=0, le=255)
    color: Literal["rgb", "bgr"] = "rgb"
    raw_uint8: Bool = False
    mean: Numbers | None = None
    std: Numbers | None = None
    scale: Number | None = None
    offset: Number | None = None

    @field_validator("std")
    @classmethod
    def _std(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and 0.0 in value:
            raise ValueError("must not contain 0")
        return value


@PREPROCESSORS.register
class ImagePreprocessor(Preprocessor):
    """Resize (stretch or letterbox), color order, layout, normalization and quantization of frames."""

    type = "image"
    Options = ImageOptions

    def __init__(
        self, options: ImageOptions, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] = ()
    ) -> None:
        if options.input is not None:
            self.spec = find_tensor("preprocess", "input", options.input, inputs, "input")
        else:
            images = [t for t in inputs if len(t.shape) == 4 and (t.shape[3] in (1, 3) or t.shape[1] in (1, 3))]
            if len(images) != 1:
                raise _error(
                    "input", f"required: {len(images)} image-shaped inputs among {', '.join(t.name for t in inputs)}"
                )
            self.spec = images[0]
        shape = self.spec.shape
        if len(shape) != 4:
            raise _error("input", f"{self.spec.name!r} has shape {self.spec.shape_list()}, not an image batch")
        self.layout = options.layout or ("nhwc" if shape[3] in (1, 3) else "nchw")
        h, w, c = (shape[1], shape[2], shape[3]) if self.layout == "nhwc" else (shape[2], shape[3], shape[1])
        if c not in (1, 3):
            raise _error("layout", f"{self.layout} gives {c} channels for input shape {self.spec.shape_list()}")
        self.channels = c
        size = options.size
        if size is not None:
            if (w is not None and int(size[0]) != w) or (h is not None and int(size[1]) != h):
                raise _error(
                    "size",
                    f"[{int(size[0])}, {int(size[1])}] does not match input "
                    f"{self.spec.name!r} of shape {self.spec.shape_list()} ({self.layout})",
                )
            w, h = int(size[0]), int(size[1])
        if w is None or h is None:
            raise _error("size", f"required: input {self.spec.name!r} has a dynamic size {self.spec.shape_list()}")
        self.width, self.height = w, h
        self.resize = options.resize
        self.pad_value = options.pad_value
        self.color = options.color
        self.raw = options.raw_uint8
        dtype, quant = self.spec.dtype, self.spec.quantization
        if self.raw and dtype != np.uint8:
            raise _error("raw_uint8", f"input {self.spec.name!r} is {dtype.name}, not uint8")
        mean, std = options.mean, options.std
        scale, offset = options.scale, options.offset
        if (mean or std) and (scale is not None or offset is not None):
            raise _error("scale", "give either mean/std or scale/offset, not both")
        if np.issubdtype(dtype, np.integer) and quant is None:
            self.raw = True  # an unquantized integer input takes pixels as they are
        if self.raw and (mean or std or scale is not None or offset is not None):
            raise _error("mean" if mean or std else "scale", "normalization does not apply to raw uint8 pixels")
        for key, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, c):
                raise _error(key, f"needs 1 or {c} values, got {len(values)}")
        # Everything becomes one multiply-add per channel: x * mul + add (pixels in 0..255).
        self.mul: np.ndarray = np.float32(1 / 255 if scale is None else scale) * np.ones(1, np.float32)
        self.add: np.ndarray = np.float32(offset or 0.0) * np.ones(1, np.float32)
        if mean is not None or std is not None:
            m, s = np.asarray(mean or [0.0], np.float32), np.asarray(std or [1.0], np.float32)
            self.mul, self.add = (1 / s).astype(np.float32), (-m / s).astype(np.float32)

    def __call__(self, item: Item) -> Iterator[Prepared]:
        import cv2

        if not isinstance(item, Frame):
            raise PipelineError(f"image pre-processing got {type(item).__name__}, not a video frame")
        image = item.image
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise PipelineError(
                f"frame {item.index} from {item.source}: expected HxWx3 uint8, got {image.shape} {image.dtype}"
            )
        if image.ndim == 2 or image.shape[2] == 1:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        resized, scale, pad = self._resize(image)
        src_w, src_h = item.size
        if item.full_size is not None:  # decoded smaller than captured: map to the captured frame
            scale = (scale[0] * image.shape[1] / src_w, scale[1] * image.shape[0] / src_h)
        if self.channels == 1:
            pixels = cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif self.color == "rgb":
            pixels = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        else:
            pixels = resized
        if self.raw:
            tensor: np.ndarray = pixels.astype(self.spec.dtype, copy=False)
        else:
            tensor = pixels.astype(np.float32) * self.mul + self.add
            if self.spec.quantization is not None:
                tensor = self.spec.quantization.quantize(tensor, self.spec.dtype)
            elif tensor.dtype != self.spec.dtype:
                tensor = tensor.astype(self.spec.dtype)
        if self.layout == "nchw":
            tensor = tensor.transpose(2, 0, 1)
        meta = {
            "source_size": (src_w, src_h),
            "input_size": (self.width, self.height),
            "scale": scale,
            "pad": pad,
            "ts": item.ts,
            "frame_index": item.index,
        }
        yield Prepared({self.spec.name: np.ascontiguousarray(tensor[None])}, meta)

    def target_size(self, src_w: int, src_h: int) -> tuple[int, int]:
        """The size (w, h) a src_w x src_h frame is resized to before padding (``Source.shrink_to``)."""
        if self.resize == "stretch":
            return self.width, self.height
        ratio = min(self.width / src_w, self.height / src_h)
        return max(1, round(src_w * ratio)), max(1, round(src_h * ratio))

    def _resize(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
        """The resized image, its scale (x, y) and the padding (x, y) in model pixels."""
        src_h, src_w = image.shape[:2]
        if self.resize == "stretch":
            out = _shrink(image, self.width, self.height)
            return out, (self.width / src_w, self.height / src_h), (0.0, 0.0)
        new_w, new_h = self.target_size(src_w, src_h)
        pad_x, pad_y = (self.width - new_w) // 2, (self.height - new_h) // 2
        canvas = np.full((self.height, self.width, 3), round(self.pad_value), np.uint8)
        canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = _shrink(image, new_w, new_h)
        return canvas, (new_w / src_w, new_h / src_h), (float(pad_x), float(pad_y))


def _shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize: bilinear below 2:1 (it already uses every source pixel); area averaging above,
    which avoids aliasing; between 2:1 and 4:1, bilinear to twice the size then area 2:1.

    OpenCV's area resize is slow at a non-integer ratio: 640x480 → 192x192 ~690 µs, → 224x224
    ~950 µs here, against ~160 and ~250 µs in two steps, which differ from it by 0.2-0.4 grey
    levels on average on photographs (p99 2-3; ``tests/test_processing.py``). The bilinear step
    then shrinks by less than 2:1, so it aliases no more than plain bilinear; at whole ratios
    (640x480 → 320x240) the area resize is the fast one. Past 4:1 in both directions (a 1080p
    camera for a 128x128 model) two steps are kept for speed, at some aliasing.
    """
    import cv2

    src_h, src_w = image.shape[:2]
    if src_w < 2 * width and src_h < 2 * height:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    within_4 = src_w <= 4 * width and src_h <= 4 * height
    if (src_w > 4 * width and src_h > 4 * height) or ((src_w % width or src_h % height) and within_4):
        image = cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


class Resampler:
    """Streaming windowed-sinc (Kaiser) resampler between integer rates; continuous across chunks.

    Output sample k is the band-limited value of the input at time k / rate_out exactly, so
    times stay exact; it lags the input by ``half`` input samples (it needs that lookahead).
    """

    ZEROS = 16  # sinc zero crossings per side: ~80 dB stop band with beta 8.6
    BETA = 8.6

    def __init__(self, rate_in: int, rate_out: int) -> None:
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g  # output k sits at input time k * down / up
        cutoff = min(1.0, rate_out / rate_in) * (0.95 if rate_out < rate_in else 1.0)
        self.half = math.ceil(self.ZEROS / cutoff)
        taps = np.arange(-self.half + 1, self.half + 1)  # input offsets around floor(t)
        dist = np.arange(self.up)[:, None] / self.up - taps[None, :]  # t - tap, for every phase
        window = np.i0(self.BETA * np.sqrt(np.clip(1 - (dist / self.half) ** 2, 0, 1))) / np.i0(self.BETA)
        table = cutoff * np.sinc(cutoff * dist) * window
        self.table = (table / table.sum(axis=1, keepdims=True)).astype(np.float32)
        self.taps = taps
        self.buf: np.ndarray = np.zeros(self.half, np.float32)  # input history; buf[0] is input index self.start
        self.start = -self.half  # zeros before the stream start
        self.k = 0  # next output sample

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        self.buf = np.concatenate([self.buf, samples.astype(np.float32, copy=False)])
        end = self.start + len(self.buf)  # input samples [start, end) are available
        # Output k needs input up to floor(k * down / up) + half - 1 < end.
        last = ((end - self.half) * self.up - 1) // self.down if end > self.half - 1 else -1
        ks = np.arange(self.k, max(self.k, last + 1), dtype=np.int64)
        if not len(ks):
            return np.zeros(0, np.float32)
        base, phase = np.divmod(ks * self.down, self.up)
        idx = (base - self.start)[:, None] + self.taps[None, :]
        out = np.einsum("ij,ij->i", self.buf[idx], self.table[phase])
        self.k = int(ks[-1]) + 1
        keep = (self.k * self.down) // self.up - self.half + 1 - self.start
        if keep > 0:
            self.buf, self.start = self.buf[keep:], self.start + keep
        return out.astype(np.float32)


class SampleRing:
    """Windows of ``window`` samples every ``hop`` samples, each with ``context`` samples before it.

    Every sample lands in the windows its position dictates, whatever the chunk sizes: no gap,
    no duplicate. Storage is bounded by context + window + one chunk (compacted as it advances).
    """

    def __init__(self, window: int, hop: int, context: int = 0) -> None:
        self.window, self.hop, self.context = window, hop, context
        self.buf: np.ndarray = np.zeros(context, np.float32)  # zeros stand for the context before the stream start
        self.start = -context  # absolute index of buf[0]
        self.next = 0  # absolute index of the next window's first sample
        self.total = 0  # samples pushed so far

    def push(self, samples: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, samples.astype(np.float32, copy=False)])
        self.total += len(samples)

    def pop(self) -> tuple[int, np.ndarray] | None:
        """The next window as (index of its first sample, context + window samples), if complete."""
        if self.next + self.window > self.total:
            return None
        lo = self.next - self.context - self.start
        out = self.buf[lo : lo + self.context + self.window].copy()
        first, self.next = self.next, self.next + self.hop
        drop = min(self.next - self.context - self.start, len(self.buf))
        if drop > 0:
            self.buf, self.start = self.buf[drop:], self.start + drop
        return first, out


def to_mono(item: AudioChunk) -> np.ndarray:
    """Mono float32 in [-1, 1] from 1-D, (n, channels) or (channels, n) float or int16 samples."""
    x = np.asarray(item.samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 32768.0
    if x.ndim == 2:
        x = x.mean(axis=1 if x.shape[1] <= 8 and x.shape[1] <= x.shape[0] else 0)
    elif x.ndim != 1:
        raise PipelineError(f"audio from {item.source}: samples of shape {x.shape} are not mono or (n, channels)")
    return x.astype(np.float32, copy=False)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular HTK-mel filters, shape (n_mels, n_fft // 2 + 1)."""

    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges = 700.0 * (10 ** (np.linspace(to_mel(np.array(fmin)), to_mel(np.array(fmax)), n_mels + 2) / 2595.0) - 1)
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0, np.minimum(lower, upper)).astype(np.float32)


class LogMelOptions(Section):
    """``features = { type = "log_mel", ... }``: the spectrogram's parameters."""

    type: Literal["log_mel"]
    n_fft: Int = Field(default=512, ge=16)
    win_length: Int | None = Field(default=None, ge=1)  # default: n_fft
    hop_length: Int | None = Field(default=None, ge=1)  # default: n_fft // 4
    n_mels: Int = Field(default=40, ge=1)
    fmin: Number = Field(default=0.0, ge=0)
    fmax: Number | None = Field(default=None, ge=0)  # default: sample_rate / 2
    power: Number = Field(default=2.0, ge=1, le=2)
    log_offset: Number = Field(default=1e-6, ge=0)
    layout: Literal["frames_mels", "mels_frames"] = "frames_mels"


class NoFeatures(Section):
    """``features = "none"``: the samples themselves."""

    type: Literal["none"]


class MicroFrontendFeatures(Section):
    """``features = "micro_frontend"``: microWakeWord's TFLite Micro frontend (no options)."""

    type: Literal["micro_frontend"]


Features = Annotated[NoFeatures | LogMelOptions | MicroFrontendFeatures, Field(discriminator="type")]
_FEATURES = ("none", "log_mel", "micro_frontend")


class StateOptions(Section):
    """A recurrent model's state: fed from ``input``, carried from ``output`` to the next window."""

    input: Str
    output: Str
    shape: tuple[Int, ...] | None = None  # default: the input's shape with dynamic dims 1


class AudioOptions(ProcessorOptions):
    """``preprocess`` for audio (docs/processing.md)."""

    type: Literal["audio"]
    sample_rate: Int = Field(default=16000, ge=1000)
    input: Str | None = None  # default: the one input not fed by constants or state
    constants: dict[str, Int | Number | list[Any]] = Field(default_factory=dict)
    state: StateOptions | None = None
    features: Features = NoFeatures(type="none")
    context: Int = Field(default=0, ge=0)
    window: Int | None = Field(default=None, ge=1)  # default: from the input's shape (features none)
    hop: Int | None = Field(default=None, ge=1)  # default: window
    stride: Int | None = Field(default=None, ge=1)  # micro_frontend only; default: from the input's shape

    @field_validator("features", mode="before")
    @classmethod
    def _features(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"type": value}
        kind = value.get("type") if isinstance(value, Mapping) else value
        if kind not in _FEATURES:
            raise ValueError(f"must be none, log_mel or micro_frontend, got {kind!r}")
        return value


class LogMel:
    """Log-mel spectrogram of one window with numpy: periodic Hann, |STFT|^power, mel, log(x + offset)."""

    def __init__(self, f: LogMelOptions, sample_rate: int) -> None:
        self.n_fft = f.n_fft
        self.win_length = f.win_length or self.n_fft
        self.hop = f.hop_length or self.n_fft // 4
        self.n_mels = f.n_mels
        nyquist = sample_rate / 2
        fmax = nyquist if f.fmax is None else f.fmax
        if fmax > nyquist:
            raise _error("features.fmax", f"must be <= {nyquist} (half the sample rate), got {fmax}")
        if f.fmin > fmax:
            raise _error("features.fmin", f"must be <= fmax {fmax}, got {f.fmin}")
        self.power = f.power
        self.offset = f.log_offset
        self.layout = f.layout
        if self.win_length > self.n_fft:
            raise _error("features.win_length", f"{self.win_length} is longer than n_fft {self.n_fft}")
        pad = (self.n_fft - self.win_length) // 2
        self.window = np.zeros(self.n_fft, np.float32)
        self.window[pad : pad + self.win_length] = np.hanning(self.win_length + 1)[:-1]
        self.filters = mel_filterbank(sample_rate, self.n_fft, self.n_mels, f.fmin, fmax)

    def frames(self, n: int) -> int:
        return 0 if n < self.n_fft else 1 + (n - self.n_fft) // self.hop

    def __call__(self, x: np.ndarray) -> np.ndarray:
        count = self.frames(len(x))
        idx = np.arange(count)[:, None] * self.hop + np.arange(self.n_fft)[None, :]
        spec = np.abs(np.fft.rfft(x[idx] * self.window, axis=1)) ** self.power
        mel = np.log(spec @ self.filters.T + self.offset).astype(np.float32)
        return mel if self.layout == "frames_mels" else mel.T


@PREPROCESSORS.register
class AudioPreprocessor(Preprocessor):
    """Resampled mono audio in overlapping windows (+ context), with carried state and constant inputs.

    Stateful models (``state``): consume the iterator one window at a time and call ``update``
    with that window's outputs before asking for the next; feeds are built lazily for this.
    """

    _next_offset: int | None = None  # source offset expected next: a jump means audio was dropped upstream
    _shift = 0.0  # seconds of source audio dropped so far

    type = "audio"
    Options = AudioOptions

    def __init__(
        self, options: AudioOptions, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] = ()
    ) -> None:
        self.sample_rate = options.sample_rate
        self.constants: dict[str, np.ndarray] = {}
        for name, value in options.constants.items():
            spec = find_tensor("preprocess", "constants", name, inputs, "input")
            try:
                array = np.asarray(value, spec.dtype)
            except (TypeError, ValueError, OverflowError):
                raise _error(f"constants.{name}", f"{value!r} is not a {spec.dtype.name} value or array") from None
            if any(d is not None and d != 1 for d in spec.shape) and array.size != math.prod(spec.shape_list()):
                raise _error(f"constants.{name}", f"{value!r} does not fit shape {spec.shape_list()}")
            fixed = tuple(1 if d is None else d for d in spec.shape)
            self.constants[name] = np.broadcast_to(array, fixed).copy()
        self.state: TensorSpec | None = None
        self.state_output = ""
        state = options.state
        if state is not None:
            self.state = find_tensor("preprocess", "state.input", state.input, inputs, "input")
            self.state_output = state.output
            if outputs and self.state_output not in {t.name for t in outputs}:
                raise _error(
                    "state.output",
                    f"{self.state_output!r} is not a model output "
                    f"(model outputs: {', '.join(t.name for t in outputs)})",
                )
            default = [1 if d is None else d for d in self.state.shape]
            shape = list(state.shape) if state.shape is not None else default
            if len(shape) != len(self.state.shape) or any(
                d is not None and d != v for d, v in zip(self.state.shape, shape, strict=False)
            ):
                raise _error(
                    "state.shape", f"{shape} does not fit input {self.state.name!r} of shape {self.state.shape_list()}"
                )
            self.state_shape = tuple(shape)
        self._reset_state()
        taken = {*self.constants, *([self.state.name] if self.state else [])}
        if options.input is not None:
            self.spec = find_tensor("preprocess", "input", options.input, inputs, "input")
        else:
            rest = [t for t in inputs if t.name not in taken]
            if len(rest) != 1:
                names = ", ".join(t.name for t in rest)
                raise _error("input", f"required: cannot tell the audio input among {names}")
            self.spec = rest[0]
        missing = [t.name for t in inputs if t.name not in {*taken, self.spec.name}]
        if missing:
            raise _error("constants", f"model inputs {', '.join(missing)} are not fed (add them to constants or state)")
        features = options.features
        self.features = features.type
        self.mel: LogMel | None = None
        windowing = {"context", "window", "hop"} & options.model_fields_set
        if self.features == "micro_frontend":
            if windowing:
                raise _error(min(windowing), "does not apply with features micro_frontend (it steps 10 ms at a time)")
            self._init_micro(options)
            return
        if options.stride is not None:
            raise _error("stride", "applies to features micro_frontend only")
        self.context = options.context
        static = self.spec.shape[-1] if self.spec.shape else None
        default_window = static - self.context if self.features == "none" and static is not None else None
        window = options.window if options.window is not None else default_window
        if window is None:
            raise _error("window", f"required: input {self.spec.name!r} has shape {self.spec.shape_list()}")
        if window < 1:
            raise _error("window", f"must be >= 1, got {window}")
        self.window = window
        self.hop = options.hop or self.window
        if isinstance(features, LogMelOptions):
            self.mel = LogMel(features, self.sample_rate)
            frames = self.mel.frames(self.context + self.window)
            if frames == 0:
                raise _error("window", f"{self.context + self.window} samples are shorter than n_fft {self.mel.n_fft}")
            self.shape = _fill_shape(self.spec, frames * self.mel.n_mels, "features")
            dims = self.shape[-2:] if self.mel.layout == "frames_mels" else self.shape[-2:][::-1]
            if dims != (frames, self.mel.n_mels):
                raise _error(
                    "features",
                    f"{frames} frames x {self.mel.n_mels} mels ({self.mel.layout}) do "
                    f"not fit input {self.spec.name!r} of shape {self.spec.shape_list()}",
                )
        else:
            self.shape = _fill_shape(self.spec, self.context + self.window, "window")
        self.ring = SampleRing(self.window, self.hop, self.context)
        self._resampler: Resampler | None = None
        self._rate_in = 0

    def _init_micro(self, options: AudioOptions) -> None:
        """microWakeWord features: pymicro_features' TFLite Micro frontend, 40 values per 10 ms."""
        from pymicro_features import MicroFrontend

        if self.sample_rate != 16000:
            raise _error("sample_rate", "micro_frontend works at 16000 Hz only")
        shape = self.spec.shape
        if len(shape) != 3 or shape[2] != 40:
            raise _error(
                "features",
                f"micro_frontend gives 40 features per step; input {self.spec.name!r} "
                f"has shape {self.spec.shape_list()} (expected [1, stride, 40])",
            )
        stride = options.stride if options.stride is not None else shape[1]
        if stride is None:
            raise _error("stride", f"required: input {self.spec.name!r} has shape {self.spec.shape_list()}")
        if shape[1] is not None and stride != shape[1]:
            shape_list = self.spec.shape_list()
            raise _error("stride", f"{stride} does not match input {self.spec.name!r} of shape {shape_list}")
        self.stride = stride
        self.frontend = MicroFrontend()
        self.rows: list[list[float]] = []
        self.pcm: np.ndarray = np.zeros(0, np.int16)
        self.consumed = 0  # samples the frontend has read
        self.context, self.window, self.hop = 0, 0, 0
        self._resampler = None
        self._rate_in = 0

    def _reset_state(self) -> None:
        self._state = None if self.state is None else np.zeros(self.state_shape, self.state.dtype)

    def update(self, outputs: Mapping[str, np.ndarray]) -> None:
        if self.state is None:
            return
        if self.state_output not in outputs:
            raise PipelineError(f"preprocess.state.output: model returned no {self.state_output!r}")
        self._state = np.asarray(outputs[self.state_output], self.state.dtype).reshape(self.state_shape)

    def _feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {self.spec.name: x, **self.constants}
        if self.state is not None and self._state is not None:
            feeds[self.state.name] = self._state
        return feeds

    def __call__(self, item: Item) -> Iterator[Prepared]:
        if not isinstance(item, AudioChunk):
            raise PipelineError(f"audio pre-processing got {type(item).__name__}, not an audio chunk")
        samples = to_mono(item)
        if self._next_offset is not None and item.offset > self._next_offset:
            # Audio was dropped upstream (overflow): later windows keep the source's timeline.
            self._shift += (item.offset - self._next_offset) / item.sample_rate
        self._next_offset = item.offset + len(samples)
        if item.sample_rate != self._rate_in:
            self._rate_in = item.sample_rate
            self._resampler = (
                None if item.sample_rate == self.sample_rate else Resampler(item.sample_rate, self.sample_rate)
            )
        if self._resampler is not None:
            samples = self._resampler(samples)
        if self.features == "micro_frontend":
            yield from self._micro(samples, item.ts)
            return
        self.ring.push(samples)
        pushed_end = self.ring.total
        while (popped := self.ring.pop()) is not None:
            first, x = popped
            end = first + self.window
            data = x if self.mel is None else self.mel(x)
            tensor = data.reshape(self.shape).astype(self.spec.dtype, copy=False)
            meta = {
                "start": first / self.sample_rate + self._shift,
                "end": end / self.sample_rate + self._shift,
                "ts": item.ts + (end - pushed_end + len(samples)) / self.sample_rate,
            }
            yield Prepared(self._feeds(tensor), meta)

    def _micro(self, samples: np.ndarray, ts: float) -> Iterator[Prepared]:
        # The frontend takes 16-bit PCM and consumes 10 ms (160 samples) per call, as pymicro-wakeword feeds it.
        pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
        self.pcm = np.concatenate([self.pcm, pcm])
        arrived = self.consumed + len(self.pcm)
        while len(self.pcm) >= 160:
            result = self.frontend.process_samples(self.pcm[:160].tobytes())
            self.pcm = self.pcm[result.samples_read :]
            self.consumed += result.samples_read
            if not result.features:
                continue
            self.rows.append(result.features)
            if len(self.rows) == self.stride:  # stride, not rolling: microWakeWord's streaming models expect it
                x = np.asarray(self.rows, np.float32).reshape(1, self.stride, 40)
                self.rows = []
                end = self.consumed / self.sample_rate
                meta = {
                    "start": max(0.0, end - (self.stride + 2) * 0.01),
                    "end": end,
                    "ts": ts + (self.consumed - arrived + len(pcm)) / self.sample_rate,
                }
                yield Prepared(self._feeds(x), meta)
