"""Throughput of a CPU-bound model (face detection, LiteRT) with fixed and elastic instances,
and how long the elastic agent takes to scale up under a step in load.

Three agents serve the same model at once: ``1x2`` (one instance, 2 runtime threads), ``2x1``
(two instances of 1 thread: ``instances = {min = 2, max = 2}``) and ``elastic`` (1 thread,
``instances = {min = 1, max = 2}``, ``[scaling]`` on). For each client count (closed loop: each
client process sends its next request when the last is answered) and round, each agent gets one
block, in an order that rotates every round, so machine noise hits all alike. Prints the median
requests/s per agent and client count. Then, ``--steps`` times: the elastic agent idles back to
one instance, 4 clients start at once, and the time until it serves with two is measured.

Usage: python bench/instances.py [--clients 1 2 4 8] [--seconds 4] [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient
from agent.samples import fetch
from tests.conftest import Daemon, start_daemon

NAME = "face"
SCALING = ("[scaling]\nenabled = true\ninterval_s = 0.25\nwindow_s = 2.0\nscale_up_wait_ms = 2.0\n"
           "min_requests = 20\nidle_s = {idle}\n")
AGENTS = {
    "1x2": "[model.face]\nthreads = 2\n",
    "2x1": SCALING + "[model.face]\nthreads = 1\ninstances = {{ min = 2, max = 2 }}\n",
    "elastic": SCALING + "[model.face]\nthreads = 1\ninstances = {{ min = 1, max = 2 }}\n",
}


def client_loop(socket_path: str, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    feeds = {"input": np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)}
    client = AgentClient(socket_path, timeout=30)
    client.infer(NAME, feeds)
    n, failed, end = 0, 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            client.infer(NAME, feeds)
            n += 1
        except Exception:
            failed += 1
    client.close()
    out.put((n, failed))


def load(daemon: Daemon, clients: int, seconds: float) -> tuple[float, int]:
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=client_loop, args=(str(daemon.socket), seconds, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)


def instances(daemon: Daemon) -> int:
    return int(next(m["instances"] for m in daemon.client.status()["models"] if m["name"] == NAME))


def start(base: Path, label: str, config: str) -> Daemon:
    models = base / label / "models" / NAME / "1"
    models.mkdir(parents=True)
    shutil.copyfile(fetch("face_detection"), models / "model.tflite")
    path = base / label / "agent.toml"
    path.write_text(config)
    return start_daemon(base / label / "run", "--config", str(path), "--models-dir", str(models.parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--idle", type=float, default=3.0, help="[scaling] idle_s of the elastic agent")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-instances-") as tmp:
        daemons = {label: start(Path(tmp), label, cfg.format(idle=args.idle)) for label, cfg in AGENTS.items()}
        try:
            rates: dict[tuple[str, int], list[float]] = {}
            failures = 0
            for clients in args.clients:
                for r in range(args.rounds):
                    labels = list(daemons)
                    labels = labels[r % len(labels):] + labels[:r % len(labels)]
                    for label in labels:
                        rate, failed = load(daemons[label], clients, args.seconds)
                        failures += failed
                        rates.setdefault((label, clients), []).append(rate)
                        print(f"{clients} clients round {r + 1} {label:>7}: {rate:7.1f} req/s "
                              f"(instances now {instances(daemons[label])})", file=sys.stderr)
            steps = []
            elastic = daemons["elastic"]
            for _ in range(args.steps):
                deadline = time.monotonic() + 120
                while instances(elastic) != 1 and time.monotonic() < deadline:
                    time.sleep(0.2)
                ctx = mp.get_context()
                stop_at = time.perf_counter()
                proc = ctx.Process(target=load, args=(elastic, 4, 20.0))
                proc.start()
                while instances(elastic) < 2 and time.perf_counter() - stop_at < 20:
                    time.sleep(0.05)
                steps.append(time.perf_counter() - stop_at)
                proc.join(60)
        finally:
            for d in daemons.values():
                d.stop()
    load_after = os.getloadavg()
    print(f"\nface detection (LiteRT XNNPACK), closed-loop clients, {args.seconds:g} s blocks, {args.rounds} rounds "
          "(median requests/s)")
    print("clients " + "".join(f"{label:>10}" for label in AGENTS))
    for clients in args.clients:
        print(f"{clients:>7} " + "".join(f"{statistics.median(rates[(label, clients)]):>10.1f}" for label in AGENTS))
    print(f"failed requests: {failures}")
    print(f"time to scale up 1 -> 2 under a step to 4 clients: {[round(s, 2) for s in steps]} s "
          f"(median {statistics.median(steps):.2f} s; interval 0.25 s, window 2 s, threshold p95 2 ms)")
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
