"""Signed update cost: time to download, verify, stage and activate a ~50 MB bundle, and
predict latency while the model is swapped under load, against steady state in the same run.

Starts its own TUF repository (real keys, loopback HTTP) and a real agent serving Silero VAD
version 1, then deploys versions 2, 3, ... (the Silero model plus an incompressible padding
file) while client processes call ``infer`` continuously. Step times come from the
deployment record's ``history``; the download/verify split from the agent's debug log
(``fetch.complete``). Latency windows: steady = the seconds before each deploy; swap =
+-1 s around the record's ``swapped`` timestamp; install = ``downloading`` to ``swapped``.

Usage: python bench/update.py [--runs 3] [--clients 4] [--pad-mb 48] [--steady 2]
Prints medians over the runs.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch
from tests.conftest import Daemon, start_daemon
from tests.deploy_env import DeployEnv, silero_inputs

NAME = "vad"
SWAP_HALF_WINDOW_S = 1.0
STEPS = [  # (label, from, to): "fetched" is the log's fetch.complete
    ("TUF refresh + target lookup", "started", "downloading"),
    ("download (loopback HTTP)", "downloading", "fetched"),
    ("verify (TUF sha256, fsync, move)", "fetched", "verified"),
    ("stage (extract + fsync + checks)", "verified", "staged"),
    ("load (ONNX Runtime session)", "staged", "loaded"),
    ("test vectors (= warm-up)", "loaded", "tested"),
    ("swap (rename, .active, switch)", "tested", "swapped"),
    ("verify + stage + activate", "fetched", "swapped"),
    ("total, started -> swapped", "started", "swapped"),
]


def client_loop(socket_path: str, stop: Any, out_path: str, seed: int) -> None:
    """One client process: infer until ``stop``; saves rows (start wall time, latency s, ok)."""
    client = AgentClient(socket_path, timeout=10)
    feeds = silero_inputs(seed)
    rows: list[tuple[float, float, float]] = []
    while not stop.is_set():
        started, t0 = time.time(), time.perf_counter()
        try:
            client.infer(NAME, feeds)
            ok = 1.0
        except ClientError:
            ok = 0.0
        rows.append((started, time.perf_counter() - t0, ok))
    client.close()
    np.save(out_path, np.array(rows, dtype=np.float64).reshape(-1, 3))


def deployment(client: AgentClient) -> dict[str, Any]:
    return dict(client._json("GET", f"/v1/agent/deployments/{NAME}"))


def fetch_complete_times(log_path: Path) -> dict[int, float]:
    """Version -> wall time of the bundle's ``fetch.complete`` debug event."""
    times: dict[int, float] = {}
    for line in log_path.read_bytes().splitlines():
        if b"fetch.complete" not in line:
            continue
        event = orjson.loads(line)
        url = str(event.get("url", ""))
        if event.get("event") == "fetch.complete" and url.endswith(".bundle"):
            version = int(url.rsplit("-", 1)[1].removesuffix(".bundle"))
            times[version] = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
    return times


