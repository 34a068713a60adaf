"""Predict latency of two source trees of the agent, interleaved: did a change make it slower?

Starts one agent from each tree (``--before DIR``, ``--after DIR``, default: this tree) with the
same models and config as ``bench/predict_overhead.py`` (``[runtime] threads = 1``), then, round
after round, makes ``--per-round`` calls of each mode on one agent and then on the other (the
order alternating each round), so machine noise hits both alike. Modes: Silero VAD (ONNX, runs
inline) and face detection (LiteRT) over TF Serving v1 JSON, OIP v2 JSON and OIP v2 binary, the
OCR classifier and detector (the worker path) over OIP v2 binary, plus
``GET /v2/health/live``. Prints the median and p99 per mode and agent, and the change of the median
(also as the median of the per-round changes, each round's two blocks being close in time);
and the CPU time per call of the agent's event-loop thread (which parses, routes, decodes,
answers, and runs inline models), from the kernel's scheduler statistics around each block of
calls: a machine shared with other work disturbs it much less than latency.

Usage: python bench/predict_ab.py --before /path/to/old/tree [--after DIR] [--rounds 30] [--per-round 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient
from agent.samples import fetch
from bench.agentproc import start_agent as run_agent

# The OCR models measure the worker path: never inline, even when one call is under 2 ms.
CONFIG = "[runtime]\nthreads = 1\n[model.ocr_cls]\ninline_max_us = 0\n[model.ocr_det]\ninline_max_us = 0\n"


def start(tree: Path, work: Path) -> subprocess.Popen[bytes]:
    models = work / "models"
    for name, sample, file in (("silero_vad", "silero_vad", "model.onnx"),
                               ("face_detection", "face_detection", "model.tflite"),
                               ("ocr_cls", "ocr_cls", "model.onnx"), ("ocr_det", "ocr_det", "model.onnx")):
        (models / name / "1").mkdir(parents=True)
        shutil.copyfile(fetch(sample), models / name / "1" / file)
    (work / "agent.toml").write_text(CONFIG)
    env = dict(os.environ, EDGE_AGENT_AGENT__STATE_DIR=str(work / "state"),
               EDGE_AGENT_AGENT__RUNTIME_DIR=str(work / "run"), PYTHONPATH=str(tree))
    return run_agent(work, work / "agent.toml", models, env, cwd=tree)


def loop_ns(schedstat: Path) -> int:
    """Nanoseconds the agent's main (event-loop) thread has run, from ``/proc/PID/task/PID/schedstat``."""
    return int(schedstat.read_text().split()[0])


def modes(client: AgentClient) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    vad = {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
           "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
    vad_lists = {k: v.tolist() for k, v in vad.items()}
    image = np.random.default_rng(1).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    crop = np.random.default_rng(2).uniform(-1, 1, (1, 3, 48, 320)).astype(np.float32)
    page = np.random.default_rng(2).uniform(-1, 1, (1, 3, 192, 192)).astype(np.float32)
    return {
        "silero v1 JSON": lambda: client.predict("silero_vad", vad_lists),
        "silero v2 JSON": lambda: client.infer("silero_vad", vad, binary=False),
        "silero v2 binary": lambda: client.infer("silero_vad", vad),
        "face v2 JSON": lambda: client.infer("face_detection", {"input": image}, binary=False),
        "face v2 binary": lambda: client.infer("face_detection", {"input": image}),
        # The worker path (slower than inline_max_us): ~2 ms and ~7 ms per call here.
        "ocr_cls v2 binary": lambda: client.infer("ocr_cls", {"x": crop}),
        "ocr_det v2 binary": lambda: client.infer("ocr_det", {"x": page}),
        "health": lambda: client.request("GET", "/v2/health/live"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--modes", help="comma-separated substrings: only the modes whose name has one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-ab-") as tmp:
        trees = {"before": args.before.resolve(), "after": args.after.resolve()}
        procs, clients, calls = {}, {}, {}
        try:
            for label, tree in trees.items():
                work = Path(tmp) / label
                work.mkdir()
                procs[label] = start(tree, work)
                clients[label] = AgentClient(work / "agent.sock")
                calls[label] = modes(clients[label])
            names = [m for m in calls["before"]
                     if not args.modes or any(part.strip() in m for part in args.modes.split(","))]
            samples: dict[tuple[str, str], list[float]] = {(label, m): [] for label in trees for m in names}
            cpu: dict[tuple[str, str], list[float]] = {(label, m): [] for label in trees for m in names}
            rounds: dict[tuple[str, str], list[float]] = {(label, m): [] for label in trees for m in names}
            loops = {label: Path(f"/proc/{proc.pid}/task/{proc.pid}/schedstat") for label, proc in procs.items()}
            for label in trees:  # warm-up
                for fn in (calls[label][m] for m in names):
                    for _ in range(50):
                        fn()
            for r in range(args.rounds):
                order = list(trees) if r % 2 == 0 else list(reversed(trees))
                for mode in names:
                    for label in order:
                        fn, bucket = calls[label][mode], samples[(label, mode)]
                        before = loop_ns(loops[label])
                        block = []
                        for _ in range(args.per_round):
                            t0 = time.perf_counter()
                            fn()
                            block.append(time.perf_counter() - t0)
                        bucket.extend(block)
                        cpu[(label, mode)].append((loop_ns(loops[label]) - before) / args.per_round / 1e9)
                        rounds[(label, mode)].append(float(np.median(block)))
            print(f"\nPredict latency (µs), {args.rounds} rounds x {args.per_round} calls per mode and agent, "
                  f"interleaved; one client, batch 1; load average {os.getloadavg()[0]:.2f}")
            print(f"  before: {trees['before']}\n  after:  {trees['after']}")
            print(f"{'mode':<18}{'before p50':>11}{'after p50':>11}{'change':>9}{'paired':>9}{'before p99':>12}"
                  f"{'after p99':>11}{'loop CPU before':>16}{'after':>8}{'change':>9}{'paired':>9}")
            for mode in names:
                b = np.asarray(samples[("before", mode)]) * 1e6
                a = np.asarray(samples[("after", mode)]) * 1e6
                change = (np.median(a) - np.median(b)) / np.median(b) * 100
                cb = float(np.median(cpu[("before", mode)])) * 1e6  # median over rounds of CPU µs per call
                ca = float(np.median(cpu[("after", mode)])) * 1e6
                paired = (np.median(np.divide(rounds[("after", mode)], rounds[("before", mode)])) - 1) * 100
                paired_cpu = (np.median(np.divide(cpu[("after", mode)], cpu[("before", mode)])) - 1) * 100
                print(f"{mode:<18}{np.median(b):>11.1f}{np.median(a):>11.1f}{change:>8.1f}%{paired:>8.1f}%"
                      f"{np.percentile(b, 99):>12.1f}{np.percentile(a, 99):>11.1f}"
                      f"{cb:>16.1f}{ca:>8.1f}{(ca - cb) / cb * 100:>8.1f}%{paired_cpu:>8.1f}%")
        finally:
            for client in clients.values():
                client.close()
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


if __name__ == "__main__":
    main()
