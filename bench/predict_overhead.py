"""Predict overhead of the agent over the raw runtime, and throughput with dynamic batching.

Starts a real agent daemon on a Unix socket with real models (Silero VAD, ONNX; MediaPipe
face detection, LiteRT) and measures, in one run and interleaved so machine noise hits all
modes alike:
  * latency p50/p99 of the raw runtime call in this process, and of the same call through
    the agent: TF Serving v1 JSON, OIP v2 JSON, OIP v2 binary; overhead in µs and as a ratio;
  * the floor: Silero behind the least any server process can do (a child process that reads
    a fixed-size request from a Unix socket, runs the same session, writes a fixed-size reply;
    no HTTP, no parsing) — what crossing a process boundary costs on this machine;
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
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch


def silero_feeds(batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input": (0.1 * rng.standard_normal((batch, 576))).astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(16000, np.int64)}


def start_agent(work: Path, queue_delay_us: int = 500) -> subprocess.Popen[bytes]:
    models = work / "models"
    for name, sample, file in (("silero_vad", "silero_vad", "model.onnx"),
                               ("silero_vad_batched", "silero_vad", "model.onnx"),
                               ("face_detection", "face_detection", "model.tflite")):
        (models / name / "1").mkdir(parents=True)
        shutil.copyfile(fetch(sample), models / name / "1" / file)
    config = work / "agent.toml"
    config.write_text("[runtime]\nthreads = 1\n"
                      "[model.silero_vad_batched.batching]\nenabled = true\nmax_batch_size = 32\n"
                      f"max_queue_delay_us = {queue_delay_us}\n")
    env = dict(os.environ, EDGE_AGENT_AGENT__STATE_DIR=str(work / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--models-dir",
                             str(models), "--socket", str(work / "agent.sock"), "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=(work / "agent.log").open("wb"), env=env)
    client = AgentClient(work / "agent.sock")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.request("GET", "/v2/health/ready")[0] == 200:
                client.close()
                return proc
        except ClientError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"agent did not start:\n{(work / 'agent.log').read_text()}")


def raw_silero() -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1  # the agent runs with [runtime] threads = 1 too: same work on both sides
    return ort.InferenceSession(str(fetch("silero_vad")), so, providers=["CPUExecutionProvider"])


FLOOR_REQUEST, FLOOR_REPLY = 3800, 1400  # bytes: about a Silero v2 binary request and its answer, with HTTP


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


def floor_client(path: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """(call, stop) for the floor server in a child process."""
    import socket

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_floor_server, args=(str(path), ready), daemon=True)
    proc.start()
    ready.wait(30)
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(str(path))
    request, buf = b"y" * FLOOR_REQUEST, bytearray(FLOOR_REPLY)

    def call() -> None:
        conn.sendall(request)
        got = 0
        while got < FLOOR_REPLY:
            got += conn.recv_into(memoryview(buf)[got:])

    def stop() -> None:
        conn.close()
        proc.join(5)

    return call, stop


def latency_table(sock: Path, rounds: int, per_round: int) -> list[tuple[str, str, float, float]]:
    client = AgentClient(sock)
    floor, stop_floor = floor_client(sock.with_name("floor.sock"))
    silero = raw_silero()
    face = Interpreter(model_path=str(fetch("face_detection")), num_threads=1)
    face.allocate_tensors()
    face_in = face.get_input_details()[0]["index"]
    face_outs = [d["index"] for d in face.get_output_details()]
    image = np.random.default_rng(1).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
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
    for fns in modes.values():  # warm-up
        for fn in fns.values():
            for _ in range(50):
                fn()
    for _ in range(rounds):
        for model, fns in modes.items():
            for mode, fn in fns.items():
                bucket = samples[(model, mode)]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn()
                    bucket.append(time.perf_counter() - t0)
    client.close()
    stop_floor()
    rows = []
    for (model, mode), values in samples.items():
        arr = np.asarray(values) * 1e6
        rows.append((model, mode, float(np.median(arr)), float(np.percentile(arr, 99))))
    return rows


def _client_loop(sock: str, model: str, stop_at: float, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    client = AgentClient(sock)
    feeds = silero_feeds()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--queue-delay-us", type=int, default=500, help="batching max_queue_delay_us")
    parser.add_argument("--throughput-only", action="store_true", help="skip the latency table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        work = Path(tmp)
        proc = start_agent(work, args.queue_delay_us)
        try:
            sock = work / "agent.sock"
            raw = {"silero_vad": 0.0}
            if not args.throughput_only:
                rows = latency_table(sock, args.rounds, args.per_round)
                raw = {model: p50 for model, mode, p50, _ in rows if mode == "raw runtime"}
                print(f"\nLatency (µs), {args.rounds}x{args.per_round} calls per mode, interleaved; one client, "
                      "batch 1")
                print(f"{'model':<16}{'mode':<13}{'p50':>9}{'p99':>9}{'overhead p50':>14}{'ratio':>8}")
                for model, mode, p50, p99 in rows:
                    extra = "" if mode == "raw runtime" else f"{p50 - raw[model]:>14.0f}{p50 / raw[model]:>8.2f}"
                    print(f"{model:<16}{mode:<13}{p50:>9.0f}{p99:>9.0f}{extra}")
            raw_rate = f"raw runtime single-thread: {1e6 / raw['silero_vad']:.0f}/s" if raw["silero_vad"] else ""
            print(f"\nThroughput, Silero VAD, v2 binary, requests/s over {args.seconds:.0f} s; batching "
                  f"max_queue_delay_us={args.queue_delay_us} ({raw_rate})")
            print(f"{'clients':>8}{'unbatched':>12}{'batched':>12}{'ratio':>8}")
            for clients in (1, 8, 32):
                plain = throughput(sock, "silero_vad", clients, args.seconds)
                batched = throughput(sock, "silero_vad_batched", clients, args.seconds)
                print(f"{clients:>8}{plain:>12.0f}{batched:>12.0f}{batched / plain:>8.2f}")
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
