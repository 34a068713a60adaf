"""Sources against real media: OpenCV-written videos, image directories, WAV files, FIFOs and pipes."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.pipelines.base import AudioChunk, Frame, PipelineError, Source, SourceEnded, SourceError
from agent.pipelines.sources import (
    AlsaSource,
    SourceOptionError,
    VideoSource,
    WavSource,
    alsa,
    create_source,
    to_bgr,
)
from tests import media

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    """Time that moves only when a source sleeps: pacing is checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every pacer and sample clock the sources create runs on one FakeClock."""
    from agent.pipelines.sources import _common, images, video, wav

    fake = FakeClock()
    pacer = lambda interval: _common.Pacer(interval, clock=fake.clock, sleep=fake.sleep)  # noqa: E731
    monkeypatch.setattr(video, "Pacer", pacer)
    monkeypatch.setattr(images, "Pacer", pacer)
    monkeypatch.setattr(wav, "SampleClock",
                        lambda rate: _common.SampleClock(rate, clock=fake.clock, sleep=fake.sleep))
    return fake


def read_all(source: Source, limit: int = 10_000, timeout: float = 1.0) -> list[Any]:
    """Items until SourceEnded (None results retried)."""
    items: list[Any] = []
    while len(items) < limit:
        try:
            item = source.read(timeout)
        except SourceEnded:
            return items
        if item is not None:
            items.append(item)
    raise AssertionError(f"more than {limit} items")


def next_item(source: Source, timeout: float = 1.0) -> Any:
    """The next item, waiting through None results (bounded by the test timeout)."""
    while (item := source.read(timeout)) is None:
        pass
    return item


# --- options and the registry ---------------------------------------------------------------------------------


def test_create_source_builds_each_type_with_its_options(tmp_path: Path) -> None:
    src = create_source({"type": "video", "path": str(tmp_path / "a.avi"), "loop": True, "realtime": "true"})
    assert isinstance(src, VideoSource)
    assert src.opts.loop is True and src.opts.realtime is True  # env overrides arrive as strings
    for spec in (
        {"type": "camera", "device": "/dev/video3", "width": 640, "height": 480, "fps": 30},
        {"type": "images", "path": str(tmp_path), "fps": 5, "loop": True},
        {"type": "wav", "path": "x.wav", "chunk_ms": 20},
        {"type": "pcm", "path": "-", "sample_rate": 16000, "format": "f32le", "channels": 2},
        {"type": "alsa", "device": "hw:1,0"},
    ):
        assert create_source(spec).type == spec["type"]


def test_create_source_unknown_or_missing_type() -> None:
    with pytest.raises(PipelineError, match=r"unknown source type 'webcam'.*camera"):
        create_source({"type": "webcam"})
    with pytest.raises(PipelineError, match="needs a 'type'"):
        create_source({"path": "x.avi"})


@pytest.mark.parametrize(
    ("spec", "option", "reason"),
    [
        ({"type": "video", "path": "a.avi", "lop": True}, "lop", "unknown option"),
        ({"type": "video"}, "path", "required option is missing"),
        ({"type": "wav", "path": "a.wav", "chunk_ms": 0}, "chunk_ms", "greater than 0"),
        ({"type": "pcm", "path": "-", "sample_rate": 16000, "format": "s24le"}, "format", "s16le"),
        ({"type": "pcm", "path": "-"}, "sample_rate", "required option is missing"),
        ({"type": "images", "path": "d", "loop": "sometimes"}, "loop", "boolean"),
        ({"type": "camera", "device": -1}, "device", ">= 0"),
    ],
)
def test_create_source_bad_option_is_named(spec: dict, option: str, reason: str) -> None:
    with pytest.raises(SourceOptionError, match=reason) as err:
        create_source(spec)
    assert err.value.option == option
    assert err.value.source_type == spec["type"]
    assert f"option {option!r}" in str(err.value)
    assert isinstance(err.value, PipelineError)


def test_to_bgr_converts_gray_bgra_and_16_bit() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_bgr(gray, "t")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out[:, :, 0] == gray).all() and (out[:, :, 2] == gray).all()
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 99
    out = to_bgr(bgra, "t")
    assert out.shape == (2, 2, 3) and (out[0, 0] == [10, 0, 200]).all() and out.flags.c_contiguous
    assert (to_bgr(np.full((2, 2, 3), 0xABCD, np.uint16), "t") == 0xAB).all()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [[1, 2], [3, 4]],
        np.zeros((4,), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4, 4, 3), np.float32),
    ],
)
def test_to_bgr_rejects_what_is_not_an_image(bad: object) -> None:
    with pytest.raises(SourceError, match="cam0"):
        to_bgr(bad, "cam0")


# --- video files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "ext"), [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_video_file_frames_count_order_size_and_bgr(tmp_path: Path, codec: str, ext: str) -> None:
    path = media.make_video(tmp_path / f"clip{ext}", codec=codec, size=(160, 120), n=20)
    src = create_source({"type": "video", "path": str(path)})
    src.open()
    frames = read_all(src)
    assert len(frames) == 20
    assert [f.index for f in frames] == list(range(20))
    for i, f in enumerate(frames):
        assert isinstance(f, Frame) and f.source == str(path)
        assert f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8
        # the square is red in BGR order; its position tells the frame number
        assert abs(media.find_square(f.image) - (media.square_x(i, 20, 160) + media.SQUARE / 2 - 0.5)) < 2
    with pytest.raises(SourceEnded, match="ended after 20 frames"):
        src.read(0.1)
    with pytest.raises(SourceEnded):  # and stays ended
        src.read(0.1)
    src.close()


def test_video_loop_restarts_at_the_first_frame(tmp_path: Path) -> None:
    path = media.make_video(tmp_path / "short.avi", n=5)
    src = create_source({"type": "video", "path": str(path), "loop": True})
    src.open()
    frames = [next_item(src) for _ in range(12)]
    src.close()
    assert [f.index for f in frames] == list(range(12))
    xs = [media.find_square(f.image) for f in frames]
    expected = [media.square_x(i % 5, 5, 160) + media.SQUARE / 2 - 0.5 for i in range(12)]
    assert np.allclose(xs, expected, atol=2), (xs, expected)


def test_video_realtime_pacing_follows_the_file_fps(tmp_path: Path, fake_clock: FakeClock) -> None:
    path = media.make_video(tmp_path / "ten.avi", fps=10, n=10)
    fast = create_source({"type": "video", "path": str(path)})
    fast.open()
    assert len(read_all(fast)) == 10
    assert fake_clock.sleeps == []  # not paced: as fast as it decodes

    paced = create_source({"type": "video", "path": str(path), "realtime": True})
    paced.open()
    t0 = fake_clock.now
    first = paced.read(1.0)
    assert first is not None and fake_clock.now == t0  # the first frame at once
    assert paced.read(0.01) is None  # the next frame is not due for 100 ms
    frames = [first, *read_all(paced)]
    assert len(frames) == 10
    assert fake_clock.now - t0 == pytest.approx(0.9)  # 9 intervals of 100 ms after the first frame


def test_video_realtime_pacing_on_the_real_clock(tmp_path: Path) -> None:
    """On the real clock a paced file is never faster than real time (load can only slow it)."""
    path = media.make_video(tmp_path / "ten.avi", fps=20, n=6)
    paced = create_source({"type": "video", "path": str(path), "realtime": True})
    paced.open()
    t0 = time.monotonic()
    assert len(read_all(paced)) == 6
    assert time.monotonic() - t0 >= 5 * 0.05 * 0.95


def test_video_missing_and_garbage_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match=f"{re.escape(str(missing))}.*not found"):
        create_source({"type": "video", "path": str(missing)}).open()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(SourceError, match=f"cannot open video {re.escape(str(garbage))}") as err:
        create_source({"type": "video", "path": str(garbage)}).open()
    assert not isinstance(err.value, SourceEnded)
    with pytest.raises(SourceError, match="is not a file"):
        create_source({"type": "video", "path": str(tmp_path)}).open()


def test_video_read_before_open_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not open"):
        create_source({"type": "video", "path": str(tmp_path / "a.avi")}).read(0.1)


def test_unreachable_stream_is_a_source_error_without_the_password() -> None:
    src = create_source({"type": "video", "path": "rtsp://admin:hunter2@127.0.0.1:1/stream", "open_timeout": 2})
    t0 = time.monotonic()
    with pytest.raises(SourceError) as err:
        src.open()
    assert time.monotonic() - t0 < 40  # open_timeout ends the attempt (not a speed check: it would hang)
    assert "rtsp://admin:***@127.0.0.1:1/stream" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_video_built_from_a_photo_keeps_its_content(tmp_path: Path, samples: dict[str, Path]) -> None:
    frames, placements = media.photo_frames(samples["astronaut"], n=8, size=(320, 240))
    path = media.make_video(tmp_path / "astronaut.mp4", frames, codec="mp4v", fps=10)
    src = create_source({"type": "video", "path": str(path)})
    src.open()
    got = read_all(src)
    assert len(got) == 8 and placements[0][2] < placements[-1][2]  # the photo grows across the clip
    for want, have in zip(frames, got, strict=True):
        assert np.abs(want.astype(int) - have.image.astype(int)).mean() < 8  # lossy, but the same picture


@pytest.mark.parametrize(("need", "factor"), [((128, 96), 2), ((80, 60), 4), ((40, 30), 8), ((300, 200), 1)])
def test_mjpg_decodes_only_as_large_as_the_consumer_needs(tmp_path: Path, need: tuple[int, int], factor: int) -> None:
    path = media.make_video(tmp_path / "clip.avi", codec="MJPG", size=(320, 240), n=6)
    reference = create_source({"type": "video", "path": str(path), "reduced_decode": False})
    reference.open()
    full = read_all(reference)
    src = create_source({"type": "video", "path": str(path)})
    asked: list[tuple[int, int]] = []
    src.shrink_to = lambda w, h: asked.append((w, h)) or need
    src.open()
    frames = read_all(src)
    assert len(frames) == 6 and asked and set(asked) == {(320, 240)}
    for i, (f, ref) in enumerate(zip(frames[1:], full[1:], strict=True), start=1):  # the first is read at open
        assert f.image.shape == (240 // factor, 320 // factor, 3) and f.size == (320, 240)
        assert f.full_size == (None if factor == 1 else (320, 240))
        # the snapshot copy is the captured JPEG, full size, and the small frame is the same picture
        assert cv2.imdecode(np.frombuffer(f.encoded, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
        small = cv2.resize(ref.image, (320 // factor, 240 // factor), interpolation=cv2.INTER_AREA)
        assert np.abs(small.astype(int) - f.image.astype(int)).mean() < 6
        x = media.find_square(f.image) * factor + (factor - 1) / 2
        assert abs(x - (media.square_x(i, 6, 320) + media.SQUARE / 2 - 0.5)) < 2 + factor


def test_reduced_decode_only_for_mjpg_and_not_when_off(tmp_path: Path) -> None:
    mp4 = media.make_video(tmp_path / "clip.mp4", codec="mp4v", size=(320, 240), n=4)
    avi = media.make_video(tmp_path / "clip.avi", codec="MJPG", size=(320, 240), n=4)
    for spec in ({"path": str(mp4)}, {"path": str(avi), "reduced_decode": False}):
        src = create_source({"type": "video", **spec})
        src.shrink_to = lambda _w, _h: (40, 30)
        src.open()
        frames = read_all(src)
        assert [f.image.shape for f in frames] == [(240, 320, 3)] * 4
        assert all(f.full_size is None and f.encoded is None for f in frames)


def test_mjpg_loop_keeps_the_reduced_decode(tmp_path: Path) -> None:
    path = media.make_video(tmp_path / "short.avi", codec="MJPG", size=(320, 240), n=3)
    src = create_source({"type": "video", "path": str(path), "loop": True})
    src.shrink_to = lambda _w, _h: (80, 60)
    src.open()
    frames = [next_item(src) for _ in range(8)]
    src.close()
    assert [f.image.shape for f in frames[1:]] == [(60, 80, 3)] * 7


def test_camera_without_the_device_is_a_clear_source_error() -> None:
    node = next(f"/dev/video{i}" for i in range(40, 100) if not Path(f"/dev/video{i}").exists())
    with pytest.raises(SourceError, match=f"no capture device: camera {re.escape(str(node))} not found"):
        create_source({"type": "camera", "device": node}).open()
    with pytest.raises(SourceError, match=f"camera {re.escape(str(node))} not found"):
        create_source({"type": "camera", "device": int(node.removeprefix("/dev/video"))}).open()


# --- image directories ------------------------------------------------------------------------------------------


def test_images_in_name_order_with_corrupt_file_skipped_and_logged(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    written = media.make_images(d, n=4, corrupt=["001b.png"])
    cv2.imwrite(str(d / "004.png"), np.full((10, 12), 77, np.uint8))  # grayscale
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 1], bgra[..., 3] = 200, 128
    cv2.imwrite(str(d / "005.png"), bgra)
    (d / "notes.txt").write_text("not an image, not even tried")
    src = create_source({"type": "images", "path": str(d)})
    src.open()
    with capture_logs() as logs:
        frames = read_all(src)
    assert len(frames) == 6
    for want, f in zip(written, frames, strict=False):
        assert (f.image == want).all()
    assert [Path(f.source).name for f in frames] == ["000.png", "001.png", "002.png", "003.png", "004.png", "005.png"]
    assert frames[4].image.shape == (10, 12, 3) and (frames[4].image == 77).all()
    assert frames[5].image.shape == (8, 8, 3) and (frames[5].image[0, 0] == [0, 200, 0]).all()
    skipped = [e for e in logs if e["event"] == "source.image_skipped"]
    assert [Path(e["path"]).name for e in skipped] == ["001b.png"]


def test_images_loop_and_fps_pacing(tmp_path: Path, fake_clock: FakeClock) -> None:
    written = media.make_images(tmp_path, n=3)
    src = create_source({"type": "images", "path": str(tmp_path), "loop": True, "fps": 20})
    src.open()
    t0 = fake_clock.now
    frames = [next_item(src, 0.2) for _ in range(7)]
    assert fake_clock.now - t0 == pytest.approx(0.3)  # 6 intervals of 50 ms
    assert [f.index for f in frames] == list(range(7))
    for i, f in enumerate(frames):
        assert (f.image == written[i % 3]).all()


def test_images_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=f"{re.escape(str(tmp_path / 'missing'))} not found"):
        create_source({"type": "images", "path": str(tmp_path / "missing")}).open()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="has no images"):
        create_source({"type": "images", "path": str(empty)}).open()
    bad = tmp_path / "bad"
    media.make_images(bad, n=0, corrupt=["a.png", "b.jpg"])
    src = create_source({"type": "images", "path": str(bad), "loop": True})
    src.open()
    with pytest.raises(SourceError, match="none of 2 files is readable") as err:
        src.read(0.1)
    assert not isinstance(err.value, SourceEnded)


# --- WAV files ---------------------------------------------------------------------------------------------------


def ramp_wav(path: Path, n: int, rate: int = 16000) -> np.ndarray:
    """Every sample distinct within 65536: a dropped, repeated or reordered sample shows."""
    ints = (np.arange(n) * 7 % 65536 - 32768).astype(np.int16)
    media.write_wav(path, ints / 32768.0, rate)
    return ints.astype(np.float32) / 32768.0


def test_wav_chunks_cover_every_sample_once_in_order(tmp_path: Path) -> None:
    n = 16000 + 123
    expected = ramp_wav(tmp_path / "ramp.wav", n)
    src = create_source({"type": "wav", "path": str(tmp_path / "ramp.wav")})
    src.open()
    chunks = read_all(src)
    assert all(isinstance(c, AudioChunk) and c.sample_rate == 16000 for c in chunks)
    assert [len(c.samples) for c in chunks[:-1]] == [512] * (len(chunks) - 1)  # 32 ms at 16 kHz
    assert sum(len(c.samples) for c in chunks) == n
    assert [c.offset for c in chunks] == [i * 512 for i in range(len(chunks))]
    got = np.concatenate([c.samples for c in chunks])
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)


def test_wav_loop_runs_across_the_end_of_the_file(tmp_path: Path) -> None:
    expected = ramp_wav(tmp_path / "short.wav", 1000)
    src = create_source({"type": "wav", "path": str(tmp_path / "short.wav"), "loop": True, "chunk_ms": 20})
    src.open()
    chunks = [next_item(src) for _ in range(8)]
    assert [len(c.samples) for c in chunks] == [320] * 8
    assert [c.offset for c in chunks] == [320 * i for i in range(8)]
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), np.tile(expected, 3)[: 320 * 8])


def test_wav_stereo_is_mixed_down_to_mono(tmp_path: Path) -> None:
    t = np.arange(4000) / 16000
    left, right = 0.8 * np.sin(2 * np.pi * 300 * t), np.full(4000, -0.25)
    media.write_wav(tmp_path / "st.wav", np.stack([left, right], axis=1))
    src = WavSource(path=str(tmp_path / "st.wav"))
    src.open()
    got = np.concatenate([c.samples for c in read_all(src)])
    assert got.shape == (4000,)
    assert np.abs(got - (left + right) / 2).max() < 2 / 32768


def test_wav_8_khz_keeps_its_rate(tmp_path: Path) -> None:
    media.tone_wav(tmp_path / "8k.wav", 0.5, rate=8000)
    src = create_source({"type": "wav", "path": str(tmp_path / "8k.wav")})
    src.open()
    chunks = read_all(src)
    assert {c.sample_rate for c in chunks} == {8000}
    assert len(chunks[0].samples) == 256  # 32 ms at 8 kHz
    assert sum(len(c.samples) for c in chunks) == 4000


@pytest.mark.parametrize(("width", "tol"), [(1, 1 / 128), (3, 1e-4), (4, 1e-4)])
def test_wav_other_integer_widths(tmp_path: Path, width: int, tol: float) -> None:
    media.tone_wav(tmp_path / "ref.wav", 0.2, sampwidth=2)
    media.tone_wav(tmp_path / "w.wav", 0.2, sampwidth=width)
    ref, other = WavSource(path=str(tmp_path / "ref.wav")), WavSource(path=str(tmp_path / "w.wav"))
    ref.open()
    other.open()
    a = np.concatenate([c.samples for c in read_all(ref)])
    b = np.concatenate([c.samples for c in read_all(other)])
    assert len(a) == len(b) == 3200 and np.abs(a).max() > 0.45
    assert np.abs(a - b).max() <= tol


def test_wav_float_and_extensible_from_sox(tmp_path: Path) -> None:
    media.tone_wav(tmp_path / "ref.wav", 0.2)
    # sox writes 32-bit float and multi-channel 24-bit as WAVE_FORMAT_EXTENSIBLE
    media.sox_convert(tmp_path / "ref.wav", tmp_path / "f32.wav", "-e", "floating-point", "-b", "32")
    media.sox_convert(tmp_path / "ref.wav", tmp_path / "s24x3.wav", "-b", "24", "-c", "3")
    ref = WavSource(path=str(tmp_path / "ref.wav"))
    ref.open()
    a = np.concatenate([c.samples for c in read_all(ref)])
    for name in ("f32.wav", "s24x3.wav"):
        src = WavSource(path=str(tmp_path / name))
        src.open()
        assert src.format is not None
        b = np.concatenate([c.samples for c in read_all(src)])
        assert np.abs(a - b).max() < 1e-3, name


def test_wav_bad_files_name_the_path(tmp_path: Path) -> None:
    not_riff = tmp_path / "speech.wav"
    not_riff.write_bytes(b"ID3\x04" + os.urandom(500))
    with pytest.raises(SourceError, match=f"WAV file {re.escape(str(not_riff))}: not a RIFF/WAVE file"):
        create_source({"type": "wav", "path": str(not_riff)}).open()
    with pytest.raises(SourceError, match=f"WAV file {re.escape(str(tmp_path / 'gone.wav'))} not found"):
        create_source({"type": "wav", "path": str(tmp_path / "gone.wav")}).open()
    media.tone_wav(tmp_path / "ref.wav", 0.1)
    alaw = media.sox_convert(tmp_path / "ref.wav", tmp_path / "alaw.wav", "-e", "a-law")
    with pytest.raises(SourceError, match=f"{re.escape(str(alaw))}: unsupported encoding"):
        create_source({"type": "wav", "path": str(alaw)}).open()
    truncated = tmp_path / "trunc.wav"
    truncated.write_bytes((tmp_path / "ref.wav").read_bytes()[:36])  # RIFF + 'fmt ' chunk, no 'data' chunk
    with pytest.raises(SourceError, match=f"{re.escape(str(truncated))}: no 'data' chunk"):
        create_source({"type": "wav", "path": str(truncated)}).open()


def test_wav_realtime_pacing(tmp_path: Path, fake_clock: FakeClock) -> None:
    media.silence_wav(tmp_path / "half.wav", 0.5)
    src = create_source({"type": "wav", "path": str(tmp_path / "half.wav"), "realtime": True})
    src.open()
    t0 = fake_clock.now
    assert src.read(0.005) is None  # the first 32 ms chunk has not been "recorded" yet
    chunks = read_all(src, timeout=0.1)
    assert sum(len(c.samples) for c in chunks) == 8000
    assert fake_clock.now - t0 == pytest.approx(0.5)  # each chunk when its last sample was "recorded"


def test_wav_realtime_pacing_on_the_real_clock(tmp_path: Path) -> None:
    """On the real clock audio is never released before it would have been recorded."""
    media.silence_wav(tmp_path / "short.wav", 0.2)
    src = create_source({"type": "wav", "path": str(tmp_path / "short.wav"), "realtime": True})
    src.open()
    t0 = time.monotonic()
    assert sum(len(c.samples) for c in read_all(src, timeout=0.1)) == 3200
    assert time.monotonic() - t0 >= 0.2 * 0.95


def test_speech_wav_from_espeak(tmp_path: Path) -> None:
    path = media.speech_wav(tmp_path / "hello.wav", "hello world")
    src = WavSource(path=str(path))
    src.open()
    assert src.format is not None and (src.format.sample_rate, src.format.channels) == (16000, 1)
    samples = np.concatenate([c.samples for c in read_all(src)])
    assert 0.4 < len(samples) / 16000 < 3
    assert float(np.sqrt(np.mean(samples**2))) > 0.01


# --- raw PCM -------------------------------------------------------------------------------------------------


def test_pcm_from_a_fifo_with_a_writer_thread(tmp_path: Path) -> None:
    fifo = tmp_path / "audio.fifo"
    os.mkfifo(fifo)
    ints = (np.arange(5000) * 13 % 65536 - 32768).astype("<i2")
    src = create_source({"type": "pcm", "path": str(fifo), "sample_rate": 16000})
    src.open()  # must not block although no writer is there yet
    assert src.read(0.05) is None

    def writer(data: bytes) -> None:
        with fifo.open("wb") as fh:
            for i in range(0, len(data), 999):  # odd sizes: half samples across writes
                fh.write(data[i : i + 999])
                fh.flush()
                time.sleep(0.002)

    t = threading.Thread(target=writer, args=(ints.tobytes(),))
    t.start()
    chunks: list[Any] = []
    with pytest.raises(SourceError, match="writer closed it") as err:
        while True:
            c = src.read(1.0)
            if c is not None:
                chunks.append(c)
    t.join(5)
    assert not isinstance(err.value, SourceEnded)  # a FIFO is reopened by the runner
    assert [c.offset for c in chunks] == list(itertools.accumulate([0] + [len(c.samples) for c in chunks[:-1]]))
    assert np.array_equal(np.concatenate([c.samples for c in chunks]), ints.astype(np.float32) / 32768)

    src.open()  # reopen: the next writer's data arrives, offsets restart
    t = threading.Thread(target=writer, args=(ints[:600].tobytes(),))
    t.start()
    c = next_item(src)
    t.join(5)
    assert c.offset == 0 and np.array_equal(c.samples, ints[:512].astype(np.float32) / 32768)
    src.close()


def test_pcm_from_stdin_pipe_f32_stereo(tmp_path: Path) -> None:
    frames = np.stack([np.linspace(-1, 1, 3000), np.linspace(0.5, -0.5, 3000)], axis=1).astype("<f4")
    out = tmp_path / "got.npz"
    script = f"""
