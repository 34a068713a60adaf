"""Streaming pipelines: face detection on a 640x480 30 fps video file and Silero VAD on a
16 kHz WAV, through a real agent daemon, against the raw models measured in this process.

Builds the media (an OpenCV MJPG clip of the scikit-image astronaut and coffee photos moving
across the frame, looped; espeak-ng speech with silences), starts a real agent
(``[runtime] threads = 1``, like the raw side) with three streams that it starts and stops
through the local API, and measures, interleaved over ``--runs`` runs:

1. face detection (MediaPipe short-range, LiteRT):
   * raw: ``Interpreter`` (1 thread) on a 128x128 letterboxed frame, back to back;
   * ``realtime = false`` (the file is decoded as fast as possible, faster than the model):
     inferred fps from deltas of ``inferred`` in ``GET /v1/agent/streams`` over a window after
     a warm-up, dropped frames, frame age p50/p99 (``age_ms_p50``/``age_ms_p99``: the last
     1000 results, all inside the window), daemon CPU (psutil, % of one core);
   * the same with ``reduced_decode = false`` (every frame decoded at full 640x480 instead of
     the 1/4 size that the 128x128 model needs), to show what the reduced MJPG decode buys;
   * ``realtime = true`` (paced at the file's 30 fps, slower than the model): inferred vs.
     input fps; frame age p50/p99 from the results' ``age_ms`` read over the SSE feed during
     the window (the status keeps the last 1000, which at 30 fps reaches back to the start);
2. Silero VAD (ONNX Runtime): raw rate on [1, 576] windows (1 thread, state carried), and the
   stream over the whole file with ``realtime = false``: ``real_time_factor`` (processing
   time / audio duration), audio overflow, daemon CPU over the run;
3. where a frame's time goes, in this process, stage by stage with the agent's own code:
   MJPG decode (full and 1/4 size), pre-processing, the model through the agent's session, the hop into the
   event loop and the model's worker thread and back (``run_coroutine_threadsafe``), and
   post-processing.

Targets: inferred fps >= 90 % of the raw rate when the source is faster than the model; frame
age p99 <= 2 x the raw inference latency + one frame interval (1/30 s); audio real-time factor
<= 0.05.

Usage: python bench/streams.py [--runs 3] [--window 4] [--warmup 1.5]
Prints medians over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.samples import fetch
from tests.conftest import Daemon, start_daemon
from tests.media import make_video, photo_frames, speech_wav, write_wav
from tests.test_streams import FACE_POST, FACE_PRE, VAD_PRE

WIDTH, HEIGHT, FPS = 640, 480, 30.0
FRAME_INTERVAL_S = 1.0 / FPS
VAD_WINDOW, VAD_CONTEXT, VAD_RATE = 512, 64, 16000
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "streaming inference runs at the model's full speed",
    "a new model needs no new code",
    "results are never stale and audio is never dropped",
    "okay nabu, turn on the kitchen lights",
]


# -- media ----------------------------------------------------------------------------------------
def make_clip(path: Path, seconds: float) -> Path:
    """640x480 30 fps MJPG: the astronaut (faces) then the coffee cup (none) moving and scaling."""
    n = round(seconds * FPS / 2)
    faces, _ = photo_frames(fetch("astronaut"), n=n, size=(WIDTH, HEIGHT), scales=(0.5, 0.9))
    cups, _ = photo_frames(fetch("coffee"), n=n, size=(WIDTH, HEIGHT), scales=(0.5, 0.9))
    return make_video(path, faces + cups, fps=FPS, codec="MJPG")


def make_speech(path: Path, seconds: float, work: Path) -> tuple[Path, float]:
    """espeak-ng sentences separated by silences, ~``seconds`` long at 16 kHz mono 16-bit."""
    parts: list[np.ndarray] = [np.zeros(VAD_RATE, np.float32)]
    i = 0
    while sum(len(p) for p in parts) < seconds * VAD_RATE:
        wav = speech_wav(work / f"s{i}.wav", SENTENCES[i % len(SENTENCES)], VAD_RATE)
        with wave.open(str(wav)) as w:
            parts.append(np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768)
        parts.append(np.zeros(round(VAD_RATE * (1.0 + 0.5 * (i % 3))), np.float32))
        i += 1
    audio = np.concatenate(parts)[: round(seconds * VAD_RATE)]
    return write_wav(path, audio, VAD_RATE), len(audio) / VAD_RATE


# -- raw models -------------------------------------------------------------------------------------
def letterbox(image: np.ndarray) -> np.ndarray:
    """The face model's input from a BGR frame, as the stream's pre-processing makes it."""
    ratio = min(128 / image.shape[1], 128 / image.shape[0])
    w, h = round(image.shape[1] * ratio), round(image.shape[0] * ratio)
    canvas = np.zeros((128, 128, 3), np.uint8)
    y, x = (128 - h) // 2, (128 - w) // 2
    canvas[y : y + h, x : x + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32)
    return (rgb * np.float32(0.00784313725) - 1.0)[None]


def first_frame(video: Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(video))
    ok, image = cap.read()
    cap.release()
    if not ok:
        raise SystemExit(f"cannot decode {video}")
    return image


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` back to back for ``seconds`` (after a short warm-up)."""
    for _ in range(20):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(20):
            fn()
        n += 20
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def raw_face(image: np.ndarray) -> Callable[[], object]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(fetch("face_detection")), num_threads=1)
    interp.allocate_tensors()
    index = interp.get_input_details()[0]["index"]
    outs = [d["index"] for d in interp.get_output_details()]
    x = letterbox(image)

    def call() -> object:
        interp.set_tensor(index, x)
        interp.invoke()
        return [interp.get_tensor(i) for i in outs]

    return call


