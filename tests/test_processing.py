"""Pre/post-processing against real models and real files: face detection on photographs, Silero VAD and
microWakeWord on espeak-ng speech, plus unit tests of the pure parts (ring buffer, resampler, YOLO, NMS)."""

from __future__ import annotations

import itertools
import time
import wave
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.pipelines.anchors import ssd_anchors
from agent.pipelines.base import AudioChunk, Frame, PipelineError
from agent.pipelines.post.detection import nms, to_source
from agent.pipelines.postprocess import make_postprocessor
from agent.pipelines.preprocess import ImagePreprocessor, Resampler, SampleRing, make_preprocessor
from agent.runtimes import Quantization, Session, TensorSpec, backend_for_file
from tests import media

FACE_PRE = {"type": "image", "scale": 1 / 127.5, "offset": -1.0}
FACE_POST = {"type": "detection", "format": "mediapipe_ssd"}
VAD_PRE = {
    "type": "audio",
    "sample_rate": 16000,
    "window": 512,
    "hop": 512,
    "context": 64,
    "state": {"input": "state", "output": "stateN", "shape": [2, 1, 128]},
    "constants": {"sr": 16000},
}
VAD_POST = {"type": "vad", "threshold": 0.5, "min_silence_ms": 500, "speech_pad_ms": 30}
# Where the astronaut's face is in the 512x512 photograph (checked by drawing the detected box once).
FACE_REGION = (150, 50, 300, 200)


def load(path: Path) -> Session:
    return backend_for_file(path).load(path, [])


@pytest.fixture(scope="module")
def face(samples: dict[str, Path]) -> Session:
    return load(samples["face_detection"])


@pytest.fixture(scope="module")
def silero(samples: dict[str, Path]) -> Session:
    return load(samples["silero_vad"])


