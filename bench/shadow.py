"""Serving latency with and without a shadow version, at the same offered load, interleaved.

One agent serves a real model (default: face detection, LiteRT, ~1.3 ms per call; or Silero VAD,
or the float classifier of the shadow tests) while paced clients (separate processes, a fixed
request rate each: open-loop load, so a slower agent cannot lower the load it is measured at)
call predict. Round after round the same load runs once with no shadow and once with a shadow
of the same model deployed through the signed path (TUF repository on loopback) with the
default ``sample`` (0.1), the order alternating each round; the shadow is discarded after its
block. Prints, per condition, the median over rounds of each block's client-side p50 and p99,
the pooled p50/p99, the change of p99, the shadow's compared/dropped samples, and the load
average before and after.

Usage: python bench/shadow.py [--model face_detection|silero_vad|classifier] [--rate 200]
       [--clients 2] [--seconds 5] [--rounds 6] [--sample 0.1]
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
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch
from cloud_sync.bundles.build import build_bundle, generate_test_vectors
from tests.conftest import Daemon, start_daemon
from tests.deploy_env import DeployEnv, silero_inputs, silero_runner
from tests.shadow_models import classifier, inputs, onnx_runner

NAME = "m"


def litert_runner(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path))
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], feeds[d["name"]])
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}


def world(model: str, base: Path) -> tuple[Path, Path, Any, dict[str, np.ndarray]]:
    """(model file, its bundle, runner, one request's feeds)."""
    if model == "face_detection":
        path = fetch("face_detection")
        rng = np.random.default_rng(0)
        feeds = {"input": rng.random((1, 128, 128, 3), dtype=np.float32)}
        return path, path, litert_runner, feeds
    if model == "silero_vad":
        path = fetch("silero_vad")
        return path, path, silero_runner, silero_inputs(1)
    path = classifier(base / "src" / "classifier.onnx")
    return path, path, onnx_runner, {"input": inputs(1)[0]}


def client_loop(socket_path: str, rate: float, seconds: float, feeds_path: str, out_path: str, offset: float) -> None:
    """Paced calls at ``rate``/s for ``seconds``; saves each call's latency (s), NaN for a failure."""
    feeds = {k: np.asarray(v) for k, v in np.load(feeds_path).items()}
    client = AgentClient(socket_path, timeout=10)
    lat: list[float] = []
    period = 1.0 / rate
    start = time.perf_counter() + offset * period
    n = 0
    while True:
        due = start + n * period
        if due - start > seconds:
            break
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        t0 = time.perf_counter()
        try:
            client.infer(NAME, feeds)
            lat.append(time.perf_counter() - t0)
        except ClientError:
            lat.append(float("nan"))
        n += 1
    client.close()
    np.save(out_path, np.array(lat))


def loop_ns(pid: int) -> int:
    """Nanoseconds the agent's main (event-loop) thread has run: what the serving path costs it,
    whatever else the machine does (``/proc/PID/task/PID/schedstat``)."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])


def block(daemon: Daemon, args: argparse.Namespace, feeds_path: Path, work: Path) -> np.ndarray:
    procs, outs = [], []
    for i in range(args.clients):
        out = work / f"lat-{i}.npy"
        outs.append(out)
        p = mp.Process(target=client_loop, args=(str(daemon.socket), args.rate / args.clients, args.seconds,
                                                 str(feeds_path), str(out), i / args.clients))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(args.seconds + 60)
    return np.concatenate([np.load(o) for o in outs])


def api(client: AgentClient, method: str, path: str, body: Any = None) -> Any:
    status, _, data = client.request(method, path, orjson.dumps(body) if body is not None else b"")
    return client._decode(status, data)


def shadow_on(client: AgentClient, version: int, sample: float) -> None:
    api(client, "POST", f"/v1/agent/models/{NAME}:deploy", {"version": version, "mode": "shadow",
                                                            "shadow": {"sample": sample}})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record = api(client, "GET", f"/v1/agent/deployments/{NAME}")
        if record["state"] == "shadowing":
            return
        if record["state"] in ("failed", "rolled_back", "discarded"):
            raise SystemExit(f"shadow deploy failed: {record.get('error')}")
        time.sleep(0.1)
    raise SystemExit("shadow deploy did not finish")


def run(args: argparse.Namespace, base: Path) -> None:
    model_path, bundle_src, runner, feeds = world(args.model, base)
    env = DeployEnv.create(base / "tuf", {"silero_vad": fetch("silero_vad")})
    vectors = generate_test_vectors(bundle_src, feeds, runner, rtol=1e-3, atol=1e-4)
    for version in range(2, args.rounds + 2):
        env.publish(build_bundle(bundle_src, base / "bundles", name=NAME, version=version, test_vectors=vectors))
    models = base / "models" / NAME / "1"
    models.mkdir(parents=True)
    shutil.copyfile(model_path, models / f"model{model_path.suffix}")
    shadow = f"[shadow]\nnice = {args.nice}\nqueue_size = {args.queue}\nprocess = {str(not args.in_process).lower()}\n"
    config = env.agent_config(base / "agent.toml", extra="[runtime]\nthreads = 1\n" + shadow)
    daemon = start_daemon(base / "agent", "--config", str(config), "--models-dir", str(base / "models"))
    feeds_path = base / "feeds.npz"
    np.savez(feeds_path, **feeds)
    client = daemon.client
    results: dict[str, list[np.ndarray]] = {"without": [], "with": []}
    loop_us: dict[str, list[float]] = {"without": [], "with": []}
    pid = daemon.proc.pid
    compared, dropped = [], []
    load_before = os.getloadavg()
    try:
        block(daemon, argparse.Namespace(**{**vars(args), "seconds": 1.0}), feeds_path, base)  # warm up
        for r in range(args.rounds):
            order = ("without", "with") if r % 2 == 0 else ("with", "without")
            for condition in order:
                if condition == "with":
                    shadow_on(client, r + 2, args.sample)
                time.sleep(args.settle)  # the deploy's (or discard's) own work is over before measuring
                before = loop_ns(pid)
                lat = block(daemon, args, feeds_path, base)
                loop_us[condition].append((loop_ns(pid) - before) / 1e3 / len(lat))
                results[condition].append(lat)
                if condition == "with":
                    s = api(client, "GET", "/v1/agent/shadows")["shadows"][0]
                    compared.append(s["compared"])
                    dropped.append(s["dropped"])
                    api(client, "POST", f"/v1/agent/models/{NAME}:discard")
                ok = lat[~np.isnan(lat)] * 1e3
                print(f"round {r + 1} {condition:>7}: n={len(lat)} failed={int(np.isnan(lat).sum())} "
                      f"p50={np.percentile(ok, 50):.3f} ms p99={np.percentile(ok, 99):.3f} ms", file=sys.stderr)
    finally:
        daemon.stop()
        env.close()
    load_after = os.getloadavg()
    print(f"\nmodel {args.model}, {args.rate:g} req/s over {args.clients} paced clients, {args.seconds:g} s blocks, "
          f"{args.rounds} rounds, sample {args.sample}, shadow nice {args.nice}, queue {args.queue}, "
          f"{'in-process (thread)' if args.in_process else 'own process'}")
    summary = {}
    for condition, blocks in results.items():
        oks = [b[~np.isnan(b)] * 1e3 for b in blocks]
        p50 = statistics.median(float(np.percentile(b, 50)) for b in oks)
        p99 = statistics.median(float(np.percentile(b, 99)) for b in oks)
        pooled = np.concatenate(oks)
        failed = int(sum(np.isnan(b).sum() for b in blocks))
        summary[condition] = (p50, p99)
        print(f"{condition:>8} shadow: median of block p50 {p50:.3f} ms, p99 {p99:.3f} ms; pooled p50 "
              f"{np.percentile(pooled, 50):.3f} ms p99 {np.percentile(pooled, 99):.3f} ms; "
              f"{len(pooled)} ok, {failed} failed; event-loop thread CPU per call (median of blocks) "
              f"{statistics.median(loop_us[condition]):.1f} µs")
    change50 = summary["with"][0] / summary["without"][0] - 1
    change99 = summary["with"][1] / summary["without"][1] - 1
    print(f"change with a shadow: p50 {change50:+.1%}, p99 {change99:+.1%}")
    print(f"shadow per block: compared {compared}, dropped {dropped}")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["face_detection", "silero_vad", "classifier"], default="face_detection")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second, all clients together")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="each block's length")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sample", type=float, default=0.1)
    p.add_argument("--nice", type=int, default=10, help="[shadow] nice")
    p.add_argument("--in-process", action="store_true", help="[shadow] process = false: the shadow on a thread")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between a deploy/discard and a block")
    p.add_argument("--queue", type=int, default=8, help="[shadow] queue_size")
    args = p.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
