"""How far one process of simulated devices goes on one local mosquitto.

Starts a throwaway mosquitto (tests/mqtt_broker.py), then for each configuration: starts N
simulated devices, measures the time until every session has its CONNACK and until a console
has seen every device's online birth, the process RSS, thread count and idle CPU; then
restarts the broker and measures the time until every device is connected again and every
birth is retained again. Run::

    .venv/bin/python bench/sim_scale.py [--devices 1000] [--idle 10] [--skip-threads]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_sync.fleet.console import FleetClient
from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings
from cloud_sync.mqtt.settings import BrokerSettings
from tests.mqtt_broker import make_broker


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _births(url: str, n: int, timeout: float, ready: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    with FleetClient(BrokerSettings(url=url)) as client:
        client.subscribe(["edge/v1/devices/+/state"])
        ready.set()
        online: set[str] = set()
        for msg in client.messages(timeout):
            body = msg.json()
            device = msg.topic.split("/")[-2]
            if isinstance(body, dict) and body.get("online"):
                online.add(device)
            else:
                online.discard(device)
            if len(online) >= n:
                out.put(time.monotonic())
                return
    out.put(None)


class BirthWatcher:
    """A console in its own process (paho's select() loop cannot live beside 1,000+ descriptors)."""

    def __init__(self, url: str, n: int, timeout: float = 60) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.out = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_births, args=(url, n, timeout, self.ready, self.out), daemon=True)
        self.proc.start()
        self.ready.wait(30)

    def done_at(self) -> float | None:
        """time.monotonic() (same clock across processes on Linux) when all births were seen."""
        value = self.out.get(timeout=90)
        self.proc.join(10)
        return value


def wait_all(sim: FleetSimulator, n: int, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if sim.online() >= n:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def run(url: str, broker: _Restarter, n: int, driver: str, outbox_dir: Path | None, idle: float) -> dict[str, object]:
    settings = SimulatorSettings(devices=n, driver=driver, outbox_dir=outbox_dir, telemetry_interval_s=10.0,
                                 groups=("bench",), seed=1)
    sim = FleetSimulator(settings, BrokerSettings(url=url, backoff_max_s=10.0))
    watcher = BirthWatcher(url, n)
    t0 = time.monotonic()
    sim.start()
    started = time.monotonic() - t0
    connected = wait_all(sim, n, 60)
    connected = connected and time.monotonic() - t0
    done = watcher.done_at()
    births = done - t0 if done else None
    time.sleep(2)
    c0, w0 = cpu_s(), time.monotonic()
    time.sleep(idle)
    idle_cpu = (cpu_s() - c0) / (time.monotonic() - w0) * 100
    result: dict[str, object] = {
        "driver": driver, "outbox": "file" if outbox_dir else "memory", "devices": n,
        "start() s": round(started, 2), "all connected s": connected and round(connected, 2),
        "all births seen s": births and round(births, 2), "RSS MB": round(rss_mb(), 1),
        "threads": threading.active_count(), "idle CPU %": round(idle_cpu, 1)}
    broker.restart()
    t1 = time.monotonic()
    while sim.online() >= n and time.monotonic() - t1 < 10:
        time.sleep(0.01)  # until the devices noticed
    back = wait_all(sim, n, 60)
    result["restart: all connected s"] = back and round(time.monotonic() - t1, 2)
    again = BirthWatcher(url, n).done_at()  # retained births, read after everyone is back
    result["restart: all births s"] = again and round(again - t1, 2)
    result["reconnects"] = sim.stats()["reconnects"]
    t2 = time.monotonic()
    sim.stop()
    result["stop() s"] = round(time.monotonic() - t2, 2)
    return result


def one(spec: str, url: str, idle: float) -> None:
    """Child process: one configuration against the parent's broker; prints a JSON row."""
    import json

    from tests.mqtt_broker import Broker

    driver, outbox, devices, port, workdir = spec.split(":", 4)
    broker = Broker(host="127.0.0.1", port=int(port), workdir=Path(workdir), tls=None,
                    config=Path(workdir) / "mosquitto.conf")
    with tempfile.TemporaryDirectory(prefix="sim-outboxes-") as tmp:
        row = run(url, _Restarter(broker), int(devices), driver, Path(tmp) if outbox == "file" else None, idle)
    print(json.dumps(row), flush=True)


class _Restarter:
    """The child restarts the parent's mosquitto through a signal file (the parent owns the process)."""

    def __init__(self, broker: object) -> None:
        self.workdir = Path(broker.workdir)  # type: ignore[attr-defined]

    def restart(self) -> None:
        flag = self.workdir / "restart-please"
        flag.write_text("1")
        while flag.exists():
            time.sleep(0.01)


def main() -> None:
    import json
    import subprocess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    p.add_argument("--skip-threads", action="store_true", help="skip the threads-driver comparison (300 devices)")
    p.add_argument("--skip-files", action="store_true", help="skip the file-outbox comparison")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    if args.one:
        one(args.one, args.url, args.idle)
        return
    configs = [("hub", "memory", args.devices)]
    if not args.skip_files:
        configs.append(("hub", "file", args.devices))
    if not args.skip_threads:
        configs += [("threads", "memory", 300), ("hub", "memory", 300)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as tmp:
        broker = make_broker(Path(tmp) / "mosquitto")
        broker.start()
        try:
            for driver, outbox, n in configs:
                spec = f"{driver}:{outbox}:{n}:{broker.port}:{broker.workdir}"
                child = subprocess.Popen([sys.executable, __file__, "--one", spec, "--url", broker.url,
                                          "--idle", str(args.idle)], stdout=subprocess.PIPE, text=True)
                flag = broker.workdir / "restart-please"
                while child.poll() is None:  # each run in its own process: RSS and threads are its own
                    if flag.exists():
                        broker.restart()
                        flag.unlink()
                    time.sleep(0.01)
                rows.append(json.loads(child.stdout.read().strip().splitlines()[-1]))  # type: ignore[union-attr]
        finally:
            broker.stop()
    keys = list(rows[0])
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