def raw_vad(wav: Path) -> Callable[[], object]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(fetch("silero_vad")), so, providers=["CPUExecutionProvider"])
    with wave.open(str(wav)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    windows = [audio[i - VAD_CONTEXT : i + VAD_WINDOW] for i in range(VAD_CONTEXT, len(audio) - VAD_WINDOW, VAD_WINDOW)]
    feeds: dict[str, Any] = {"state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
    i = 0

    def call() -> object:
        nonlocal i
        feeds["input"] = windows[i % len(windows)][None]
        out = session.run(None, feeds)
        feeds["state"] = out[1]
        i += 1
        return out

    return call


# -- the daemon --------------------------------------------------------------------------------------
def agent_config(path: Path, video: Path, wav: Path) -> Path:
    def face(name: str, realtime: bool, reduced: bool = True) -> str:
        return (
            f'[stream.{name}]\nmodel = "face_detection"\n'
            f'source = {{ type = "video", path = "{video}", loop = true, realtime = {str(realtime).lower()}, '
            f"reduced_decode = {str(reduced).lower()} }}\n"
            f"pre = {FACE_PRE}\npost = {FACE_POST}\nautostart = false\n"
        )

    path.write_text(
        "[runtime]\nthreads = 1\n\n"
        + face("face_fast", False)
        + face("face_full", False, reduced=False)
        + face("face_paced", True)
        + f'[stream.vad]\nmodel = "silero_vad"\n'
        f'source = {{ type = "wav", path = "{wav}", realtime = false }}\n'
        f'pre = {VAD_PRE}\npost = {{ type = "vad", threshold = 0.5 }}\nautostart = false\n'
    )
    return path


def status(daemon: Daemon, name: str) -> dict[str, Any]:
    streams = daemon.client._json("GET", "/v1/agent/streams")["streams"]
    return dict(next(s for s in streams if s["name"] == name))


def control(daemon: Daemon, name: str, action: str) -> None:
    code, _, body = daemon.client.request("POST", f"/v1/agent/streams/{name}:{action}", b"")
    if code != 200:
        raise SystemExit(f"{action} {name}: HTTP {code} {body[:300]!r}")


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class SSEReader(threading.Thread):
    """Collects (receive time, result) from a stream's Server-Sent Events feed until stopped."""

    def __init__(self, sock_path: Path, stream: str) -> None:
        super().__init__(daemon=True)
        self.sock_path, self.stream = sock_path, stream
        self.results: list[tuple[float, dict[str, Any]]] = []
        self.stopping = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.2)
        s.connect(str(self.sock_path))
        s.sendall(f"GET /v1/agent/streams/{self.stream}/results HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.connected.set()
        buf = b""
        try:
            while not self.stopping.is_set():
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                now = time.time()
                buf += chunk
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    for line in block.split(b"\n"):
                        if line.startswith(b"data: "):
                            self.results.append((now, json.loads(line[6:])))
        finally:
            s.close()


def face_run(
    daemon: Daemon, proc: psutil.Process, name: str, warmup: float, window: float, sse: bool = False
) -> dict[str, float]:
    """Start ``name``, warm up, measure over ``window`` seconds, stop."""
    reader = SSEReader(daemon.socket, name) if sse else None
    if reader is not None:
        reader.start()
        reader.connected.wait(5)
    control(daemon, name, "start")
    time.sleep(warmup)
    s0, c0, t0 = status(daemon, name), cpu_seconds(proc), time.time()
    time.sleep(window)
    s1, c1, t1 = status(daemon, name), cpu_seconds(proc), time.time()
    control(daemon, name, "stop")
    if s1["state"] != "running" or s1["errors"]:
        raise SystemExit(f"stream {name}: state {s1['state']}, errors {s1['errors']}: {s1.get('error')}")
    dt = t1 - t0
    out = {
        "input_fps": (s1["captured"] - s0["captured"]) / dt,
        "inferred_fps": (s1["inferred"] - s0["inferred"]) / dt,
        "dropped_per_s": (s1["dropped_frames"] - s0["dropped_frames"]) / dt,
        "inferred_in_window": float(s1["inferred"] - s0["inferred"]),
        "age_p50": float(s1["age_ms_p50"]),
        "age_p99": float(s1["age_ms_p99"]),
        "cpu": 100 * (c1 - c0) / dt,
    }
    if reader is not None:
        reader.stopping.set()
        reader.join(5)
        inside = [(at, r) for at, r in reader.results if t0 <= r["captured_at"] < t1]
        if inside:
            ages = np.array([r["age_ms"] for _, r in inside])
            delivered = np.array([(at - r["captured_at"]) * 1e3 for at, r in inside])
            out.update(
                sse_age_p50=float(np.percentile(ages, 50)),
                sse_age_p99=float(np.percentile(ages, 99)),
                sse_results=float(len(inside)),
                delivered_p50=float(np.percentile(delivered, 50)),
                delivered_p99=float(np.percentile(delivered, 99)),
            )
    return out


def vad_run(daemon: Daemon, proc: psutil.Process, audio_s: float) -> dict[str, float]:
    """The whole WAV through the stream (``realtime = false``); until it has ended and drained."""
    c0, t0 = cpu_seconds(proc), time.time()
    control(daemon, "vad", "start")
    deadline = time.monotonic() + 60
    last = -1
    while True:
        time.sleep(0.05)
        s = status(daemon, "vad")
        if s["state"] == "ended" and s["inferred"] == last:
            break  # the capture side has ended and processing has drained the queue
        last = s["inferred"]
        if s["state"] in ("failed", "stopped") or time.monotonic() > deadline:
            raise SystemExit(f"vad stream: {s}")
    c1, t1 = cpu_seconds(proc), time.time() - 0.05  # the last poll found nothing new
    control(daemon, "vad", "stop")
    windows_in_file = int(audio_s * VAD_RATE) // VAD_WINDOW
    return {
        "rtf": float(s["real_time_factor"]),
        "inferred": float(s["inferred"]),
        "windows_in_file": float(windows_in_file),
        "overflow_s": s["audio_overflow_samples"] / VAD_RATE,
        "wall_s": t1 - t0,
        "cpu": 100 * (c1 - c0) / (t1 - t0),
        "cpu_s_per_audio_s": (c1 - c0) / audio_s,
        "results": float(s["results"]),
    }


# -- in-process stage breakdown ------------------------------------------------------------------------
def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Median over 5 blocks of ``n // 5`` calls, in µs per call."""
    for _ in range(min(20, n)):
        fn()
    blocks = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(max(1, n // 5)):
            fn()
        blocks.append((time.perf_counter() - t0) / max(1, n // 5))
    return statistics.median(blocks) * 1e6


def breakdown(video: Path, n: int = 500) -> list[tuple[str, float]]:
    """Per-frame cost of each stage of the face stream, with the agent's own code, one thread."""
    import uvloop

    from agent.models.worker import Worker
    from agent.pipelines.base import Frame
    from agent.pipelines.postprocess import make_postprocessor
    from agent.pipelines.preprocess import make_preprocessor
    from agent.pipelines.sources._common import to_bgr
    from agent.runtimes.litert import LiteRTBackend
    from tests.test_streams import FACE_POST as post_spec  # noqa: N811
    from tests.test_streams import FACE_PRE as pre_spec  # noqa: N811

    def toml_inline(text: str) -> dict[str, Any]:
        import tomllib

        return tomllib.loads(f"x = {text}")["x"]

    session = LiteRTBackend().load(fetch("face_detection"), [], threads=1)
    pre = make_preprocessor(toml_inline(pre_spec), session.inputs, session.outputs)
    post = make_postprocessor(toml_inline(post_spec), session.outputs)
    cap = cv2.VideoCapture(str(video))

    def decode() -> object:
        ok, image = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = cap.read()
        return image

    packets = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    packets.set(cv2.CAP_PROP_FORMAT, -1)  # what VideoSource does for MJPG: undecoded packets

    def decode_quarter() -> object:
        ok, packet = packets.read()
        if not ok:
            packets.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, packet = packets.read()
        return cv2.imdecode(packet.reshape(-1), cv2.IMREAD_REDUCED_COLOR_4)

    image = first_frame(video)
    frame = Frame(image, time.time(), 0, "bench")
    small = Frame(cv2.resize(image, (WIDTH // 4, HEIGHT // 4), interpolation=cv2.INTER_AREA), time.time(), 0,
                  "bench", (WIDTH, HEIGHT))
    prepared = next(iter(pre(frame)))
    outputs = session.run(prepared.feeds)
    rows = [
        ("MJPG decode 640x480 (VideoCapture.read)", per_call_us(decode, n)),
        ("MJPG decode at 1/4, 160x120 (packet + imdecode)", per_call_us(decode_quarter, n)),
        ("to_bgr (source's frame check/copy)", per_call_us(lambda: to_bgr(image, "x"), n)),
        ("pre-processing of a 640x480 frame", per_call_us(lambda: next(iter(pre(frame))), n)),
        ("pre-processing of the 1/4 frame (letterbox, RGB, scale)", per_call_us(lambda: next(iter(pre(small))), n)),
        ("model: LiteRT invoke via agent session", per_call_us(lambda: session.run(prepared.feeds), n)),
    ]
    cap.release()
    packets.release()
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    worker = Worker("face", session)

    async def infer() -> object:
        return await worker.submit(prepared.feeds)

    def hop() -> object:
        return asyncio.run_coroutine_threadsafe(infer(), loop).result(30)

    through_worker = per_call_us(hop, n)
    rows.append(("model via loop + worker thread (the stream's call)", through_worker))
    rows.append(("  of which the hop (loop -> worker -> loop -> caller)", through_worker - rows[5][1]))
    rows.append(("post-processing (SSD decode, NMS)", per_call_us(lambda: post(outputs, prepared.meta), n)))
    worker.stop()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    return rows


# -- report ----------------------------------------------------------------------------------------------
def med(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    args: argparse.Namespace,
    raw_face_rates: list[float],
    fast: list[dict[str, float]],
    full: list[dict[str, float]],
    paced: list[dict[str, float]],
    raw_vad_rates: list[float],
    vad: list[dict[str, float]],
    audio_s: float,
    stages: list[tuple[str, float]],
) -> None:
    raw_rate = statistics.median(raw_face_rates)
    raw_ms = 1e3 / raw_rate
    bound = 2 * raw_ms + FRAME_INTERVAL_S * 1e3
    cores = psutil.cpu_count()
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({cores} CPUs)")
    print(
        f"\nFace detection (MediaPipe short range, LiteRT, 1 thread), 640x480 MJPG file, "
        f"median of {len(fast)} runs, {args.window:g} s windows after {args.warmup:g} s warm-up; {cores} CPUs"
    )
    print(f"{'metric':<52}{'value':>10}{'target':>12}  verdict")
    inferred = med(fast, "inferred_fps")
    print(f"{'raw model rate, back to back (inferences/s)':<52}{raw_rate:>10.1f}")
    print(f"{'raw model latency (ms)':<52}{raw_ms:>10.3f}")
    print(f"{'realtime=false: input fps (decoded)':<52}{med(fast, 'input_fps'):>10.1f}")
    print(
        f"{'realtime=false: inferred fps':<52}{inferred:>10.1f}{0.9 * raw_rate:>12.1f}  "
        f"{verdict(inferred >= 0.9 * raw_rate)}"
    )
    print(f"{'realtime=false: inferred / raw rate':<52}{inferred / raw_rate:>10.2f}{0.9:>12.2f}")
    print(f"{'realtime=false: dropped frames/s':<52}{med(fast, 'dropped_per_s'):>10.1f}")
    print(f"{'realtime=false: frame age p50 (ms)':<52}{med(fast, 'age_p50'):>10.2f}")
    p99 = med(fast, "age_p99")
    print(f"{'realtime=false: frame age p99 (ms)':<52}{p99:>10.2f}{bound:>12.2f}  {verdict(p99 <= bound)}")
    print(f"{'realtime=false: daemon CPU (% of one core)':<52}{med(fast, 'cpu'):>10.1f}")
    full_fps = med(full, "inferred_fps")
    print(f"{'full-size decode (reduced_decode=false): inferred fps':<52}{full_fps:>10.1f}")
    print(f"{'full-size decode: inferred / raw rate':<52}{full_fps / raw_rate:>10.2f}")
    print(f"{'full-size decode: frame age p99 (ms)':<52}{med(full, 'age_p99'):>10.2f}")
    print(f"{'full-size decode: daemon CPU (% of one core)':<52}{med(full, 'cpu'):>10.1f}")
    in_fps, out_fps = med(paced, "input_fps"), med(paced, "inferred_fps")
    print(f"{'realtime=true: input fps (paced)':<52}{in_fps:>10.1f}")
    print(
        f"{'realtime=true: inferred fps (target 0.95 x input)':<52}{out_fps:>10.1f}{0.95 * in_fps:>12.1f}  "
        f"{verdict(out_fps >= 0.95 * in_fps)}"
    )
    print(f"{'realtime=true: dropped frames/s':<52}{med(paced, 'dropped_per_s'):>10.2f}")
    print(f"{'realtime=true: frame age p50 (ms, results in window)':<52}{med(paced, 'sse_age_p50'):>10.2f}")
    p99_paced = med(paced, "sse_age_p99")
    print(
        f"{'realtime=true: frame age p99 (ms, results in window)':<52}{p99_paced:>10.2f}{bound:>12.2f}  "
        f"{verdict(p99_paced <= bound)}"
    )
    print(f"{'realtime=true: age at the SSE client p50 (ms)':<52}{med(paced, 'delivered_p50'):>10.2f}")
    print(f"{'realtime=true: age at the SSE client p99 (ms)':<52}{med(paced, 'delivered_p99'):>10.2f}")
    print(f"{'realtime=true: daemon CPU (% of one core)':<52}{med(paced, 'cpu'):>10.1f}")
    fast_rates = " ".join(f"{r['inferred_fps']:.0f}" for r in fast)
    full_rates = " ".join(f"{r['inferred_fps']:.0f}" for r in full)
    print(
        f"frame age bound = 2 x {raw_ms:.3f} ms raw latency + {FRAME_INTERVAL_S * 1e3:.1f} ms frame interval; "
        f"raw rates per run: {' '.join(f'{r:.0f}' for r in raw_face_rates)}; "
        f"inferred fps per run: {fast_rates}; full-size decode: {full_rates}"
    )

    vad_rate = statistics.median(raw_vad_rates)
    rtf = med(vad, "rtf")
    print(
        f"\nSilero VAD (ONNX Runtime, 1 thread), {audio_s:.1f} s 16 kHz WAV (espeak-ng speech + silence), "
        f"realtime=false, median of {len(vad)} runs"
    )
    print(f"{'metric':<52}{'value':>10}{'target':>12}  verdict")
    print(f"{'raw model rate, [1,576] windows (inferences/s)':<52}{vad_rate:>10.0f}")
    print(f"{'raw model real-time factor (latency / 32 ms)':<52}{1 / vad_rate / 0.032:>10.4f}")
    print(f"{'stream real-time factor (processing / audio)':<52}{rtf:>10.4f}{0.05:>12.2f}  {verdict(rtf <= 0.05)}")
    done, total = med(vad, "inferred"), med(vad, "windows_in_file")
    print(
        f"{'stream windows inferred (target: every window)':<52}{done:>10.0f}{total:>12.0f}  {verdict(done >= total)}"
    )
    print(f"{'stream windows/s while running':<52}{med(vad, 'inferred') / med(vad, 'wall_s'):>10.0f}")
    print(f"{'audio overflow (s of audio dropped)':<52}{med(vad, 'overflow_s'):>10.2f}")
    print(f"{'wall time for the file (s)':<52}{med(vad, 'wall_s'):>10.2f}")
    print(f"{'daemon CPU while running (% of one core)':<52}{med(vad, 'cpu'):>10.1f}")
    print(f"{'daemon CPU-s per audio-s':<52}{med(vad, 'cpu_s_per_audio_s'):>10.4f}")
    print(f"{'results published (speech events)':<52}{med(vad, 'results'):>10.0f}")

    print("\nWhere a frame's time goes, in this process with the agent's code (µs per frame, median of 5 blocks)")
    for label, us in stages:
        print(f"{label:<56}{us:>9.0f}")
    by = dict(stages)
    cpu = sum(
        by[k]
        for k in (
            "MJPG decode at 1/4, 160x120 (packet + imdecode)",
            "pre-processing of the 1/4 frame (letterbox, RGB, scale)",
            "model: LiteRT invoke via agent session",
            "post-processing (SSD decode, NMS)",
        )
    )
    # Three threads overlap (capture, stream, model worker): the model's thread bounds the rate
    # when the other stages fit on the second core.
    print(f"{'CPU per frame, all stages (decode 1/4 + pre + model + post)':<56}{cpu:>9.0f}"
          f"  -> at most {2e6 / cpu:.0f} fps on 2 cores")
    print(f"{'pipeline budget per frame at 90 % of the raw rate':<56}{1e6 / (0.9 * raw_rate):>9.0f}")


def run(args: argparse.Namespace, work: Path) -> None:
    print("making media ...", file=sys.stderr)
    video = make_clip(work / "faces.avi", args.video_seconds)
    wav, audio_s = make_speech(work / "speech.wav", args.audio_seconds, work)
    models = work / "models"
    for name, sample, file in (
        ("face_detection", "face_detection", "model.tflite"),
        ("silero_vad", "silero_vad", "model.onnx"),
    ):
        (models / name / "1").mkdir(parents=True)
        shutil.copyfile(fetch(sample), models / name / "1" / file)
    config = agent_config(work / "agent.toml", video, wav)
    face_call, vad_call = raw_face(first_frame(video)), raw_vad(wav)
    daemon = start_daemon(work / "agent", "--config", str(config), "--models-dir", str(models))
    proc = psutil.Process(daemon.proc.pid)
    raw_face_rates: list[float] = []
    raw_vad_rates: list[float] = []
    fast: list[dict[str, float]] = []
    full: list[dict[str, float]] = []
    paced: list[dict[str, float]] = []
    vad: list[dict[str, float]] = []
    try:
        time.sleep(0.5)
        for i in range(args.runs):
            raw_face_rates.append(rate(face_call, args.raw_seconds))
            fast.append(face_run(daemon, proc, "face_fast", args.warmup, args.window))
            full.append(face_run(daemon, proc, "face_full", args.warmup, args.window))
            paced.append(face_run(daemon, proc, "face_paced", args.warmup, args.window, sse=True))
            raw_vad_rates.append(rate(vad_call, args.raw_seconds / 2))
            vad.append(vad_run(daemon, proc, audio_s))
            print(
                f"run {i + 1}/{args.runs}: raw {raw_face_rates[-1]:.0f}/s, fast {fast[-1]['inferred_fps']:.0f} fps, "
                f"full decode {full[-1]['inferred_fps']:.0f} fps, "
                f"paced {paced[-1]['inferred_fps']:.1f} fps, VAD RTF {vad[-1]['rtf']:.4f}",
                file=sys.stderr,
            )
    finally:
        code = daemon.stop()
        if code != 0:
            print(f"agent exited with {code}; log: {daemon.log}", file=sys.stderr)
    print("stage breakdown ...", file=sys.stderr)
    stages = breakdown(video)
    report(args, raw_face_rates, fast, full, paced, raw_vad_rates, vad, audio_s, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured per face run")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds after a stream's start not measured")
    parser.add_argument("--raw-seconds", type=float, default=1.5, help="seconds of back-to-back raw face calls")
    parser.add_argument("--video-seconds", type=float, default=10.0)
    parser.add_argument("--audio-seconds", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (media, agent log)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
