"""Fleet web console benchmarks: page times with a 1,000-device fleet, and event-to-screen latency.

    .venv/bin/python bench/fleet_console.py [--devices 1000] [--requests 300] [--events 100] [--db URL] [--no-browser]

Everything real on loopback: a mosquitto (tests/mqtt_broker.py), an ``edge-fleet server`` process (SQLite
unless ``--db`` names an empty PostgreSQL database), the fleet simulator's devices (telemetry every 10 s,
0.1 results/s each) and, for the latency, Debian's Chromium driven by Playwright.

1. Pages: a logged-in keep-alive client times each page (the overview, the devices table in several
   shapes, the fragment the live table refetches, a device page, a 1,000-device rollout), interleaved
   round by round, while the fleet keeps sending; reported as the client's wall time and the server's
   own ``Server-Timing`` (from the login check to the rendered page), p50 / p99. Target: p99 <= 150 ms
   for the overview and the devices page.
2. Event to screen: a rollout to every device (one wave; the simulated installs take ``--install-time``
   seconds, so the page keeps changing under the measurement) is open in Chromium; a probe device
   publishes one install step at a time and the page notes (MutationObserver, ``Date.now()``) when the
   probe's row shows it. Latency = that moment - the moment before the publish (one clock: one machine).
   Target: p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import sqlalchemy as sa
import structlog

from cloud_sync.fleet.server.auth import TokenStore
from cloud_sync.fleet.server.config import normalize_db_url
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings
from cloud_sync.mqtt.settings import BrokerSettings
from tests.fleet_env import RawDevice
from tests.mqtt_broker import make_broker

STEPS = ("downloading", "verified", "staged", "loaded", "tested", "swapped", "health")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Console:
    """A logged-in console client (the login form, as a browser does)."""

    def __init__(self, base: str, token: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=60)
        form = self.client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None
        r = self.client.post("/login", data={"csrf": csrf.group(1), "token": token, "next": "/"})
        assert r.status_code == 303, r.text

    def pages(self, pages: list[tuple[str, str]], n: int) -> None:
        """Each page ``n`` times, interleaved (one of each per round) so that load from elsewhere on the
        machine falls on every page alike."""
        for _name, path in pages:
            for _ in range(10):  # warm: templates compiled, connections in the pool
                self.client.get(path).raise_for_status()
        wall: dict[str, list[float]] = {path: [] for _, path in pages}
        server: dict[str, list[float]] = {path: [] for _, path in pages}
        size: dict[str, int] = {}
        for _ in range(n):
            for _name, path in pages:
                t = time.perf_counter()
                r = self.client.get(path)
                wall[path].append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                size[path] = len(r.content)
                timing = re.search(r"dur=([\d.]+)", r.headers.get("server-timing", ""))
                if timing:
                    server[path].append(float(timing.group(1)))
        for name, path in pages:
            w, s = wall[path], server[path]
            print(f"  {name:<44} wall p50 {pct(w, .5):6.1f} p99 {pct(w, .99):6.1f} ms   "
                  f"server p50 {pct(s, .5):6.1f} p99 {pct(s, .99):6.1f} ms  {size[path]:>8} bytes", flush=True)


def start_server(work: Path, broker_url: str, db: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET_")}
    env.update(STATE_DIRECTORY=str(work / "state"), EDGE_FLEET_SERVER__LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "server", "--broker", broker_url, "--db", db,
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=(work / "server.log").open("w"),
                            text=True, env=env)
    assert proc.stdout is not None
    base = proc.stdout.readline().split()[4].removesuffix("/api")
    proc.stdout.readline()
    while not httpx.get(f"{base}/api/health").json()["broker"]:
        time.sleep(0.05)
    return proc, base


def online(base: str, token: str) -> int:
    r = httpx.get(f"{base}/api/devices", params={"online": "true", "limit": 1000}, timeout=30,
                  headers={"Authorization": f"Bearer {token}"})
    items, nxt = r.json()["items"], r.json()["next"]
    count = len(items)
    while nxt:
        r = httpx.get(f"{base}/api/devices", params={"online": "true", "limit": 1000, "cursor": nxt}, timeout=30,
                      headers={"Authorization": f"Bearer {token}"})
        count += len(r.json()["items"])
        nxt = r.json()["next"]
    return count


class Stored:
    """When the probe's events are in the database (a reader of its own, polling every 5 ms): splits the
    latency into ingestion (MQTT, batching, commit) and the console (noticing, reading, drawing)."""

    def __init__(self, db_url: str) -> None:
        self.engine = sa.create_engine(normalize_db_url(db_url))
        self.at: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        q = sa.text("SELECT seq FROM events WHERE device_id = 'probe-0' ORDER BY id DESC LIMIT 5")
        while not self.stop.is_set():
            with self.engine.connect() as conn:
                now = time.time() * 1000
                for (seq,) in conn.execute(q):
                    self.at.setdefault(int(seq), now)
            self.stop.wait(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.engine.dispose()


def event_latency(base: str, token: str, broker_url: str, dep_id: str, probe: RawDevice, events: int,
                  stored: Stored) -> tuple[list[float], list[float]]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    args = [*(["--no-sandbox"] if os.geteuid() == 0 else []), "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    latencies: list[float] = []
    ingest: list[float] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        page = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base).new_page()
        page.goto("/login")
        page.fill("#token", token)
        page.click("#login-form button")
        page.wait_for_url(base + "/")
        page.goto(f"/deployments/{dep_id}")
        page.evaluate("""() => {
          window.shown = [];
          let last = null;
          const note = () => {
            const row = document.querySelector('tr[data-device="probe-0"]');
            if (row && row.dataset.state !== last) { last = row.dataset.state; shown.push([last, Date.now()]); }
          };
          new MutationObserver(note).observe(document.getElementById('rollout'), {subtree: true, childList: true});
          note();
        }""")
        for i in range(events):
            step = STEPS[i % len(STEPS)]
            seen = page.evaluate("shown.length")
            t0 = time.time() * 1000
            probe.publish("events", {"seq": 10 + i, "ts": time.time(), "type": f"deploy.{step}", "model": "vad",
                                     "version": 2})
            page.wait_for_function("([n, step]) => shown.length > n && shown[shown.length - 1][0] === step",
                                   arg=[seen, step], timeout=10_000)
            latencies.append(page.evaluate("shown[shown.length - 1][1]") - t0)
            if 10 + i in stored.at:
                ingest.append(stored.at[10 + i] - t0)
        browser.close()
    return latencies, ingest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--requests", type=int, default=300, help="per page")
    p.add_argument("--events", type=int, default=100, help="install steps the probe publishes")
    p.add_argument("--install-time", type=float, default=120.0, help="seconds each simulated install takes")
    p.add_argument("--db", help="an empty database (default: a new SQLite file)")
    p.add_argument("--no-browser", action="store_true", help="pages only")
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))  # the simulator's logs

    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
          f"({os.cpu_count()} CPUs)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="console-bench-"))
    broker = make_broker(work / "mosquitto")
    broker.start()
    db_url = args.db or f"sqlite:///{work / 'fleet.db'}"
    db = Database(normalize_db_url(db_url))
    db.migrate()
    tokens = {role: TokenStore(db).create(role, f"bench-{role}")[0] for role in ("viewer", "operator")}
    db.dispose()
    proc, base = start_server(work, broker.url, db_url)
    sim = FleetSimulator(SimulatorSettings(devices=args.devices, groups=("bench", *(f"g{i}" for i in range(3))),
                                           telemetry_interval_s=10.0, results_per_s=0.1, ramp_s=5.0,
                                           install_time_s=args.install_time, seed=1),
                         BrokerSettings(url=broker.url, backoff_min_s=0.5, backoff_max_s=5.0))
    probe = RawDevice(broker.url, "probe-0")
    try:
        t0 = time.monotonic()
        sim.start()
        probe.publish("state", {"online": True, "groups": ["bench"], "models": [{"name": "vad", "version": 1}]},
                      retain=True)
        while online(base, tokens["viewer"]) < args.devices + 1:
            time.sleep(0.5)
        print(f"{args.devices} simulated devices online in the service after {time.monotonic() - t0:.1f} s "
              f"({db.dialect}); letting telemetry accumulate 20 s", flush=True)
        time.sleep(20)
        console = Console(base, tokens["viewer"])
        n = args.requests
        print(f"console pages, {n} requests each, one keep-alive client, the fleet sending meanwhile:", flush=True)
        console.pages([("overview  /", "/"),
                       ("devices   /devices (page of 50, by id)", "/devices"),
                       ("devices   sorted by CPU, descending", "/devices?sort=cpu&dir=desc"),
                       ("devices   group + online filter", "/devices?group=g1&online=yes"),
                       ("devices   page 10 of 50", "/devices?page=10"),
                       ("devices   page of 200, sorted by last seen", "/devices?per_page=200&sort=last_seen&dir=desc"),
                       ("live refetch of the table  /ui/devices", "/ui/devices"),
                       ("overview fragment  /ui/overview", "/ui/overview"),
                       ("device page  /devices/sim-0005", "/devices/sim-0005"),
                       ("device plot data, 1 h", "/ui/devices/sim-0005/series?range=1h")], n)
        op = httpx.post(f"{base}/api/deployments", headers={"Authorization": f"Bearer {tokens['operator']}"},
                        json={"group": "bench", "model": "vad", "version": 2, "canary": "100%", "wave_timeout_s": 3600},
                        timeout=60)
        op.raise_for_status()
        dep_id = op.json()["id"]
        time.sleep(3)
        console.pages([(f"rollout page, {args.devices + 1} devices in one wave", f"/deployments/{dep_id}"),
                       ("rollout update (the live refetch, JSON)", f"/ui/deployments/{dep_id}")], max(20, n // 5))
        if not args.no_browser:
            print(f"event to screen: probe-0's install steps on the rollout page of {args.devices + 1} devices, "
                  f"while the simulated installs run ({args.events} events)", flush=True)
            stored = Stored(db_url)
            try:
                lat, ingest = event_latency(base, tokens["viewer"], broker.url, dep_id, probe, args.events, stored)
            finally:
                stored.close()
            for name, values in (("device event -> rollout page shows it", lat),
                                 ("  of which: -> in the database", ingest)):
                print(f"  {name:<40} p50 {pct(values, .5):6.0f} ms  p99 {pct(values, .99):6.0f} ms"
                      f"  max {max(values):6.0f} ms  ({len(values)} events)", flush=True)
        print(f"load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)
    finally:
        probe.close()
        sim.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        broker.stop()


if __name__ == "__main__":
    main()
