"""Predict overhead of the agent over the raw runtime, and throughput with dynamic batching.

Starts a real agent daemon on a Unix socket with real models (Silero VAD, ONNX; MediaPipe
face detection, LiteRT) and measures, in one run and interleaved so machine noise hits all
modes alike:
  * latency p50/p99 of the raw runtime call in this process, and of the same call through
    the agent: TF Serving v1 JSON, OIP v2 JSON, OIP v2 binary; overhead in µs and as a ratio;
  * the floor: Silero behind the least any server process can do (a child process that reads
    a fixed-size request from a Unix socket, runs the same session, writes a fixed-size reply;
    no HTTP, no parsing) — what crossing a process boundary costs on this machine;
  * the event-loop floor: the same with uvloop and httptools (parse the request, run Silero in
    the callback, write a fixed reply) — the least any asyncio server adds;
  * inside the agent, from its statistics extension (``GET /v2/models/NAME/stats``): mean µs
    per phase over the same calls, and the agent's own overhead per v2 binary request (the
    statistics read after each call) — the figure Triton reports as its server-side overhead;
  * Silero's raw time per row at batch sizes 1 to 32: the ceiling of what batching can save;
  * throughput of Silero VAD at 1, 8 and 32 concurrent client processes, with and without
    dynamic batching (two names for the same model file, one with batching on; the config's
    default ``max_queue_delay_us = 500`` with ``adaptive_delay``).

Both sides run the runtimes with one intra-op thread (the agent via ``[runtime] threads = 1``):
on a 2-core machine shared by client, agent and runtime, extra runtime threads only add
wake-ups, and the comparison stays like for like.

Usage: python bench/predict_overhead.py [--rounds 20] [--per-round 100] [--seconds 4]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter

from agent.client import AgentClient, ShmInput, ShmOutput
from agent.samples import fetch
from bench.agentproc import start_agent as run_agent


def silero_feeds(batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input": (0.1 * rng.standard_normal((batch, 576))).astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(16000, np.int64)}


def face_image() -> np.ndarray:
    """A fixed 128x128 input for the face detector (the same in every mode)."""
    return np.random.default_rng(1).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)


def start_agent(work: Path, queue_delay_us: int = 500, tree: Path | None = None) -> subprocess.Popen[bytes]:
    """The agent of this source tree, or of ``tree`` (another checkout, for a before/after run)."""
    models = work / "models"
    for name, sample, file in (("silero_vad", "silero_vad", "model.onnx"),
                               ("silero_vad_batched", "silero_vad", "model.onnx"),
                               ("face_detection", "face_detection", "model.tflite"),
                               ("ocr_cls", "ocr_cls", "model.onnx"), ("ocr_det", "ocr_det", "model.onnx")):
        (models / name / "1").mkdir(parents=True)
        shutil.copyfile(fetch(sample), models / name / "1" / file)
    for name, (sample, file, runtime, pre_spec) in FRAME_MODELS.items():  # the same files, with manifests
        (models / name / "1").mkdir(parents=True)
        shutil.copyfile(fetch(sample), models / name / "1" / file)
        (models / name / "1" / "manifest.json").write_text(
            json.dumps({"model": file, "runtime": runtime, "preprocess": pre_spec}))
    config = work / "agent.toml"
    config.write_text("[runtime]\nthreads = 1\n"
                      "[model.silero_vad_batched.batching]\nenabled = true\nmax_batch_size = 32\n"
                      f"max_queue_delay_us = {queue_delay_us}\n"
                      # The OCR models measure the worker path: never inline, even when one call is under 2 ms.
                      "[model.ocr_cls]\ninline_max_us = 0\n[model.ocr_det]\ninline_max_us = 0\n")
    env = dict(os.environ, EDGE_AGENT_AGENT__STATE_DIR=str(work / "state"))
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return run_agent(work, config, models, env, cwd=tree)


K = TypeVar("K")


def interleaved(calls: Mapping[K, Callable[[], object]], rounds: int, per_round: int,
                warm_up: int) -> tuple[dict[K, list[float]], dict[K, list[float]]]:
    """Each call ``warm_up`` times, then ``rounds`` rounds of ``per_round`` calls each, the order
    reversed every other round: every call's times (s) and each round's median."""
    for fn in calls.values():
        for _ in range(warm_up):
            fn()
    samples: dict[K, list[float]] = {k: [] for k in calls}
    medians: dict[K, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for key in (list(calls) if r % 2 == 0 else list(reversed(calls))):
            block = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                calls[key]()
                block.append(time.perf_counter() - t0)
            samples[key].extend(block)
            medians[key].append(float(np.median(block)))
    return samples, medians

def raw_session(sample: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1  # the agent runs with [runtime] threads = 1 too: same work on both sides
    return ort.InferenceSession(str(fetch(sample)), so, providers=["CPUExecutionProvider"])


def raw_silero() -> ort.InferenceSession:
    return raw_session("silero_vad")


#: The worker-path models (slower than ``inline_max_us``: every request goes through the model's
#: thread) and their inputs: RapidOCR's text-direction classifier on a 48x320 crop (~2 ms here)
#: and its text detector on a 192x192 image (~7 ms).
WORKER_MODELS = {"ocr_cls": (1, 3, 48, 320), "ocr_det": (1, 3, 192, 192)}


def ocr_feeds(model: str, batch: int = 1) -> dict[str, np.ndarray]:
    shape = (batch, *WORKER_MODELS[model][1:])
    return {"x": np.random.default_rng(2).uniform(-1, 1, shape).astype(np.float32)}


FLOOR_REQUEST, FLOOR_REPLY = 3800, 1400  # bytes: about a Silero v2 binary request and its answer, with HTTP
_FLOOR_BODY = FLOOR_REQUEST - 200
_FLOOR_HEAD = (f"POST /v2/models/silero_vad/infer HTTP/1.1\r\nHost: localhost\r\n"
               f"Content-Length: {_FLOOR_BODY}\r\nX-Pad: ")
FLOOR_HTTP = (_FLOOR_HEAD.encode().ljust(FLOOR_REQUEST - _FLOOR_BODY - 4, b"p") + b"\r\n\r\n"
              + b"y" * _FLOOR_BODY)  # a valid HTTP request of FLOOR_REQUEST bytes


def _floor_server(path: str, ready: Any) -> None:
    """The least any out-of-process server can do: read a request, run Silero, write a reply."""
    import socket

    session = raw_silero()
    feeds, reply = silero_feeds(), b"x" * FLOOR_REPLY
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    ready.set()
    conn, _ = listener.accept()
    buf = bytearray(FLOOR_REQUEST)
    while True:
        got = 0
        while got < FLOOR_REQUEST:
            n = conn.recv_into(memoryview(buf)[got:])
            if not n:
                return
            got += n
        session.run(None, feeds)
        conn.sendall(reply)


def _loop_floor_server(path: str, ready: Any) -> None:
    """The least an event-loop server can do: uvloop + httptools, Silero run inline, a fixed reply."""
    import asyncio
    import socket

    import httptools
    import uvloop

    session = raw_silero()
    feeds, reply = silero_feeds(), b"x" * FLOOR_REPLY

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.parser = transport, httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            session.run(None, feeds)
            self.transport.write(reply)

    async def serve() -> None:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        await asyncio.get_running_loop().create_unix_server(Protocol, sock=listener)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(serve())


def floor_client(path: Path, server: Callable[[str, Any], None] = _floor_server,
                 ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(call, stop) for a floor server in a child process: send FLOOR_HTTP, read FLOOR_REPLY bytes."""
    import socket

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=server, args=(str(path), ready), daemon=True)
    proc.start()
    ready.wait(30)
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(path))
    buf = bytearray(FLOOR_REPLY)

    def call() -> None:
        conn.sendall(FLOOR_HTTP)
        got = 0
        while got < FLOOR_REPLY:
            got += conn.recv_into(memoryview(buf)[got:])

    def stop() -> None:
        conn.close()
        proc.kill()
        proc.join(5)

    return call, stop