def photo(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def frame(image: np.ndarray, index: int = 0, full_size: tuple[int, int] | None = None) -> Frame:
    return Frame(image, time.time(), index, "test", full_size)


def detect(session: Session, image: np.ndarray, full_size: tuple[int, int] | None = None,
           **pre_options: Any) -> list[dict[str, Any]]:
    pre = make_preprocessor({**FACE_PRE, **pre_options}, session.inputs)
    post = make_postprocessor(FACE_POST, session.outputs)
    prepared = next(iter(pre(frame(image, full_size=full_size))))
    result = post(session.run(prepared.feeds), prepared.meta)
    assert result is not None
    return [d for d in result["detections"] if d["score"] > 0.5]


def inside(box: list[float], region: tuple[float, float, float, float]) -> bool:
    return region[0] <= box[0] < box[2] <= region[2] and region[1] <= box[1] < box[3] <= region[3]


# --- face detection end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_face_found_on_astronaut_in_source_coordinates(face: Session, samples: dict[str, Path], resize: str) -> None:
    image = photo(samples["astronaut"])
    faces = detect(face, image, resize=resize)
    assert len(faces) == 1, faces
    assert faces[0]["label"] == "face"
    assert inside(faces[0]["box"], FACE_REGION), faces


def test_no_face_on_coffee(face: Session, samples: dict[str, Path]) -> None:
    image = photo(samples["coffee"])
    assert detect(face, image, resize="letterbox") == []
    assert detect(face, image, resize="stretch") == []


def test_letterbox_on_a_crop_maps_boxes_back(face: Session, samples: dict[str, Path]) -> None:
    image = photo(samples["astronaut"])
    full = detect(face, image, resize="letterbox")[0]["box"]
    top = 30
    crop = np.ascontiguousarray(image[top : top + 300])  # 512x300: letterboxed with 33 px bands top and bottom
    faces = detect(face, crop, resize="letterbox")
    assert len(faces) == 1
    box = faces[0]["box"]
    expected = [full[0], full[1] - top, full[2], full[3] - top]
    assert np.allclose(box, expected, atol=8), (box, expected)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_frame_decoded_smaller_maps_boxes_to_the_captured_frame(face: Session, samples: dict[str, Path],
                                                                 resize: str) -> None:
    """A source's reduced JPEG decode (1/4 size) gives the same boxes, in captured-frame pixels."""
    image = cv2.resize(photo(samples["astronaut"]), (640, 480))
    jpeg = cv2.imencode(".jpg", image)[1]
    full = detect(face, cv2.imdecode(jpeg, cv2.IMREAD_COLOR), resize=resize)
    small = cv2.imdecode(jpeg, cv2.IMREAD_REDUCED_COLOR_4)
    assert small.shape == (120, 160, 3)
    reduced = detect(face, small, full_size=(640, 480), resize=resize)
    assert len(full) == len(reduced) == 1
    assert np.allclose(reduced[0]["box"], full[0]["box"], atol=6), (reduced, full)
    pre = make_preprocessor({**FACE_PRE, "resize": resize}, face.inputs)
    assert next(iter(pre(frame(small, full_size=(640, 480))))).meta["source_size"] == (640, 480)


def test_keypoints_inside_the_face_box(face: Session, samples: dict[str, Path]) -> None:
    """Keypoints land inside the face box (what pre/post cost per frame: bench/streams.py)."""
    image = photo(samples["astronaut"])
    pre = make_preprocessor({**FACE_PRE, "resize": "letterbox"}, face.inputs)
    post = make_postprocessor({**FACE_POST, "keypoints": True}, face.outputs)
    prepared = next(iter(pre(frame(image, 0))))
    result = post(face.run(prepared.feeds), prepared.meta)
    assert result is not None
    det = result["detections"][0]
    assert len(det["keypoints"]) == 6
    x1, y1, x2, y2 = det["box"]
    assert all(x1 - 10 <= x <= x2 + 10 and y1 - 10 <= y <= y2 + 10 for x, y in det["keypoints"])


def test_mediapipe_anchors() -> None:
    anchors = ssd_anchors(input_width=128, input_height=128, strides=[8, 16, 16, 16])
    assert anchors.shape == (896, 4)
    assert np.allclose(anchors[0], [0.5 / 16, 0.5 / 16, 1, 1])
    assert np.allclose(anchors[1], anchors[0])  # two anchors per cell in the first layer
    assert np.allclose(anchors[512], [0.5 / 8, 0.5 / 8, 1, 1])  # then 6 per cell on the 8x8 map


# --- image pre-processing units -----------------------------------------------------------------------------------


def test_image_nchw_quantized_and_raw() -> None:
    image = np.zeros((50, 100, 3), np.uint8)
    image[:, :, 2] = 255  # red in BGR
    quant = TensorSpec("x", np.dtype(np.int8), (1, 3, 20, 20), Quantization(1 / 255, -128))
    prepared = next(iter(make_preprocessor({"type": "image", "resize": "letterbox"}, [quant])(frame(image))))
    x = prepared.feeds["x"]
    assert x.shape == (1, 3, 20, 20) and x.dtype == np.int8
    assert x[0, 0, 10, 10] == 127 and x[0, 2, 10, 10] == -128  # red first (rgb), quantized
    assert x[0, 0, 0, 0] == -128  # letterbox band (pad_value 0)
    assert prepared.meta["pad"] == (0.0, 5.0) and prepared.meta["scale"] == (0.2, 0.2)
    raw = TensorSpec("x", np.dtype(np.uint8), (1, 20, 20, 3), Quantization(1 / 255, 0))
    pre = make_preprocessor({"type": "image", "raw_uint8": True, "color": "bgr"}, [raw])
    x = next(iter(pre(frame(image)))).feeds["x"]
    assert x.dtype == np.uint8 and x[0, 5, 5].tolist() == [0, 0, 255]
    f32 = TensorSpec("x", np.dtype(np.float32), (1, 20, 20, 3))
    pre = make_preprocessor({"type": "image", "mean": [0, 0, 127.5], "std": [1, 1, 127.5]}, [f32])
    x = next(iter(pre(frame(image)))).feeds["x"]
    assert np.allclose(x[0, 5, 5], [(255 - 0) / 1, 0, -1])


def test_image_rejects_audio_and_bad_frames(face: Session) -> None:
    pre = make_preprocessor(FACE_PRE, face.inputs)
    with pytest.raises(PipelineError, match="not a video frame"):
        next(iter(pre(AudioChunk(np.zeros(10, np.float32), 16000, 0.0, 0, "a"))))
    with pytest.raises(PipelineError, match="expected HxWx3 uint8"):
        next(iter(pre(frame(np.zeros((10, 10, 3), np.float32)))))


# --- YOLO decoding and NMS ------------------------------------------------------------------------------------------


def yolo_rows() -> np.ndarray:
    """Three boxes in a 640x640 input: two overlapping 'cat's, one 'dog' overlapping the first cat."""
    return np.array(
        [
            [100, 100, 80, 80, 0.9, 0.95, 0.05],  # cat 0.855
            [104, 102, 80, 80, 0.9, 0.80, 0.10],  # cat 0.72: suppressed by the first
            [102, 100, 80, 80, 0.9, 0.10, 0.90],  # dog 0.81: kept (other class)
            [400, 300, 50, 100, 0.1, 0.90, 0.10],  # cat 0.09: under the score threshold
        ],
        np.float32,
    )


def test_yolo_v5_decode_nms_and_labels() -> None:
    spec = TensorSpec("out", np.dtype(np.float32), (1, 4, 7))
    post = make_postprocessor({"type": "detection", "format": "yolo", "iou_threshold": 0.5}, [spec], ["cat", "dog"])
    result = post({"out": yolo_rows()[None]}, {})
    assert result is not None
    dets = result["detections"]
    assert [d["label"] for d in dets] == ["cat", "dog"]
    assert dets[0]["box"] == [60.0, 60.0, 140.0, 140.0] and dets[0]["score"] == pytest.approx(0.855, abs=1e-3)
    agnostic = make_postprocessor(
        {"type": "detection", "format": "yolo", "class_agnostic": True}, [spec], ["cat", "dog"]
    )
    assert len(agnostic({"out": yolo_rows()[None]}, {})["detections"]) == 1  # type: ignore[index]


def test_yolo_v8_layout_and_letterbox_mapping() -> None:
    rows = yolo_rows()
    v8 = np.concatenate([rows[:, :4], rows[:, 5:] * rows[:, 4:5]], axis=1).T[None]  # [1, 4 + C, N]
    spec = TensorSpec("out", np.dtype(np.float32), (1, 6, 4))
    post = make_postprocessor({"type": "detection", "format": "yolo"}, [spec], ["cat", "dog"])
    meta = {"scale": (0.5, 0.5), "pad": (0.0, 40.0), "source_size": (1280, 1120)}
    result = post({"out": v8}, meta)
    assert result is not None
    assert [d["label"] for d in result["detections"]] == ["cat", "dog"]
    assert result["detections"][0]["box"] == [120.0, 40.0, 280.0, 200.0]


def test_nms_and_to_source_units() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5, 10).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5, 1).tolist() == [0]
    assert nms(boxes, scores, 0.5, 10, np.array([0, 1, 0, 1])).tolist() == [0, 1, 2]
    mapped = to_source(
        np.array([[0, 10, 64, 74]], np.float32), {"scale": (0.5, 0.25), "pad": (0, 10), "source_size": (100, 100)}
    )
    assert mapped.tolist() == [[0, 0, 100, 100]]  # clipped to the source


