"""What a shadow's thread costs the serving thread in the same process, without HTTP or deploys.

The main thread makes paced face detection calls (LiteRT, set_tensor + invoke + get_tensor, as a
served request does) at ``--rate``; in alternating blocks a second thread runs at 20 Hz doing
nothing (``sleep``), only the runtime call that releases the GIL (``lite``), only the GIL-held
work of a sample (``numpy``: copying the inputs in, the outputs out, a cosine comparison), or both
(``both``, what a shadow does). Prints the median over blocks of the main thread's p50 and p99
call latency, and the load average: on an oversubscribed CPU the GIL-held part is what hurts, as
the holder may be descheduled while the serving thread waits for it.

Usage: python bench/shadow_thread.py [--rounds 8] [--seconds 2] [--rate 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.samples import fetch

CONDITIONS = ("none", "sleep", "lite", "numpy", "both")


class Model:
    def __init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(fetch("face_detection")), num_threads=1)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]["index"]
        self.outs = [d["index"] for d in self.it.get_output_details()]


def background(model: Model, x: np.ndarray, stop: threading.Event, kind: str, rate: float = 20.0) -> None:
    period, due = 1 / rate, time.perf_counter()
    while not stop.is_set():
        due += period
        if kind in ("numpy", "both"):
            model.it.set_tensor(model.inp, np.array(x, copy=True))
        if kind in ("lite", "both"):
            model.it.invoke()
        if kind in ("numpy", "both"):
            a = np.asarray(model.it.get_tensor(model.outs[0]), np.float64).ravel()
            b = a * 1.0001
            float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
        left = due - time.perf_counter()
        if left > 0:
            time.sleep(left)


def block(serve: Model, shadow: Model, x: np.ndarray, kind: str, seconds: float, rate: float) -> np.ndarray:
    stop = threading.Event()
    thread = None
    if kind != "none":
        thread = threading.Thread(target=background, args=(shadow, x, stop, kind), daemon=True)
        thread.start()
    lat, period, start, n = [], 1 / rate, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        left = start + n * period - time.perf_counter()
        n += 1
        if left > 0:
            time.sleep(left)
        t0 = time.perf_counter()
        serve.it.set_tensor(serve.inp, x)
        serve.it.invoke()
        [serve.it.get_tensor(i) for i in serve.outs]
        lat.append(time.perf_counter() - t0)
    stop.set()
    if thread is not None:
        thread.join()
    return np.array(lat) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=200.0)
    args = p.parse_args()
    serve, shadow = Model(), Model()
    x = np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)
    before = os.getloadavg()
    results: dict[str, list[np.ndarray]] = {c: [] for c in CONDITIONS}
    for r in range(args.rounds):
        for kind in CONDITIONS if r % 2 == 0 else CONDITIONS[::-1]:
            results[kind].append(block(serve, shadow, x, kind, args.seconds, args.rate))
    print(f"serving calls at {args.rate:g}/s, {args.rounds} rounds x {args.seconds:g} s per condition; "
          f"load average before {tuple(round(v, 1) for v in before)}, after "
          f"{tuple(round(v, 1) for v in os.getloadavg())}")
    for kind, blocks in results.items():
        p50 = statistics.median(float(np.percentile(b, 50)) for b in blocks)
        p99 = statistics.median(float(np.percentile(b, 99)) for b in blocks)
        print(f"{kind:>6}: p50 {p50:.3f} ms, p99 {p99:.3f} ms")


if __name__ == "__main__":
    main()