PHASES = ("compute_input", "queue", "compute_infer", "compute_output", "success")
Row = tuple[str, str, float, float]
Phases = dict[tuple[str, str], np.ndarray]  # (model, mode) -> [count, ns per phase...]


def phase_totals(client: AgentClient, model: str) -> np.ndarray:
    """[successes, ns in each of PHASES] from the agent's statistics extension."""
    (entry,) = client.stats(model)
    stats = entry["inference_stats"]
    return np.array([stats["success"]["count"], *(stats[p]["ns"] for p in PHASES)], dtype=np.float64)


def inside_per_request(sock: Path, calls: int = 500) -> list[tuple[str, float, float, float]]:
    """(model, overhead p50, overhead p99, runtime call p50) in µs inside the agent, per v2 binary
    request: the statistics are read after every call, so each delta is one request."""
    client = AgentClient(sock)
    image = face_image()
    rows = []
    for model, feeds in (("silero_vad", silero_feeds()), ("face_detection", {"input": image})):
        overhead, infer = [], []
        before = phase_totals(client, model)
        for _ in range(calls):
            client.infer(model, feeds)
            after = phase_totals(client, model)
            delta, before = after - before, after
            if delta[0] == 1:
                infer.append(delta[1 + PHASES.index("compute_infer")] / 1000)
                overhead.append(delta[1 + PHASES.index("success")] / 1000 - infer[-1])
        rows.append((model, float(np.median(overhead)), float(np.percentile(overhead, 99)), float(np.median(infer))))
    client.close()
    return rows