def test_classification_and_raw() -> None:
    spec = TensorSpec("logits", np.dtype(np.float32), (1, 3))
    post = make_postprocessor(
        {"type": "classification", "top_k": 2, "softmax": True, "threshold": 0.1}, [spec], ["a", "b", "c"]
    )
    result = post({"logits": np.array([[1.0, 3.0, 0.0]])}, {})
    assert result is not None
    assert [(x["label"], x["index"]) for x in result["labels"]] == [("b", 1), ("a", 0)]
    assert result["labels"][0]["score"] == pytest.approx(0.8438, abs=1e-3)
    raw = make_postprocessor({"type": "raw"}, [spec])
    assert raw({"logits": np.array([[1.0, 2.0, 3.0]], np.float32)}, {}) == {"outputs": {"logits": [[1, 2, 3]]}}


# --- audio pre-processing units -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "hop", "context"), [(512, 512, 0), (512, 512, 64), (400, 160, 0), (100, 30, 7)])
def test_ring_buffer_windows_without_gaps(window: int, hop: int, context: int) -> None:
    rng = np.random.default_rng(window + hop)
    signal = rng.standard_normal(20_000).astype(np.float32)
    ring = SampleRing(window, hop, context)
    windows: list[tuple[int, np.ndarray]] = []
    pos = 0
    while pos < len(signal):
        size = int(rng.integers(1, 1500))
        ring.push(signal[pos : pos + size])
        pos += size
        while (w := ring.pop()) is not None:
            windows.append(w)
    assert len(windows) == (len(signal) - window) // hop + 1
    padded = np.concatenate([np.zeros(context, np.float32), signal])
    for i, (first, x) in enumerate(windows):
        assert first == i * hop
        assert np.array_equal(x, padded[first : first + context + window])
    if hop == window and context == 0:
        joined = np.concatenate([x for _, x in windows])
        assert np.array_equal(joined, signal[: len(joined)])
    assert len(ring.buf) <= context + window + 1500  # bounded


