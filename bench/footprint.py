"""Footprint of the agent daemon: memory and CPU at idle and under load, and start-up time to READY.

Starts the real agent (``python -m agent.cli run``, with the environment the systemd unit sets)
with one small model, Silero VAD (ONNX Runtime), and measures:
  * start-up time from process spawn to ``READY=1`` on a real ``NOTIFY_SOCKET`` datagram socket
    (what systemd waits for with ``Type=notify``), and to the first answered request;
  * resident memory at idle: RSS, plus USS (memory only this process holds) and PSS (RSS with
    shared pages divided among their users) where the kernel exposes smaps_rollup;
  * CPU at idle over ``--idle`` seconds (the watchdog ping is on, as under systemd);
  * CPU and memory while one client calls ``infer`` in a loop for ``--load`` seconds;
  * the time to scrape ``GET /metrics`` (system, model and link health), median and worst of 50;
  * where the memory goes: RSS of a fresh interpreter after each major import.
Start-up and idle figures are the median of ``--runs`` restarts on one state and cache directory,
as a device restarts; the very first start (which also fills the runtime cache) is shown apart.

Usage: python bench/footprint.py [--runs 5] [--idle 10] [--load 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch

TARGETS = {"rss_mb": 85.0, "idle_cpu_pct": 1.0, "ready_s": 1.5}
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-agent.service"


def unit_environment() -> dict[str, str]:
    """The ``Environment=`` settings of the systemd unit: the bench runs the agent as the service does."""
    env = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            env[key] = value
    return env
MB = 1024 * 1024

IMPORT_STEPS = r"""
import os, sys, time
def rss():
    with open(f"/proc/{os.getpid()}/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
steps = [("python interpreter", "")]
steps += [(name, code) for name, code in (
    ("numpy", "import numpy"),
    ("structlog, pydantic, orjson, httptools", "import structlog, pydantic, orjson, httptools"),
    ("onnxruntime", "import onnxruntime"),
    ("ai_edge_litert (LiteRT)", "from ai_edge_litert import interpreter"),
    ("paho-mqtt", "import paho.mqtt.client"),
    ("tuf, securesystemslib, cryptography", "import tuf.ngclient, securesystemslib, cryptography"),
    ("prometheus_client, psutil, PIL, rich", "import prometheus_client, psutil, PIL.Image, rich"),
    ("agent.daemon (everything else the agent imports)", "import agent.cli, agent.daemon"),
    ("Silero VAD ONNX session", "s = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"),
)]
prev = rss()
for name, code in steps:
    t = time.perf_counter()
    exec(code)
    dt = time.perf_counter() - t
    now = rss()
    print(f"{name}\t{now - prev:.1f}\t{now:.1f}\t{dt * 1000:.0f}")
    prev = now
print("loaded modules\t" + " ".join(sorted({m.split('.')[0] for m in sys.modules})))
"""


def silero_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }


def memory(proc: psutil.Process) -> dict[str, float]:
    """RSS, USS and PSS in MB (USS/PSS 0 when smaps is not readable), and the RSS high-water mark."""
    out = {"rss": proc.memory_info().rss / MB, "uss": 0.0, "pss": 0.0, "hwm": 0.0}
    try:
        full = proc.memory_full_info()
        out["uss"], out["pss"] = full.uss / MB, getattr(full, "pss", 0) / MB
    except (psutil.AccessDenied, OSError):
        pass
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        out["hwm"] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        pass
    return out


def mapped_rss(pid: int, top: int = 12) -> list[tuple[str, float]]:
    """Resident MB per mapped file (shared libraries, the model) and for anonymous memory, from smaps."""
    sizes: dict[str, float] = {}
    name = "[anonymous]"
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            path = fields[5] if len(fields) > 5 else ""
            name = Path(path).name if path.startswith("/") else (path or "[anonymous]")
        elif fields[0] == "Rss:":
            sizes[name] = sizes.get(name, 0.0) + int(fields[1]) / 1024
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]


def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    """CPU time of the process (all threads) over ``seconds`` of wall time, in % of one core."""
    before = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / (time.monotonic() - t0)


class Run:
    """One agent process started with a NOTIFY_SOCKET, like systemd starts it."""

    def __init__(self, work: Path, models: Path, index: int) -> None:
        self.dir = work / f"run{index}"
        self.dir.mkdir()
        state = work / "state"  # one device, restarted: the runtime cache survives
        self.sock = self.dir / "agent.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.dir / "notify.sock"))
        self.notify.settimeout(60)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")}
        env.update(unit_environment())
        env.update(
            NOTIFY_SOCKET=str(self.dir / "notify.sock"),
            WATCHDOG_USEC="30000000",  # WatchdogSec=30
            EDGE_AGENT_AGENT__STATE_DIR=str(state),
            EDGE_AGENT_AGENT__RUNTIME_DIR=str(self.dir / "run"),
        )
        self.log = (self.dir / "agent.log").open("wb")
        cmd = [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--models-dir",
            str(models),
            "--socket",
            str(self.sock),
            "--log-format",
            "json",
        ]
        self.t0 = time.perf_counter()
        self.popen = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.proc = psutil.Process(self.popen.pid)
        self.ready_s = self._wait_ready()
        client = AgentClient(self.sock, timeout=30)
        client.infer("silero_vad", silero_feeds())
        self.first_infer_s = time.perf_counter() - self.t0
        client.close()

    def _wait_ready(self) -> float:
        while True:
            try:
                data = self.notify.recv(4096)
            except TimeoutError:
                raise SystemExit(f"no READY=1 within 60 s; log: {self.dir / 'agent.log'}") from None
            if b"READY=1" in data.split(b"\n"):
                return time.perf_counter() - self.t0

    def stop(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(30)
        self.notify.close()
        self.log.close()
        return code


def load(sock: Path, seconds: float) -> int:
    client = AgentClient(sock, timeout=30)
    feeds = silero_feeds()
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.infer("silero_vad", feeds)
        except ClientError as exc:
            raise SystemExit(f"infer failed under load: {exc}") from None
        n += 1
    client.close()
    return n


def scrape_ms(sock: Path, n: int = 50) -> tuple[float, float]:
    """Median and worst milliseconds of ``GET /metrics`` over ``n`` scrapes, one client."""
    client = AgentClient(sock, timeout=30)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        if client.request("GET", "/metrics")[0] != 200:
            raise SystemExit("GET /metrics failed")
        times.append(time.perf_counter() - t0)
    client.close()
    return statistics.median(times) * 1000, max(times) * 1000


def import_costs(model: Path) -> list[tuple[str, float, float, float]]:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_STEPS, str(model)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    rows = []
    for line in out.splitlines():
        name, *rest = line.split("\t")
        if name == "loaded modules":
            continue
        rows.append((name, *map(float, rest)))
    return rows  # type: ignore[return-value]


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else f"MISSED by {value - target:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="daemons to start (medians are over these)")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement per run")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after READY before measuring idle")
    ap.add_argument("--load", type=float, default=10.0, help="seconds of steady load (first run only)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-agent-footprint-"))
    try:
        models = work / "models"
        (models / "silero_vad" / "1").mkdir(parents=True)
        model = fetch("silero_vad")
        shutil.copyfile(model, models / "silero_vad" / "1" / "model.onnx")

        cold = Run(work, models, 0)  # the first start: also converts the model into the runtime cache
        time.sleep(args.settle)
        cold_mem = memory(cold.proc)
        cold_ready = cold.ready_s
        if cold.stop() != 0:
            raise SystemExit(f"agent failed; log: {cold.dir / 'agent.log'}")
        print(f"first start: READY {cold_ready:.2f} s, RSS {cold_mem['rss']:.1f} MB", file=sys.stderr)

        ready, first, idle_cpu, idle_mem = [], [], [], []
        loaded: dict[str, float] = {}
        mapped: list[tuple[str, float]] = []
        load_cpu = rps = scrape_med = scrape_max = 0.0
        for i in range(args.runs):
            run = Run(work, models, i + 1)
            ready.append(run.ready_s)
            first.append(run.first_infer_s)
            time.sleep(args.settle)
            idle_cpu.append(cpu_percent(run.proc, args.idle))
            idle_mem.append(memory(run.proc))
            if i == 0:
                before = run.proc.cpu_times()
                t0 = time.monotonic()
                n = load(run.sock, args.load)
                elapsed = time.monotonic() - t0
                after = run.proc.cpu_times()
                load_cpu = 100.0 * ((after.user - before.user) + (after.system - before.system)) / elapsed
                rps = n / elapsed
                loaded = memory(run.proc)
                mapped = mapped_rss(run.proc.pid)
                scrape_med, scrape_max = scrape_ms(run.sock)
            code = run.stop()
            if code != 0:
                raise SystemExit(f"agent exited with {code}; log: {run.dir / 'agent.log'}")
            print(
                f"run {i + 1}/{args.runs}: READY {run.ready_s:.2f} s, idle CPU {idle_cpu[-1]:.2f} %, "
                f"RSS {idle_mem[-1]['rss']:.1f} MB",
                file=sys.stderr,
            )

        med = {k: statistics.median(m[k] for m in idle_mem) for k in idle_mem[0]}
        ready_med, first_med, cpu_med = statistics.median(ready), statistics.median(first), statistics.median(idle_cpu)
        cores = os.cpu_count()
        print(
            f"\nedge-agent footprint, Silero VAD loaded (ONNX Runtime), {cores} CPU(s), Python "
            f"{sys.version.split()[0]}; median of {args.runs} restarts; unit environment: "
            f"{' '.join(f'{k}={v}' for k, v in unit_environment().items())}"
        )
        print(f"{'metric':<38}{'value':>12}  {'target':>8}  verdict")
        rows = [
            ("start-up: spawn -> READY=1 (s)", ready_med, TARGETS["ready_s"]),
            ("start-up: spawn -> first infer (s)", first_med, None),
            ("idle RSS (MB)", med["rss"], TARGETS["rss_mb"]),
            ("idle USS (MB, private to the agent)", med["uss"], None),
            ("idle PSS (MB)", med["pss"], None),
            ("peak RSS during start-up (MB, VmHWM)", med["hwm"], None),
            ("first start ever: READY (s)", cold_ready, None),
            ("first start ever: idle RSS (MB)", cold_mem["rss"], None),
            (f"idle CPU over {args.idle:g} s (% of one core)", cpu_med, TARGETS["idle_cpu_pct"]),
            (f"load: CPU, 1 client, {args.load:g} s (% of a core)", load_cpu, None),
            ("load: requests/s (v2 binary)", rps, None),
            ("load: RSS (MB)", loaded.get("rss", 0.0), None),
            ("GET /metrics, median of 50 (ms)", scrape_med, None),
            ("GET /metrics, worst of 50 (ms)", scrape_max, None),
        ]
        for name, value, target in rows:
            t = f"{target:>8g}" if target is not None else " " * 8
            v = verdict(value, target) if target is not None else ""
            print(f"{name:<38}{value:>12.2f}  {t}  {v}")
        print("anchors: AWS Greengrass nucleus 96 MB+ RAM plus a JVM; Azure IoT Edge system modules ~350 MB")
        print(
            f"READY runs (s): {' '.join(f'{r:.2f}' for r in ready)}; idle CPU runs (%): "
            f"{' '.join(f'{c:.2f}' for c in idle_cpu)}"
        )

        print(
            f"idle CPU resolution: one clock tick = {100 / os.sysconf('SC_CLK_TCK') / args.idle:.2f} % over "
            f"{args.idle:g} s"
        )

        print("\nWhere the agent's resident memory is, after the load (MB, from /proc/PID/smaps)")
        for name, mb in mapped:
            print(f"{name:<52}{mb:>8.1f}")

        print("\nWhere the memory goes: RSS of a fresh interpreter after each import (MB)")
        print(f"{'step':<52}{'+RSS':>8}{'RSS':>8}{'ms':>8}")
        for name, delta, total, ms in import_costs(model):
            print(f"{name:<52}{delta:>8.1f}{total:>8.1f}{ms:>8.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