def latency_table(sock: Path, rounds: int, per_round: int) -> tuple[list[Row], Phases]:
    client = AgentClient(sock)
    floor, stop_floor = floor_client(sock.with_name("floor.sock"))
    loop_floor, stop_loop_floor = floor_client(sock.with_name("loop-floor.sock"), _loop_floor_server)
    silero = raw_silero()
    face = Interpreter(model_path=str(fetch("face_detection")), num_threads=1)
    face.allocate_tensors()
    face_in = face.get_input_details()[0]["index"]
    face_outs = [d["index"] for d in face.get_output_details()]
    image = face_image()
    vad = silero_feeds()
    vad_lists = {k: v.tolist() for k, v in vad.items()}

    def face_raw() -> None:
        face.set_tensor(face_in, image)
        face.invoke()
        for i in face_outs:
            face.get_tensor(i)

    modes = {
        "silero_vad": {
            "raw runtime": lambda: silero.run(None, vad),
            "floor server": floor,
            "loop floor": loop_floor,
            "v1 JSON": lambda: client.predict("silero_vad", vad_lists),
            "v2 JSON": lambda: client.infer("silero_vad", vad, binary=False),
            "v2 binary": lambda: client.infer("silero_vad", vad),
        },
        "face_detection": {
            "raw runtime": face_raw,
            "v1 JSON": lambda: client.predict("face_detection", image.tolist()),
            "v2 JSON": lambda: client.infer("face_detection", {"input": image}, binary=False),
            "v2 binary": lambda: client.infer("face_detection", {"input": image}),
        },
    }
    samples: dict[tuple[str, str], list[float]] = {(m, k): [] for m, ks in modes.items() for k in ks}
    inside: Phases = {}
    for fns in modes.values():  # warm-up
        for fn in fns.values():
            for _ in range(50):
                fn()
    for _ in range(rounds):
        for model, fns in modes.items():
            for mode, fn in fns.items():
                bucket = samples[(model, mode)]
                through_agent = mode in ("v1 JSON", "v2 JSON", "v2 binary")
                before = phase_totals(client, model) if through_agent else None
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    bucket.append(time.perf_counter() - t0)
                if before is not None:
                    delta = phase_totals(client, model) - before
                    inside[(model, mode)] = inside.get((model, mode), 0) + delta
    client.close()
    stop_floor()
    stop_loop_floor()
    rows = []
    for (model, mode), values in samples.items():
        arr = np.asarray(values) * 1e6
        rows.append((model, mode, float(np.median(arr)), float(np.percentile(arr, 99))))
    return rows, inside


def worker_path(sock: Path, rounds: int, per_round: int, calls: int = 300) -> None:
    """The worker path, one client: raw runtime against v2 binary through the agent, interleaved
    round by round (each round's two blocks are close in time, so the per-round ratio is the
    steadiest figure), then the agent's own overhead per request from its statistics."""
    client = AgentClient(sock)
    raw = {m: raw_session(m) for m in WORKER_MODELS}
    feeds = {m: ocr_feeds(m) for m in WORKER_MODELS}
    modes: dict[tuple[str, str], Callable[[], object]] = {}
    def reconnecting(model: str) -> None:
        """What the client did before it kept its connection (httptools reset keep-alive): one
        connection per request."""
        client.infer(model, feeds[model])
        client.close()

    for m in WORKER_MODELS:
        modes[(m, "raw runtime")] = functools.partial(raw[m].run, None, feeds[m])
        modes[(m, "v2 binary")] = functools.partial(client.infer, m, feeds[m])
        modes[(m, "v2 reconnect")] = functools.partial(reconnecting, m)
    samples, medians = interleaved(modes, rounds, per_round, warm_up=20)
    print(f"\nWorker path, one client (µs), {rounds}x{per_round} calls per mode, interleaved; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<10}{'mode':<13}{'p50':>9}{'p99':>9}{'overhead p50':>14}{'ratio':>8}{'per-round ratio':>17}")
    for m in WORKER_MODELS:
        raw_p50 = float(np.median(samples[(m, "raw runtime")])) * 1e6
        for mode in ("raw runtime", "v2 binary", "v2 reconnect"):
            arr = np.asarray(samples[(m, mode)]) * 1e6
            p50 = float(np.median(arr))
            extra = "" if mode == "raw runtime" else (
                f"{p50 - raw_p50:>14.0f}{p50 / raw_p50:>8.3f}"
                f"{np.median(np.divide(medians[(m, mode)], medians[(m, 'raw runtime')])):>17.3f}")
            print(f"{m:<10}{mode:<13}{p50:>9.0f}{np.percentile(arr, 99):>9.0f}{extra}")
    print("\nInside the agent, one v2 binary request at a time (statistics read after each call), µs;"
          " overhead = total - infer")
    print(f"{'model':<10}{'overhead p50':>14}{'p99':>8}{'input p50':>11}{'queue p50':>11}{'output p50':>12}"
          f"{'infer p50':>11}")
    for m in WORKER_MODELS:
        per: dict[str, list[float]] = {p: [] for p in PHASES}
        before = phase_totals(client, m)
        for _ in range(calls):
            client.infer(m, feeds[m])
            after = phase_totals(client, m)
            delta, before = after - before, after
            if delta[0] == 1:
                for i, p in enumerate(PHASES):
                    per[p].append(delta[1 + i] / 1000)
        over = np.subtract(per["success"], per["compute_infer"])
        print(f"{m:<10}{np.median(over):>14.0f}{np.percentile(over, 99):>8.0f}"
              + "".join(f"{np.median(per[p]):>{w}.0f}" for p, w in (("compute_input", 11), ("queue", 11),
                                                                    ("compute_output", 12), ("compute_infer", 11))))
    client.close()