@pytest.mark.parametrize("rate_in", [8000, 22050, 44100, 48000])
def test_resampler_is_accurate_and_continuous(rate_in: int) -> None:
    t = np.arange(rate_in * 2) / rate_in
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    resampler = Resampler(rate_in, 16000)
    rng = np.random.default_rng(1)
    parts, pos = [], 0
    while pos < len(tone):
        size = int(rng.integers(1, 3000))
        parts.append(resampler(tone[pos : pos + size]))
        pos += size
    out = np.concatenate(parts)
    ideal = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / 16000) + 0.3 * np.sin(
        2 * np.pi * 3000 * np.arange(len(out)) / 16000
    )
    assert len(out) >= 2 * 16000 - 200
    middle = slice(200, len(out) - 200)
    assert np.max(np.abs(out[middle] - ideal[middle])) < 0.01  # sample-exact timing, no chunk-edge clicks


def test_resampler_removes_content_above_the_new_nyquist() -> None:
    t = np.arange(44100) / 44100
    alias = np.sin(2 * np.pi * 12000 * t).astype(np.float32)  # above 8 kHz: must not fold back to 4 kHz
    out = Resampler(44100, 16000)(alias)
    assert np.sqrt(np.mean(out[500:-500] ** 2)) < 0.01


def test_log_mel_features() -> None:
    spec = TensorSpec("mel", np.dtype(np.float32), (1, 98, 40))
    pre = make_preprocessor(
        {
            "type": "audio",
            "window": 16000,
            "features": {"type": "log_mel", "n_fft": 400, "hop_length": 160, "n_mels": 40, "fmin": 20, "fmax": 8000},
        },
        [spec],
    )
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    prepared = list(pre(AudioChunk(tone, 16000, 0.0, 0, "a")))
    assert len(prepared) == 1
    mel = prepared[0].feeds["mel"]
    assert mel.shape == (1, 98, 40) and mel.dtype == np.float32
    peak = int(np.argmax(mel[0].mean(axis=0)))
    hz = 700 * (10 ** (np.linspace(2595 * np.log10(1 + 20 / 700), 2595 * np.log10(1 + 8000 / 700), 42) / 2595) - 1)
    assert hz[peak] <= 1000 <= hz[peak + 2]
    assert prepared[0].meta["start"] == 0 and prepared[0].meta["end"] == 1.0


def test_stereo_int16_is_mixed_down() -> None:
    spec = TensorSpec("x", np.dtype(np.float32), (1, 4))
    pre = make_preprocessor({"type": "audio"}, [spec])
    stereo = np.array([[16384, 0], [16384, 16384], [0, 0], [-32768, -32768]], np.int16)
    x = next(iter(pre(AudioChunk(stereo, 16000, 0.0, 0, "a")))).feeds["x"]
    assert x.tolist() == [[0.25, 0.5, 0.0, -1.0]]


# --- Silero VAD on real speech --------------------------------------------------------------------------------------


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768, w.getframerate()


def speak(directory: Path, text: str, rate: int, voice: str = "en") -> Path:
    out = directory / f"{text}.{voice}.{rate}.wav"
    return out if out.exists() else media.speech_wav(out, text, rate, voice)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