def window_stats(rows: np.ndarray, start: float, end: float) -> dict[str, float]:
    sel = rows[(rows[:, 0] >= start) & (rows[:, 0] < end)]
    lat = sel[sel[:, 2] == 1.0][:, 1] * 1e6
    return {
        "requests": float(len(sel)),
        "errors": float(np.sum(sel[:, 2] == 0.0)),
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def build_world(base: Path, runs: int, pad_mb: int) -> tuple[DeployEnv, int]:
    samples = {"silero_vad": fetch("silero_vad")}
    env = DeployEnv.create(base, samples)
    pad = base / "padding.bin"
    pad.write_bytes(np.random.default_rng(0).bytes(pad_mb * 1_000_000))
    size = 0
    for version in range(2, runs + 2):
        size = env.publish_silero(NAME, version, files=(pad,)).stat().st_size
    models = base / "models" / NAME / "1"
    models.mkdir(parents=True)
    shutil.copyfile(samples["silero_vad"], models / "model.onnx")
    (models.parent / ".active").write_text("1\n")
    return env, size


def run(args: argparse.Namespace, base: Path) -> None:
    print(f"building {args.runs} bundles with {args.pad_mb} MB of padding ...", file=sys.stderr)
    env, bundle_bytes = build_world(base, args.runs, args.pad_mb)
    config = env.agent_config(base / "agent.toml", health_window_s=2.0, extra='[logging]\nlevel = "debug"\n')
    daemon: Daemon = start_daemon(base / "agent", "--config", str(config), "--models-dir", str(base / "models"))
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    outs = [str(base / f"client{i}.npy") for i in range(args.clients)]
    procs = [
        ctx.Process(target=client_loop, args=(str(daemon.socket), stop, out, i), daemon=True)
        for i, out in enumerate(outs)
    ]
    records: list[dict[str, Any]] = []
    windows: list[tuple[float, float]] = []  # steady window per run
    try:
        for p in procs:
            p.start()
        time.sleep(1.5)  # clients connected and warm
        for version in range(2, args.runs + 2):
            steady_start = time.time()
            while time.time() < steady_start + args.steady:  # same polling load as during the deploy
                daemon.client.request("GET", f"/v1/agent/deployments/{NAME}")
                time.sleep(0.1)
            windows.append((steady_start, time.time()))
            daemon.client._json("POST", f"/v1/agent/models/{NAME}:deploy", {"version": version})
            while True:
                rec = deployment(daemon.client)
                if not rec["running"] and rec["state"] in ("committed", "failed", "rolled_back"):
                    break
                time.sleep(0.1)
            records.append(rec)
            print(f"v{version}: {rec['state']} {rec['error'] or ''}", file=sys.stderr)
            time.sleep(0.5)
    finally:
        stop.set()
        for p in procs:
            p.join(60)
        daemon.stop()
        env.close()
    rows = np.concatenate([np.load(out) for out in outs])
    report(args, bundle_bytes, records, windows, rows, fetch_complete_times(base / "agent" / "agent.log"))


def report(
    args: argparse.Namespace,
    bundle_bytes: int,
    records: list[dict[str, Any]],
    windows: list[tuple[float, float]],
    rows: np.ndarray,
    fetched: dict[int, float],
) -> None:
    steps: dict[str, list[float]] = {label: [] for label, _, _ in STEPS}
    lat: dict[str, list[dict[str, float]]] = {"steady": [], "swap": [], "install": []}
    for rec, (s0, s1) in zip(records, windows, strict=True):
        if rec["state"] != "committed":
            continue
        at: dict[str, float] = dict(rec["history"])
        at["fetched"] = fetched.get(rec["version"], float("nan"))
        for label, a, b in STEPS:
            steps[label].append((at[b] - at[a]) * 1000)
        lat["steady"].append(window_stats(rows, s0, s1))
        lat["swap"].append(window_stats(rows, at["swapped"] - SWAP_HALF_WINDOW_S, at["swapped"] + SWAP_HALF_WINDOW_S))
        lat["install"].append(window_stats(rows, at["downloading"], at["swapped"]))
    ok = len(lat["steady"])
    print(
        f"\nInstall of a {bundle_bytes / 1e6:.1f} MB bundle (Silero VAD + {args.pad_mb} MB padding), "
        f"median of {ok}/{len(records)} committed runs, {args.clients} clients calling infer meanwhile"
    )
    print(f"{'step':<36}{'ms':>9}")
    for label, values in steps.items():
        print(f"{label:<36}{statistics.median(values) if values else float('nan'):>9.0f}")
    print(
        f"\nSilero VAD infer latency (µs), v2 binary, {args.clients} client processes; "
        f"steady = {args.steady:g} s before each deploy, swap = swapped +-{SWAP_HALF_WINDOW_S:g} s"
    )
    print(f"{'window':<28}{'requests':>9}{'errors':>8}{'p50':>9}{'p99':>9}{'p99 ratio':>11}")
    steady_p99 = statistics.median(w["p99"] for w in lat["steady"]) if ok else float("nan")
    titles = {"steady": "steady state", "swap": "around the swap", "install": "whole install (dl->swap)"}
    for key, title in titles.items():
        stats = lat[key]
        if not stats:
            continue
        med = {k: statistics.median(s[k] for s in stats) for k in ("requests", "errors", "p50", "p99")}
        print(
            f"{title:<28}{med['requests']:>9.0f}{med['errors']:>8.0f}{med['p50']:>9.0f}{med['p99']:>9.0f}"
            f"{med['p99'] / steady_p99:>11.2f}"
        )
    total_errors = int(np.sum(rows[:, 2] == 0.0))
    print(f"failed requests over the whole benchmark: {total_errors} of {len(rows)}")


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # repo server noise
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--pad-mb", type=int, default=48, help="MB of incompressible padding per bundle")
    parser.add_argument("--steady", type=float, default=2.0, help="seconds of steady state before each deploy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