import numpy as np
from agent.pipelines.base import SourceEnded
from agent.pipelines.sources import create_source
src = create_source({{"type": "pcm", "path": "-", "sample_rate": 8000, "channels": 2, "format": "f32le"}})
src.open()
chunks = []
while True:
    try:
        c = src.read(5.0)
    except SourceEnded:
        break
    if c is not None:
        chunks.append(c)
np.savez({str(out)!r}, samples=np.concatenate([c.samples for c in chunks]),
         offsets=[c.offset for c in chunks], rates=[c.sample_rate for c in chunks])
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        input=frames.tobytes(),
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    got = np.load(out)
    assert np.allclose(got["samples"], frames.mean(axis=1), atol=1e-6)
    assert list(got["offsets"]) == list(range(0, 3000, 256))  # 32 ms at 8 kHz
    assert set(got["rates"]) == {8000}


def test_pcm_regular_file_ends_and_missing_path_fails(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(np.zeros(1001, "<i2").tobytes() + b"\x01")  # a trailing half sample is dropped
    src = create_source({"type": "pcm", "path": str(raw), "sample_rate": 16000})
    src.open()
    assert sum(len(c.samples) for c in read_all(src)) == 1001
    with pytest.raises(SourceError, match=f"PCM input {re.escape(str(tmp_path / 'nope'))} not found"):
        create_source({"type": "pcm", "path": str(tmp_path / "nope"), "sample_rate": 16000}).open()


# --- ALSA ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(alsa.alsa_cards() != [] or alsa._sounddevice() is not None, reason="this machine has audio")
def test_alsa_without_a_capture_device_is_a_clear_source_error() -> None:
    src = AlsaSource(device="default", sample_rate=16000)
    with pytest.raises(SourceError, match=r"^no capture device: ") as err:
        src.open()
    assert "use a 'wav' or 'pcm' source" in str(err.value)
    assert src.backend is None
    with pytest.raises(SourceError, match="not open"):
        src.read(0.1)


def test_alsa_cards_parses_proc_asound(tmp_path: Path) -> None:
    cards = tmp_path / "cards"
    cards.write_text(
        " 0 [PCH            ]: HDA-Intel - HDA Intel PCH\n"
        "                      HDA Intel PCH at 0xf7f10000 irq 32\n"
        " 1 [Device         ]: USB-Audio - USB PnP Sound Device\n"
    )
    assert len(alsa.alsa_cards(cards)) == 2
    cards.write_text("--- no soundcards ---\n")
    assert alsa.alsa_cards(cards) == []
    assert alsa.alsa_cards(tmp_path / "missing") == []


def test_importing_the_sources_does_not_load_opencv() -> None:
    code = "import sys, agent.pipelines.sources; sys.exit('cv2' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).parent.parent).returncode == 0