def padded(samples: np.ndarray, rate: int, before: float = 1.0, after: float = 1.0) -> np.ndarray:
    return np.concatenate([np.zeros(int(rate * before), np.float32), samples, np.zeros(int(rate * after), np.float32)])


def stream(pre: Any, post: Any, session: Session, signal: np.ndarray, rate: int, seed: int = 0) -> list[dict[str, Any]]:
    """Feed ``signal`` in random-sized chunks, like a capture device; run the model window by window."""
    rng = np.random.default_rng(seed)
    results, pos = [], 0
    while pos < len(signal):
        size = int(rng.integers(rate // 100, rate // 5))
        for prepared in pre(AudioChunk(signal[pos : pos + size], rate, 1000.0 + pos / rate, pos, "wav")):
            outputs = session.run(prepared.feeds)
            pre.update(outputs)
            result = post(outputs, prepared.meta)
            if result is not None:
                results.append(result)
        pos += size
    return results


def speech_bounds(samples: np.ndarray, rate: int, offset: float = 1.0) -> tuple[float, float]:
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return offset + loud[0] / rate, offset + loud[-1] / rate


@pytest.mark.parametrize("rate", [16000, 8000, 44100])
def test_silero_vad_finds_one_segment(silero: Session, speech_dir: Path, rate: int) -> None:
    speech, wav_rate = read_wav(speak(speech_dir, "the quick brown fox jumps over the lazy dog", rate))
    assert wav_rate == rate
    start, end = speech_bounds(speech, rate)
    pre = make_preprocessor(VAD_PRE, silero.inputs, silero.outputs)
    post = make_postprocessor(VAD_POST, silero.outputs)
    events = stream(pre, post, silero, padded(speech, rate), rate)
    assert [e["event"] for e in events] == ["speech_start", "speech_end"], events
    assert abs(events[0]["t"] - start) < 0.1, (events, start, end)
    assert events[1]["start"] == events[0]["t"]
    assert abs(events[1]["end"] - end) < 0.2, (events, start, end)


def test_silero_vad_silence_has_no_events(silero: Session) -> None:
    rng = np.random.default_rng(3)
    quiet = (rng.standard_normal(16000 * 3) * 1e-4).astype(np.float32)  # 3 s of near-silence (mic noise floor)
    pre = make_preprocessor(VAD_PRE, silero.inputs, silero.outputs)
    post = make_postprocessor({**VAD_POST, "report_probability": True}, silero.outputs)
    results = stream(pre, post, silero, quiet, 16000)
    assert len(results) == len(quiet) // 512  # one probability per window when asked
    assert all("event" not in r and r["probability"] < 0.2 for r in results)


def test_vad_hysteresis_on_synthetic_probabilities() -> None:
    spec = TensorSpec("output", np.dtype(np.float32), (None, 1))
    post = make_postprocessor(
        {
            "type": "vad",
            "threshold": 0.5,
            "neg_threshold": 0.35,
            "min_speech_ms": 96,
            "min_silence_ms": 96,
            "speech_pad_ms": 0,
        },
        [spec],
    )
    probs = [
        0.1,
        0.9,
        0.1,  # a 32 ms blip: shorter than min_speech
        0.6,
        0.4,
        0.45,
        0.9,
        0.4,  # speech; 0.4-0.45 sit between the thresholds: no change
        0.2,
        0.9,  # a short dip is not silence
        0.1,
        0.1,
        0.1,
        0.1,
    ]
    events = []
    for i, p in enumerate(probs):
        r = post({"output": np.array([[p]], np.float32)}, {"start": i * 0.032, "end": (i + 1) * 0.032})
        if r:
            events.append(r)
    assert events == [{"event": "speech_start", "t": 0.096}, {"event": "speech_end", "start": 0.096, "end": 0.32}]


# --- wake word ------------------------------------------------------------------------------------------------------


def wake_events(samples: dict[str, Path], signal: np.ndarray) -> list[dict[str, Any]]:
    session = load(samples["okay_nabu"])  # fresh: the streaming model keeps state inside the interpreter
    pre = make_preprocessor({"type": "audio", "features": "micro_frontend"}, session.inputs, session.outputs)
    post = make_postprocessor(
        {"type": "wake_word", "threshold": 0.85, "window": 5, "refractory_s": 2.0, "label": "okay_nabu"},
        session.outputs,
    )
    return stream(pre, post, session, signal, 16000)


def test_wake_word_ignores_silence_and_other_speech(samples: dict[str, Path], speech_dir: Path) -> None:
    assert wake_events(samples, np.zeros(16000 * 2, np.float32)) == []
    hello, _ = read_wav(speak(speech_dir, "hello world", 16000))
    assert wake_events(samples, padded(hello, 16000, 0.5, 1.0)) == []


@pytest.mark.parametrize("voice", ["en", "en-us"])
def test_wake_word_fires_once_on_okay_nabu(samples: dict[str, Path], speech_dir: Path, voice: str) -> None:
    said, _ = read_wav(speak(speech_dir, "okay nabu", 16000, voice))
    events = wake_events(samples, padded(said, 16000, 0.5, 1.0))
    assert len(events) == 1, events
    assert events[0]["event"] == "wake_word" and events[0]["label"] == "okay_nabu" and events[0]["score"] > 0.85
    _, end = speech_bounds(said, 16000, 0.5)
    assert 0.5 < events[0]["t"] <= end + 0.5


def test_wake_word_refractory_period() -> None:
    spec = TensorSpec("p", np.dtype(np.uint8), (1, 1), Quantization(1 / 256, 0))
    post = make_postprocessor({"type": "wake_word", "threshold": 0.8, "window": 3, "refractory_s": 1.0}, [spec])
    events = []
    for i in range(100):  # 30 ms per inference, always confident: 3 s
        t = (i + 1) * 0.03
        r = post({"p": np.array([[0.95]], np.float32)}, {"start": t - 0.03, "end": t})
        if r:
            events.append(r)
    times = [e["t"] for e in events]
    assert times[0] == pytest.approx(0.09)  # the window of 3 fills first
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert len(events) == 3 and events[0]["label"] == "wake_word"


# --- mismatches are rejected at construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**FACE_PRE, "input": "image"}, r"preprocess\.input: 'image' is not a model input"),
        ({**FACE_PRE, "size": [192, 192]}, r"preprocess\.size: \[192, 192\] does not match input 'input'"),
        ({**FACE_PRE, "layout": "nchw"}, r"preprocess\.layout: nchw gives 128 channels"),
        ({**FACE_PRE, "resize": "crop"}, r"preprocess\.resize: must be one of stretch, letterbox"),
        ({**FACE_PRE, "mean": [0.5], "scale": 2.0}, r"preprocess\.scale: give either mean/std or scale/offset"),
        ({**FACE_PRE, "colour": "rgb"}, r"preprocess\.colour: unknown option"),
        ({"type": "video"}, r"unknown pre-processing type 'video'"),
        ({"type": "image", "raw_uint8": True}, r"preprocess\.raw_uint8: input 'input' is float32"),
    ],
)
def test_image_preprocess_mismatch(face: Session, spec: dict[str, Any], match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        make_preprocessor(spec, face.inputs)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**VAD_PRE, "input": "audio"}, r"preprocess\.input: 'audio' is not a model input"),
        ({**VAD_PRE, "state": {"input": "state", "output": "state_out"}}, r"preprocess\.state\.output: 'state_out'"),
        (
            {**VAD_PRE, "state": {"input": "state", "output": "stateN", "shape": [2, 1, 64]}},
            r"preprocess\.state\.shape: \[2, 1, 64\] does not fit",
        ),
        ({**VAD_PRE, "input": "input", "constants": {}}, r"preprocess\.constants: model inputs sr are not fed"),
        ({**VAD_PRE, "constants": {"rate": 16000}}, r"preprocess\.constants: 'rate' is not a model input"),
        ({**VAD_PRE, "features": "mfcc"}, r"preprocess\.features: must be none, log_mel or micro_frontend"),
    ],
)
def test_audio_preprocess_mismatch(silero: Session, spec: dict[str, Any], match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        make_preprocessor(spec, silero.inputs, silero.outputs)


def test_micro_frontend_mismatch(silero: Session, samples: dict[str, Path]) -> None:
    nabu = load(samples["okay_nabu"])
    with pytest.raises(PipelineError, match=r"preprocess\.stride: 4 does not match"):
        make_preprocessor({"type": "audio", "features": "micro_frontend", "stride": 4}, nabu.inputs)
    with pytest.raises(PipelineError, match=r"preprocess\.features: micro_frontend gives 40 features"):
        make_preprocessor(
            {
                "type": "audio",
                "features": "micro_frontend",
                "input": "input",
                "constants": {"sr": 1},
                "state": {"input": "state", "output": "stateN", "shape": [2, 1, 128]},
            },
            silero.inputs,
        )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({**FACE_POST, "boxes": "boxes"}, r"postprocess\.boxes: 'boxes' is not a model output"),
        ({**FACE_POST, "scores": "scores"}, r"postprocess\.scores: 'scores' is not a model output"),
        ({**FACE_POST, "strides": [8, 16, 16]}, r"postprocess\.strides: .* give 768 anchors, but output 'regressors'"),
        ({**FACE_POST, "num_layers": 5}, r"postprocess\.num_layers: 5 layers but 4 strides"),
        ({**FACE_POST, "input_size": 256}, r"postprocess\.strides: .* 256x256 input give 3584 anchors"),
        ({"type": "detection"}, r"postprocess\.format: required"),
        ({"type": "detection", "format": "yolo"}, r"postprocess\.output: required: the model has 2 outputs"),
        ({"type": "classification", "output": "scores"}, r"postprocess\.output: 'scores' is not a model output"),
        ({"type": "vad", "output": "regressors"}, r"postprocess\.output: 'regressors' has shape \[1, 896, 16\]"),
        ({"type": "threshold"}, r"unknown post-processing type 'threshold'"),
    ],
)
def test_postprocess_mismatch(face: Session, spec: dict[str, Any], match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        make_postprocessor(spec, face.outputs)


def test_labels_must_match_classes() -> None:
    spec = TensorSpec("logits", np.dtype(np.float32), (1, 3))
    with pytest.raises(PipelineError, match=r"postprocess\.output: 'logits' has 3 classes but the bundle has 2"):
        make_postprocessor({"type": "classification"}, [spec], ["a", "b"])
    yolo = TensorSpec("out", np.dtype(np.float32), (1, 100, 85))
    with pytest.raises(PipelineError, match=r"has 80 classes but the bundle has 2 labels"):
        make_postprocessor({"type": "detection", "format": "yolo", "layout": "v5"}, [yolo], ["a", "b"])


@pytest.mark.parametrize(
    ("make", "spec", "match"),
    [
        ("pre", {"type": "image", "size": [128, 128, 3]}, r"preprocess\.size: must have at most 2 values, got 3"),
        ("pre", {"type": "image", "pad_value": 300}, r"preprocess\.pad_value: must be <= 255, got 300"),
        ("pre", {"type": "image", "raw_uint8": "yes"}, r"preprocess\.raw_uint8: must be true or false, got 'yes'"),
        ("pre", {"type": "image", "std": [1, 0, 1]}, r"preprocess\.std: must not contain 0"),
        ("pre", {"type": "audio", "sample_rate": "16000"}, r"preprocess\.sample_rate: must be an integer, got '16000'"),
        ("pre", {"type": "audio", "features": {"type": "log_mel", "n_ftt": 400}},
         r"preprocess\.features\.n_ftt: unknown option$"),
        ("pre", {"type": "audio", "features": {"type": "micro_frontend", "n_fft": 400}},
         r"preprocess\.features\.n_fft: unknown option$"),
        ("pre", {"type": "audio", "state": {"input": "state"}}, r"preprocess\.state\.output: required"),
        ("pre", {"type": "audio", "window": 512, "stride": 3},
         r"preprocess\.stride: applies to features micro_frontend"),
        ("pre", {"type": 3}, r"preprocess\.type: must be a string, got 3"),
        ("pre", {"size": [128, 128]}, r"preprocess\.type: required"),
        ("pre", ["image"], r"preprocess: must be an object with a 'type', got list"),
        ("post", {"type": "classification", "top_k": 0}, r"postprocess\.top_k: must be >= 1, got 0"),
        ("post", {"type": "classification", "top_k": 2.5}, r"postprocess\.top_k: must be an integer, got 2\.5"),
        ("post", {"type": "detection", "format": "ssd"}, r"postprocess\.format: must be one of mediapipe_ssd, yolo"),
        ("post", {"type": "detection", "format": "yolo", "strides": [8]},
         r"postprocess\.strides: applies to format mediapipe_ssd only"),
        ("post", {"type": "raw", "outputs": "regressors"}, r"postprocess\.outputs: must be a list, got 'regressors'"),
        ("post", {"type": "raw", "outputs": ["scores"]}, r"postprocess\.outputs: 'scores' is not a model output"),
        ("post", {"type": "vad", "threshold": 0.3, "neg_threshold": 0.4},
         r"postprocess\.neg_threshold: must be <= threshold"),
        ("post", {"type": "wake_word", "colour": 1}, r"postprocess\.colour: unknown option for type 'wake_word'"),
    ],
)
def test_options_are_typed_and_named(face: Session, make: str, spec: Any, match: str) -> None:
    """Every option is checked by its type's pydantic model, and the error names it as in the manifest."""
    with pytest.raises(PipelineError, match=match) as err:
        if make == "pre":
            make_preprocessor(spec, face.inputs)
        else:
            make_postprocessor(spec, face.outputs)
    assert err.value.code == "bad_pipeline"


def test_null_options_take_their_defaults_and_options_models_are_accepted(face: Session) -> None:
    pre = make_preprocessor({**FACE_PRE, "resize": None, "input": None}, face.inputs)
    assert pre.resize == "stretch"  # type: ignore[attr-defined]
    options = ImagePreprocessor.Options.model_validate({**FACE_PRE, "resize": "letterbox"})
    assert make_preprocessor(options, face.inputs).resize == "letterbox"  # type: ignore[attr-defined]


def test_state_is_carried_between_windows() -> None:
    inputs = [
        TensorSpec("x", np.dtype(np.float32), (None, None)),
        TensorSpec("h", np.dtype(np.float32), (2, None, 3)),
        TensorSpec("sr", np.dtype(np.int64), ()),
    ]
    outputs = [TensorSpec("y", np.dtype(np.float32), (None, 1)), TensorSpec("hN", np.dtype(np.float32), (2, None, 3))]
    spec = {"type": "audio", "window": 4, "state": {"input": "h", "output": "hN"}, "constants": {"sr": 16000}}
    pre = make_preprocessor(spec, inputs, outputs)
    seen = []
    for i, prepared in enumerate(pre(AudioChunk(np.arange(12, dtype=np.float32), 16000, 0.0, 0, "a"))):
        assert prepared.feeds["x"].shape == (1, 4)
        assert prepared.feeds["sr"].dtype == np.int64 and prepared.feeds["sr"].shape == ()
        seen.append(prepared.feeds["h"].copy())
        pre.update({"y": np.zeros((1, 1)), "hN": np.full((2, 1, 3), i + 1.0)})
    assert [float(h[0, 0, 0]) for h in seen] == [0.0, 1.0, 2.0]
    assert seen[0].shape == (2, 1, 3)


@pytest.mark.parametrize("size", [(128, 128), (192, 192), (224, 224), (300, 300), (320, 240), (160, 100)])
def test_shrinking_stays_within_a_grey_level_of_area_averaging(samples: dict[str, Path], size: tuple[int, int]) -> None:
    """The fast two-step reduction (bilinear to twice the size, then area 2:1) against OpenCV's
    area averaging, the reference without aliasing, on photographs at a camera's 640x480."""
    from agent.pipelines.preprocess import _shrink

    for name in ("astronaut", "coffee"):
        photo = cv2.resize(cv2.imread(str(samples[name]), cv2.IMREAD_COLOR), (640, 480), interpolation=cv2.INTER_AREA)
        got = _shrink(photo, *size).astype(np.float32)
        want = cv2.resize(photo, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        assert got.shape == want.shape
        assert float(np.abs(got - want).mean()) < 1.0, (name, size)