def worker_path_clients(sock: Path, clients: int, seconds: float) -> None:
    """The agent's overhead per request with ``clients`` client processes at once (statistics
    extension, means over the run): input + output, the queue apart (it is the wait for the model)."""
    print(f"\nInside the agent, {clients} clients for {seconds:.0f} s per model, mean µs per request; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<10}{'requests/s':>11}{'input':>8}{'queue':>8}{'infer':>8}{'output':>8}"
          f"{'input+output':>14}")
    client = AgentClient(sock)
    ctx = mp.get_context("fork")
    for m in WORKER_MODELS:
        before = phase_totals(client, m)
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        start_at = time.time() + 0.5 + clients * 0.02
        procs = [ctx.Process(target=_client_loop, args=(str(sock), m, start_at + seconds, start_at, out))
                 for _ in range(clients)]
        for p in procs:
            p.start()
        total = sum(out.get(timeout=seconds + 60) for _ in procs)
        for p in procs:
            p.join()
        delta = phase_totals(client, m) - before
        means = delta[1:] / max(delta[0], 1) / 1000
        phase = dict(zip(PHASES, means, strict=True))
        print(f"{m:<10}{total / seconds:>11.0f}{phase['compute_input']:>8.0f}{phase['queue']:>8.0f}"
              f"{phase['compute_infer']:>8.0f}{phase['compute_output']:>8.0f}"
              f"{phase['compute_input'] + phase['compute_output']:>14.0f}")
    client.close()


def _health_probe(sock: str, stop_at: float, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    client = AgentClient(sock)
    while time.time() < start_at:
        time.sleep(0.001)
    latencies = []
    while time.time() < stop_at:
        t0 = time.perf_counter()
        client.request("GET", "/v2/health/live")
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.002)
    out.put(("health", latencies))


#: Silero VAD rows of about 20 MB as v2 binary (3,328 bytes a row) and 25 MB as JSON.
BIG_BINARY_ROWS, BIG_JSON_ROWS = 6000, 1900


def _big_client(sock: str, binary: bool, stop_at: float, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    client = AgentClient(sock, timeout=300)
    feeds = silero_feeds(BIG_BINARY_ROWS if binary else BIG_JSON_ROWS)
    while time.time() < start_at:
        time.sleep(0.001)
    done = 0
    while time.time() < stop_at:
        client.infer("silero_vad", feeds, binary=binary)
        done += 1
    out.put(("binary" if binary else "json", done))


def health_stall(sock: Path, seconds: float) -> None:
    """``GET /v2/health/live`` every 2 ms from its own process, alone and then while two other
    clients send Silero VAD (a quick model, inline for small requests) ~20 MB v2 binary and
    ~25 MB JSON predicts back to back."""
    import orjson


    binary_mb = sum(v.nbytes for v in silero_feeds(BIG_BINARY_ROWS).values()) / 1e6
    json_mb = len(orjson.dumps({k: v.tolist() for k, v in silero_feeds(BIG_JSON_ROWS).items()})) / 1e6
    print(f"\nHealth checks while large predicts are served (µs); {seconds:.0f} s per phase; "
          f"binary body {binary_mb:.1f} MB, JSON body ~{json_mb:.1f} MB")
    print(f"{'phase':<24}{'checks':>8}{'p50':>9}{'p99':>9}{'max':>9}{'binary':>8}{'JSON':>6}{'load':>7}")
    with AgentClient(sock) as client:  # a few small calls: Silero is timed as quick (inline)
        for _ in range(20):
            client.infer("silero_vad", silero_feeds())
    ctx = mp.get_context("fork")
    for phase, big in (("alone", ()), ("20 MB binary", (True,)), ("25 MB JSON", (False,)),
                       ("20 MB bin + 25 MB JSON", (True, False))):
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        start_at = time.time() + 1.0
        stop_at = start_at + seconds
        procs = [ctx.Process(target=_health_probe, args=(str(sock), stop_at, start_at, out))]
        procs += [ctx.Process(target=_big_client, args=(str(sock), b, stop_at, start_at, out)) for b in big]
        for proc in procs:
            proc.start()
        results = dict(out.get(timeout=seconds + 300) for _ in procs)
        for proc in procs:
            proc.join()
        lat = np.asarray(results["health"]) * 1e6
        print(f"{phase:<24}{len(lat):>8}{np.median(lat):>9.0f}{np.percentile(lat, 99):>9.0f}{lat.max():>9.0f}"
              f"{results.get('binary', 0):>8}{results.get('json', 0):>6}{os.getloadavg()[0]:>7.2f}")


def _client_loop(sock: str, model: str, stop_at: float, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """One load process: ``model`` called back to back from ``start_at`` to ``stop_at``; puts the count."""
    client = AgentClient(sock)
    feeds = ocr_feeds(model) if model.startswith("ocr_") else silero_feeds()
    while time.time() < start_at:
        time.sleep(0.001)
    done = 0
    while time.time() < stop_at:
        client.infer(model, feeds)
        done += 1
    out.put(done)


def throughput(sock: Path, model: str, clients: int, seconds: float) -> float:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 0.5 + clients * 0.02
    stop_at = start_at + seconds
    procs = [ctx.Process(target=_client_loop, args=(str(sock), model, stop_at, start_at, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def throughput_ab(sock: Path, clients: int, seconds: float, rounds: int) -> tuple[float, float, float]:
    """Silero VAD requests/s at ``clients`` clients, unbatched and batched in alternating windows
    of ``seconds / rounds``: (median unbatched, median batched, median of the per-round ratios)."""
    plain, batched = [], []
    window = seconds / rounds
    for r in range(rounds):
        order = ("silero_vad", "silero_vad_batched") if r % 2 == 0 else ("silero_vad_batched", "silero_vad")
        for model in order:
            (plain if model == "silero_vad" else batched).append(throughput(sock, model, clients, window))
    return (float(np.median(plain)), float(np.median(batched)),
            float(np.median(np.divide(batched, plain))))


def one_client_ab(sock: Path, rounds: int, per_round: int) -> None:
    """One client, v2 binary Silero, unbatched against batched, interleaved round by round."""
    client = AgentClient(sock)
    feeds = silero_feeds()
    calls = {m: functools.partial(client.infer, m, feeds) for m in ("silero_vad", "silero_vad_batched")}
    samples, medians = interleaved(calls, rounds, per_round, warm_up=50)
    client.close()
    plain, batched = (np.asarray(samples[m]) * 1e6 for m in calls)
    ratio = float(np.median(np.divide(medians["silero_vad_batched"], medians["silero_vad"])))
    print(f"\nOne client, Silero v2 binary latency (µs), {rounds}x{per_round} calls each, interleaved; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'':<12}{'p50':>8}{'p99':>8}")
    print(f"{'unbatched':<12}{np.median(plain):>8.0f}{np.percentile(plain, 99):>8.0f}")
    print(f"{'batched':<12}{np.median(batched):>8.0f}{np.percentile(batched, 99):>8.0f}"
          f"   batched/unbatched latency, median of per-round ratios: {ratio:.3f}")


def batch_costs(sizes: tuple[int, ...] = (1, 4, 8, 16, 32), calls: int = 200) -> list[tuple[int, float]]:
    """Raw Silero time per row at each batch size: the most dynamic batching can save."""
    session = raw_silero()
    feeds = {size: silero_feeds(size) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(calls // 10):  # interleaved: noise hits every size alike
        for size in sizes:
            for _ in range(10):
                t0 = time.perf_counter()
                session.run(None, feeds[size])
                times[size].append(time.perf_counter() - t0)
    return [(size, float(np.median(times[size])) * 1e6 / size) for size in sizes]


def worker_throughput(clients: int, batching: bool, seconds: float, queue_delay_us: int) -> float:
    """Requests/s through the model worker alone (no HTTP): isolates what batching buys."""
    import asyncio

    from agent.config import BatchingSection
    from agent.models.worker import Worker
    from agent.runtimes import get_backend

    session = get_backend("onnx").load(fetch("silero_vad"), [], threads=1)
    worker = Worker("bench", session, BatchingSection(enabled=batching, max_batch_size=32,
                                                          max_queue_delay_us=queue_delay_us))
    feeds = silero_feeds()

    async def client(stop_at: float) -> int:
        done = 0
        while time.perf_counter() < stop_at:
            await worker.submit(feeds)
            done += 1
        return done

    async def run() -> int:
        stop_at = time.perf_counter() + seconds
        return sum(await asyncio.gather(*(client(stop_at) for _ in range(clients))))

    total = asyncio.run(run())
    worker.stop()
    return total / seconds


def shared_memory_table(sock: Path, rounds: int, per_round: int) -> None:
    """Face detection's input (and outputs) in a shared-memory region against v2 binary, interleaved:
    end to end per call (the shared-memory modes include copying the image into the region, as
    a producer would instead of into its own buffer) and inside the agent (statistics extension)."""
    from multiprocessing import shared_memory

    client = AgentClient(sock)
    image = face_image()
    face = Interpreter(model_path=str(fetch("face_detection")), num_threads=1)
    face.allocate_tensors()
    face_in = face.get_input_details()[0]["index"]
    face_outs = [(d["name"], d["index"]) for d in face.get_output_details()]
    sizes = {}
    face.set_tensor(face_in, image)
    face.invoke()
    for name, index in face_outs:
        sizes[name] = face.get_tensor(index).nbytes
    region = shared_memory.SharedMemory(f"edge-bench-{os.getpid()}", create=True,
                                        size=image.nbytes + sum(sizes.values()))
    try:
        client.register_shm("frame", "/" + region.name, region.size)
        frame = np.ndarray(image.shape, image.dtype, buffer=region.buf)
        shm_input = {"input": ShmInput("frame", image.shape, "FP32")}
        at, shm_outputs = image.nbytes, {}
        for name, size in sizes.items():
            shm_outputs[name] = ShmOutput("frame", size, at)
            at += size

        def raw() -> None:
            face.set_tensor(face_in, image)
            face.invoke()
            for _, index in face_outs:
                face.get_tensor(index)

        def shm_in() -> None:
            np.copyto(frame, image)
            client.infer_shm("face_detection", shm_input)

        def shm_both() -> None:
            np.copyto(frame, image)
            client.infer_shm("face_detection", shm_input, shm_outputs)

        modes: dict[str, Callable[[], Any]] = {
            "raw runtime": raw, "v2 binary": lambda: client.infer("face_detection", {"input": image}),
            "shm input": shm_in, "shm in+out": shm_both}
        np.copyto(frame, image)
        got = client.infer_shm("face_detection", shm_input, shm_outputs)
        for name, meta in got.items():
            offset = shm_outputs[name].offset
            written = np.ndarray(meta["shape"], np.float32, buffer=region.buf, offset=offset)
            np.testing.assert_array_equal(written, client.infer("face_detection", {"input": image})[name])
        samples, inside, loads = rounds_inside(client, "face_detection", modes, rounds, per_round)
        client.unregister_shm("frame")
    finally:
        client.close()
        region.close()
        region.unlink()
    print(f"\nFace detection, input {image.nbytes} bytes: v2 binary against shared memory, µs, {rounds}x{per_round} "
          f"calls per mode, interleaved; load {np.median(loads):.2f} (median over rounds)")
    print_inside_table(samples, inside)


Inside = dict[str, np.ndarray]  # agent mode -> statistics totals over its calls (``phase_totals``)


def rounds_inside(client: AgentClient, model: str, modes: Mapping[str, Callable[[], Any]], rounds: int,
                  per_round: int, warm_up: int = 50) -> tuple[dict[str, list[float]], Inside, list[float]]:
    """``modes`` in interleaved rounds (the first, "raw runtime", in this process): every call's time
    (s), each agent mode's statistics totals over its calls (``phase_totals``), and the load per round."""
    samples: dict[str, list[float]] = {m: [] for m in modes}
    inside: Inside = {}
    for fn in modes.values():
        for _ in range(warm_up):
            fn()
    loads = []
    for r in range(rounds):
        for mode in (list(modes) if r % 2 == 0 else list(reversed(modes))):
            fn = modes[mode]
            before = phase_totals(client, model) if mode != "raw runtime" else None
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[mode].append(time.perf_counter() - t0)
            if before is not None:
                inside[mode] = inside.get(mode, 0) + phase_totals(client, model) - before
        loads.append(os.getloadavg()[0])
    return samples, inside, loads


def print_inside_table(samples: Mapping[str, list[float]], inside: Inside) -> None:
    """p50/p99 end to end, against "raw runtime", and the agent's own phases (µs per request)."""
    raw_p50 = float(np.median(samples["raw runtime"])) * 1e6
    print(f"{'mode':<13}{'p50':>9}{'p99':>9}{'overhead p50':>14}{'ratio':>8}{'inside: input':>15}{'output':>8}"
          f"{'overhead':>10}")
    for mode, values in samples.items():
        arr = np.asarray(values) * 1e6
        p50 = float(np.median(arr))
        line = f"{mode:<13}{p50:>9.0f}{float(np.percentile(arr, 99)):>9.0f}"
        if mode in inside:
            means = inside[mode][1:] / max(inside[mode][0], 1) / 1000
            line += (f"{p50 - raw_p50:>14.0f}{p50 / raw_p50:>8.2f}{means[PHASES.index('compute_input')]:>15.0f}"
                     f"{means[PHASES.index('compute_output')]:>8.0f}"
                     f"{means[PHASES.index('success')] - means[PHASES.index('compute_infer')]:>10.0f}")
        print(line)


#: Detection models given camera frames, with the image pre-processing their manifests declare:
#: MediaPipe face detection (128x128, letterboxed, [-1, 1]) and RapidOCR's text detector (192x192,
#: stretched, ImageNet mean/std, NCHW).
FRAME_MODELS = {
    "face_frame": ("face_detection", "model.tflite", "tflite",
                   {"type": "image", "resize": "letterbox", "scale": 1 / 127.5, "offset": -1.0}),
    "ocr_det_frame": ("ocr_det", "model.onnx", "onnx",
                      {"type": "image", "size": [192, 192], "layout": "nchw", "mean": [123.675, 116.28, 103.53],
                       "std": [58.395, 57.12, 57.375]}),
}


def frame_table(sock: Path, rounds: int, per_round: int) -> None:
    """A 640x480x3 uint8 camera frame through each FRAME_MODELS model: the manifest's pre-processing
    and the model call here (the same pre-processing code, the raw runtime) against the agent given
    the frame (``parameters.preprocess``) in the request body and in a shared-memory region (the
    shared-memory mode includes copying the frame into the region, as a camera producer would)."""
    from multiprocessing import shared_memory

    from agent.pipelines.base import Frame
    from agent.pipelines.preprocess import make_preprocessor
    from agent.runtimes.base import TensorSpec

    frame = np.random.default_rng(3).integers(0, 256, (480, 640, 3), np.uint8)
    client = AgentClient(sock)
    region = shared_memory.SharedMemory(f"edge-bench-frame-{os.getpid()}", create=True, size=frame.nbytes)
    try:
        client.register_shm("camera", "/" + region.name, frame.nbytes)
        in_region = np.ndarray(frame.shape, frame.dtype, buffer=region.buf)
        for model, (sample, _, runtime, pre_spec) in FRAME_MODELS.items():
            if runtime == "tflite":
                interp = Interpreter(model_path=str(fetch(sample)), num_threads=1)
                interp.allocate_tensors()
                detail = interp.get_input_details()[0]
                spec = TensorSpec(detail["name"], np.dtype(detail["dtype"]), tuple(int(d) for d in detail["shape"]))
                outs = [d["index"] for d in interp.get_output_details()]

                def run(feeds: Mapping[str, np.ndarray], interp: Any = interp, index: int = detail["index"],
                        outs: list[int] = outs) -> None:
                    interp.set_tensor(index, next(iter(feeds.values())))
                    interp.invoke()
                    for o in outs:
                        interp.get_tensor(o)
            else:
                session = raw_session(sample)
                spec = TensorSpec("x", np.dtype(np.float32), (None, 3, None, None))
                run = functools.partial(lambda feeds, session: session.run(None, dict(feeds)), session=session)
            pre = make_preprocessor(pre_spec, [spec])

            def raw(pre: Any = pre, run: Callable[[Mapping[str, np.ndarray]], None] = run) -> None:
                run(next(iter(pre(Frame(frame, 0.0, 0, "bench")))).feeds)

            def shm_frame(model: str = model) -> None:
                np.copyto(in_region, frame)
                client.infer_frame(model, ShmInput("camera", frame.shape, "UINT8"))

            want, _ = client.infer_frame(model, frame)
            np.copyto(in_region, frame)
            got, _ = client.infer_frame(model, ShmInput("camera", frame.shape, "UINT8"))
            for name, value in want.items():
                np.testing.assert_array_equal(got[name], value)
            modes: dict[str, Callable[[], Any]] = {
                "raw runtime": raw, "v2 binary": functools.partial(client.infer_frame, model, frame),
                "shm frame": shm_frame}
            samples, inside, loads = rounds_inside(client, model, modes, rounds, per_round, warm_up=20)
            print(f"\n{model} ({sample}): a 640x480x3 uint8 frame through the manifest's pre-processing, µs, "
                  f"{rounds}x{per_round} calls per mode, interleaved; load {np.median(loads):.2f} (median over rounds)")
            print_inside_table(samples, inside)
        client.unregister_shm("camera")
    finally:
        client.close()
        region.close()
        region.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--queue-delay-us", type=int, default=500, help="batching max_queue_delay_us")
    parser.add_argument("--throughput-only", action="store_true", help="skip the latency table")
    parser.add_argument("--section", choices=("all", "worker", "stall", "batching", "shm", "frame"), default="all",
                        help="worker: only the worker-path tables (OCR models, 1 and 8 clients); "
                             "stall: only the health checks under large predicts; batching: only Silero's batch "
                             "costs and the throughput tables; shm: only face detection through shared memory "
                             "against v2 binary; frame: a 640x480 camera frame through the manifests' pre-processing "
                             "(face detection, OCR text detection), raw against v2 binary and shared memory")
    parser.add_argument("--throughput-rounds", type=int, default=4,
                        help="alternating unbatched/batched windows per client count (of --seconds in all)")
    parser.add_argument("--tree", type=Path, help="run the agent of this source tree (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        proc = start_agent(work, args.queue_delay_us, args.tree)
        try:
            sock = work / "agent.sock"
            raw = {"silero_vad": 0.0}
            if args.section == "stall":
                health_stall(sock, args.seconds)
                return
            if args.section == "shm":
                shared_memory_table(sock, args.rounds, args.per_round)
                return
            if args.section == "frame":
                frame_table(sock, args.rounds, args.per_round)
                return
            if args.section == "worker":
                worker_path(sock, args.rounds, args.per_round)
                worker_path_clients(sock, 8, args.seconds)
                return
            if not args.throughput_only and args.section == "all":
                rows, inside = latency_table(sock, args.rounds, args.per_round)
                raw = {model: p50 for model, mode, p50, _ in rows if mode == "raw runtime"}
                print(f"\nLatency (µs), {args.rounds}x{args.per_round} calls per mode, interleaved; one client, "
                      "batch 1")
                print(f"{'model':<16}{'mode':<13}{'p50':>9}{'p99':>9}{'overhead p50':>14}{'ratio':>8}")
                for model, mode, p50, p99 in rows:
                    extra = "" if mode == "raw runtime" else f"{p50 - raw[model]:>14.0f}{p50 / raw[model]:>8.2f}"
                    print(f"{model:<16}{mode:<13}{p50:>9.0f}{p99:>9.0f}{extra}")
                print("\nInside the agent (statistics extension, GET /v2/models/NAME/stats): mean µs per request "
                      "in the same calls")
                print(f"{'model':<16}{'mode':<13}{'input':>8}{'queue':>8}{'infer':>8}{'output':>8}{'total':>8}"
                      f"{'overhead':>10}")
                for (model, mode), totals in inside.items():
                    means = totals[1:] / max(totals[0], 1) / 1000
                    print(f"{model:<16}{mode:<13}" + "".join(f"{m:>8.0f}" for m in means)
                          + f"{means[4] - means[2]:>10.0f}")
                print("\nInside the agent, one v2 binary request at a time (statistics read after each call), µs")
                print(f"{'model':<16}{'overhead p50':>14}{'overhead p99':>14}{'infer p50':>11}")
                for model, p50, p99, infer in inside_per_request(sock):
                    print(f"{model:<16}{p50:>14.0f}{p99:>14.0f}{infer:>11.0f}")
            costs = batch_costs()
            print("\nSilero VAD raw runtime, µs per row by batch size: the ceiling of what batching can save")
            print(f"{'batch':>8}{'µs/row':>10}{'speed-up':>10}")
            for size, per_row in costs:
                print(f"{size:>8}{per_row:>10.0f}{costs[0][1] / per_row:>10.2f}")
            raw_rate = f"raw runtime single-thread: {1e6 / raw['silero_vad']:.0f}/s" if raw["silero_vad"] else ""
            print(f"\nThroughput, Silero VAD, v2 binary, requests/s, median of {args.throughput_rounds} "
                  f"alternating windows per mode over {args.seconds:.0f} s; batching "
                  f"max_queue_delay_us={args.queue_delay_us} ({raw_rate})")
            print(f"{'clients':>8}{'unbatched':>12}{'batched':>12}{'ratio':>8}{'per-round ratio':>17}{'load':>7}")
            for clients in (1, 8, 32):
                plain, batched, ratio = throughput_ab(sock, clients, args.seconds, args.throughput_rounds)
                print(f"{clients:>8}{plain:>12.0f}{batched:>12.0f}{batched / plain:>8.2f}{ratio:>17.2f}"
                      f"{os.getloadavg()[0]:>7.2f}")
            one_client_ab(sock, args.rounds, args.per_round)
            print(f"\nThroughput, Silero VAD, model worker alone (no HTTP, one process), requests/s over "
                  f"{args.seconds:.0f} s")
            print(f"{'clients':>8}{'unbatched':>12}{'batched':>12}{'ratio':>8}")
            for clients in (1, 8, 32):
                plain = worker_throughput(clients, False, args.seconds, args.queue_delay_us)
                batched = worker_throughput(clients, True, args.seconds, args.queue_delay_us)
                print(f"{clients:>8}{plain:>12.0f}{batched:>12.0f}{batched / plain:>8.2f}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
