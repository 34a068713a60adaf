"""The fleet service at fleet scale: ingestion, 1,000 devices online, staged rollouts, API latency.

    .venv/bin/python bench/fleet.py [--runs 3] [--quick] [--sections ingest,scale,rollout,api,console] [--no-postgres]

Everything real on loopback: mosquitto (tests/mqtt_broker.py), ``edge-fleet server`` processes,
SQLite files and a throwaway PostgreSQL cluster (tests/pg_fixture.py ``pg_cluster(durable=True)``:
fsync on, commits not waiting for their WAL flush, the guarantee of SQLite's WAL with
synchronous=NORMAL), simulated devices from the project's simulator (``FleetSimulator``, in a
process of its own), devices' own outboxes (``DeviceSession`` + ``Outbox``). Sections:

- ingest: results stored per second end to end (device outbox -> mosquitto -> server -> committed
  rows), SQLite and PostgreSQL, 1 and 2 server instances, with lost and duplicated rows counted in
  the table (bench/fleet_server.py ``run_ingest``); then one server alone draining what its
  persistent session kept while it was stopped: results, and the telemetry and births of 1,000
  simulated devices (``run_drain``).
- scale: N simulated devices (default 1,000) and one server: time from the simulator's start until
  every device is online in the database, and from a broker restart (persistence on) until every
  device's state in the database is a birth sent after the restart; messages and bytes per device
  by topic in steady state.
- rollout: canary 1%, waves of 25%, abort threshold 5%, 1 s simulated install, to every device, on
  SQLite with one instance and on PostgreSQL with two: time to converge; then (SQLite) with a
  failure rate (default 10%), the wave where the rollout stopped and how many devices were
  contacted, checked against the simulator's own count; messages per device for one deploy; bytes
  per row of every table afterwards.
- api: p50/p99 of the devices list (a page, all 1,000) and a 24 h telemetry series downsampled
  (bench/fleet_server.py ``run_api``), on SQLite.
- console: the web console with the same N devices (bench/fleet_console.py, run as a child process
  so that its fleet is fresh): server time (Server-Timing) and client time of the overview, the
  devices page in several shapes, a device page and a rollout page, p50/p99; and the time from a
  device's install event to the rollout page in Chromium showing it (skipped without chromium).

Medians over ``--runs`` (each run on a fresh broker, database and simulator); the load average is
printed with every table. A full run takes about 15 minutes on 2 quiet vCPUs (24 minutes at a load
average of 10); ``--quick`` (one run, smaller ingestion) about 5. Docs: docs/capacity.md uses its
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson
import paho.mqtt.client as mqtt
import sqlalchemy as sa
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from bench.fleet_server import Env, percentile, queue_results, result_bytes, run_api, run_drain, run_ingest, table_sizes
from bench.sim_scale import cpu_s, rss_mb
from cloud_sync.fleet.server.config import normalize_db_url
from cloud_sync.mqtt.settings import BrokerSettings
from tests.pg_fixture import PgServer, pg_bin, pg_cluster

GROUP = "bench"
SIZE_TABLES = ("telemetry", "events", "results", "commands", "command_responses", "devices")


# -- output --------------------------------------------------------------------------------------------------------
def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table, the first column left-aligned and the others right-aligned."""
    cells = [[str(c) for c in header], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        line = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(line).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def spread(values: Sequence[float | None], unit: str = "") -> str:
    real = [v for v in values if v is not None]
    missing = len(values) - len(real)
    text = " ".join(_fmt(v) for v in real) + unit if real else ""
    return text + (f" ({missing} timed out)" if missing else "")


def verdict(value: float | None, target: float, *, at_least: bool = False) -> str:
    if value is None:
        return "MISSED (timed out)"
    return "ok" if (value >= target if at_least else value <= target) else "MISSED"


# -- a simulator in its own process ------------------------------------------------------------------------------
def _simulator_main(conn: Connection, url: str, options: dict[str, Any]) -> None:
    """Child process: one FleetSimulator, driven over ``conn`` ("start", "online", "stats", "stop")."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings

    # the CLI's reconnect defaults (edge-fleet simulate: --backoff-min 0.5 --backoff-max 10)
    sim = FleetSimulator(SimulatorSettings(**options), BrokerSettings(url=url, backoff_min_s=0.5, backoff_max_s=10.0))
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "start":
            started = time.monotonic()
            sim.start()
            conn.send(started)
        elif command == "online":
            conn.send(sim.online())
        elif command == "stats":
            conn.send({**sim.stats(), "rss_mb": rss_mb(), "cpu_s": cpu_s()})
        elif command == "stop":
            sim.stop()
            conn.send(sim.stats())
            return


class SimProcess:
    """``edge-fleet simulate`` as a library in a child process: the parent stays small (paho's select()
    loop and a console cannot share a process with a thousand sessions) and the CPU is its own."""

    def __init__(self, url: str, **options: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_simulator_main, args=(child, url, options), daemon=True, name="simulator")
        self.proc.start()
        self._call_ready()

    def _call_ready(self) -> None:
        if not self.conn.poll(60) or self.conn.recv() != "ready":
            raise RuntimeError("the simulator process did not start")

    def call(self, command: str, timeout: float = 60) -> Any:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"the simulator did not answer {command!r} within {timeout:g} s")
        return self.conn.recv()

    def start(self) -> float:
        """Start every device; returns ``time.monotonic()`` (one clock for all processes on Linux) of the call."""
        return float(self.call("start"))

    def stop(self) -> dict[str, Any]:
        try:
            return dict(self.call("stop", timeout=120))
        finally:
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()


# -- watching the broker and the database --------------------------------------------------------------------------
def topic_kind(topic: str) -> str:
    parts = topic.split("/")
    if len(parts) >= 4 and parts[2] == "devices":
        return parts[4] if len(parts) > 4 else "?"
    if len(parts) >= 4 and parts[2] == "console":
        return "responses (to the service)"
    return parts[2] if len(parts) > 2 else "?"


class Meter:
    """A subscriber to every topic under the prefix: live messages and payload/topic bytes per kind
    (retained copies sent on subscribe are not counted)."""

    def __init__(self, broker: Any) -> None:
        self.lock = threading.Lock()
        self.messages: Counter[str] = Counter()
        self.payload: Counter[str] = Counter()
        self.topic: Counter[str] = Counter()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"meter-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("edge/v1/#", qos=0)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            return
        kind = topic_kind(msg.topic)
        with self.lock:
            self.messages[kind] += 1
            self.payload[kind] += len(msg.payload)
            self.topic[kind] += len(msg.topic)

    def snapshot(self) -> tuple[Counter[str], Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.messages), Counter(self.payload), Counter(self.topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def since(meter: Meter, before: tuple[Counter[str], ...]) -> dict[str, tuple[int, int, int]]:
    """kind -> (messages, payload bytes, topic bytes) since ``before``."""
    now = meter.snapshot()
    return {k: (now[0][k] - before[0][k], now[1][k] - before[1][k], now[2][k] - before[2][k])
            for k in now[0] if now[0][k] - before[0][k]}


class FleetDb:
    """Read-only queries on the service's database, from the benchmark process."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(normalize_db_url(url))

    def online(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM devices WHERE online")).scalar_one())

    def born_after(self, wall: float) -> int:
        """Devices online whose stored state is a birth the device sent after ``wall`` (time.time())."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT state FROM devices WHERE online AND state_at >= :t"), {"t": wall})
            return sum(1 for (state,) in rows if _ts(state) >= wall)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()

    def close(self) -> None:
        self.engine.dispose()


def _ts(state: Any) -> float:
    value = orjson.loads(state) if isinstance(state, (str, bytes)) else state
    return float((value or {}).get("ts") or 0.0)


def wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` holds (polled), or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


# -- ingest ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def pg_database(pg: PgServer | None) -> Iterator[str | None]:
    """A new, empty database in the cluster (dropped afterwards); None without a cluster."""
    if pg is None:
        yield None
        return
    with pg.database("bench") as url:
        yield url


def section_ingest(args: argparse.Namespace, pg: PgServer | None) -> dict[str, Any]:
    print(f"\n== ingest: {args.ingest_devices} device outboxes x {args.per_device} results each, started together; "
          f"{args.runs} run(s) per configuration; {load()}")
    configs = [("SQLite", 1), ("SQLite", 2)] + ([("PostgreSQL", 1), ("PostgreSQL", 2)] if pg else [])
    rows, out = [], {}
    for backend, instances in configs:
        runs = []
        for _ in range(args.runs):
            with pg_database(pg if backend == "PostgreSQL" else None) as db:
                runs.append(run_ingest(db, args.ingest_devices, args.per_device, instances))
        rates = [r["rate"] for r in runs]
        key = f"{backend}, {instances} instance{'s' if instances > 1 else ''}"
        out[key] = runs
        rows.append([key, median(rates), spread(rates), sum(int(r["lost"]) for r in runs),
                     sum(int(r["duplicated"]) for r in runs), median([r["bytes_per_row"] for r in runs]),
                     verdict(median(rates), 5000, at_least=True) if backend == "SQLite" and instances == 1 else ""])
    table(f"Ingestion, results/s stored end to end (median of {args.runs}); result payload {result_bytes()} bytes; "
          f"{load()}",
          ["configuration", "results/s", "runs", "lost", "duplicated", "bytes/row", "target >= 5,000/s"], rows)
    section_drain(args, pg)
    return out


def queue_fleet(args: argparse.Namespace, mix: Counter[str]) -> Callable[[Env], int]:
    """What ``args.devices`` simulated devices send in ``args.drain_seconds`` (telemetry every
    ``args.drain_interval`` s, the birth republished with each), then their offline states; counted into ``mix``."""
    def queue(env: Env) -> int:
        meter = Meter(env.broker)
        sim = SimProcess(env.broker.url, devices=args.devices, groups=(GROUP,), seed=1,
                         telemetry_interval_s=args.drain_interval)
        sim.start()
        time.sleep(args.drain_seconds)
        sim.stop()
        time.sleep(0.5)
        sent = meter.snapshot()[0]
        meter.close()
        mix.clear()
        mix.update({k: sent[k] for k in ("state", "telemetry", "events", "results")})
        # the server subscribes again when it starts, and the broker then sends every retained state once more
        return sum(mix.values()) + args.devices
    return queue


def section_drain(args: argparse.Namespace, pg: PgServer | None) -> None:
    """One server alone, catching up with what its persistent session kept while it was stopped."""
    backends = ["SQLite"] + (["PostgreSQL"] if pg else [])
    rows = []
    mix: Counter[str] = Counter()
    for what, queue in (("results, 10 devices", queue_results(args.drain_results)),
                        (f"telemetry + births, {args.devices} devices", queue_fleet(args, mix))):
        for backend in backends:
            runs = []
            for _ in range(args.runs):
                with pg_database(pg if backend == "PostgreSQL" else None) as db:
                    runs.append(run_drain(db, queue))
            rates = [r["rate_after_start"] for r in runs]
            rows.append([f"{what}, {backend}", int(runs[0]["messages"]), median(rates), spread(rates),
                         median([r["start_s"] for r in runs])])
    table(f"One server alone draining its session, messages/s committed after its start (median of {args.runs}); "
          f"{load()}", ["queued", "messages", "messages/s", "runs", "start-up s"], rows)
    print(f"fleet mix queued: {dict(mix)} + {args.devices} retained states sent again on subscribe; telemetry "
          f"every {args.drain_interval:g} s for {args.drain_seconds:g} s")


# -- scale ----------------------------------------------------------------------------------------------------
def _sim_options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {"devices": args.devices, "groups": (GROUP,), "telemetry_interval_s": args.telemetry_interval,
            "install_time_s": 1.0, "seed": 1, **extra}


def scale_run(args: argparse.Namespace) -> dict[str, Any]:
    env = Env(None, persistence=True)
    sim = None
    db = FleetDb(env.db)
    try:
        env.start_server("s")
        sim = SimProcess(env.broker.url, **_sim_options(args))
        meter = Meter(env.broker)
        n = args.devices
        t0 = sim.start()
        online = wait(lambda: db.online() >= n, 120)
        online_s = online and time.monotonic() - t0
        # steady state: what each device sends per telemetry interval
        time.sleep(2.0)
        before, w0 = meter.snapshot(), time.monotonic()
        time.sleep(args.window)
        traffic, window = since(meter, before), time.monotonic() - w0
        idle = sim.call("stats")
        # broker restart (persistence on: the retained births survive it; only newer ones count)
        wall, t1 = time.time(), time.monotonic()
        env.broker.restart()
        restarted_s = time.monotonic() - t1
        back = wait(lambda: db.born_after(wall) >= n, 120)
        back_s = back and time.monotonic() - t1
        meter.close()
        stats = sim.stop()
        sim = None
        return {"online_s": online_s, "back_s": back_s, "broker_restart_s": restarted_s,
                "reconnects": stats["reconnects"], "traffic": traffic, "window_s": window,
                "sim_rss_mb": idle["rss_mb"]}
    finally:
        if sim is not None:
            sim.stop()
        db.close()
        env.close()


def section_scale(args: argparse.Namespace) -> None:
    print(f"\n== scale: {args.devices} simulated devices (one process), one server (SQLite), mosquitto with "
          f"persistence; telemetry every {args.telemetry_interval:g} s; {args.runs} run(s); {load()}")
    runs = [scale_run(args) for _ in range(args.runs)]
    online = [r["online_s"] for r in runs]
    back = [r["back_s"] for r in runs]
    table(f"{args.devices} devices online in the database (seconds, median of {args.runs}); {load()}",
          ["measure", "median s", "runs", "target", "verdict"], [
              ["after the simulator starts", median(online), spread(online), "30 s", verdict(median(online), 30)],
              ["after a broker restart (a new birth stored)", median(back), spread(back), "30 s",
               verdict(median(back), 30)],
              ["  of which the broker's own restart", median([r["broker_restart_s"] for r in runs]), "", "", ""],
          ])
    print(f"reconnects per run: {' '.join(str(r['reconnects']) for r in runs)}; "
          f"simulator RSS {median([r['sim_rss_mb'] for r in runs]):.0f} MB")
    per_device_rates(args, runs[-1])


def per_device_rates(args: argparse.Namespace, run: dict[str, Any]) -> None:
    n, window = args.devices, run["window_s"]
    rows = []
    for kind, (messages, payload, topic) in sorted(run["traffic"].items()):
        per_hour = messages / n / window * 3600
        rows.append([kind, messages, per_hour, payload / messages, topic / messages,
                     per_hour * (payload + topic) / messages / 1024])
    table(f"Traffic per device, steady state ({window:.0f} s window, {n} devices, telemetry every "
          f"{args.telemetry_interval:g} s; the birth is republished with each telemetry sample)",
          ["topic", "messages", "per device per hour", "payload bytes", "topic bytes", "KiB per device per hour"],
          rows)


# -- rollout ----------------------------------------------------------------------------------------------------
def rollout_run(args: argparse.Namespace, failure_rate: float, db_url: str | None = None,
                instances: int = 1) -> dict[str, Any]:
    """One rollout to every simulated device (created on the last instance); the tables' sizes afterwards."""
    env = Env(db_url)
    sim = None
    db = FleetDb(env.db)
    try:
        base = [env.start_server(f"s{i}") for i in range(instances)][-1]
        headers = {"Authorization": f"Bearer {env.new_token('operator')}"}
        sim = SimProcess(env.broker.url, **_sim_options(args, failure_rate=failure_rate, seed=None))
        n = args.devices
        sim.start()
        if wait(lambda: db.online() >= n, 120) is None:
            raise RuntimeError(f"only {db.online()} of {n} devices online")
        meter = Meter(env.broker)
        before = meter.snapshot()
        client = httpx.Client(base_url=base, headers=headers, timeout=30)
        body = {"model": "silero-vad", "version": 2, "group": GROUP, "canary": "1%", "wave_size": "25%",
                "abort_threshold": "5%", "wave_timeout_s": args.wave_timeout}
        t0 = time.monotonic()
        created = client.post("/api/deployments", json=body)
        created.raise_for_status()
        dep_id = created.json()["id"]

        def finished() -> bool:
            r = client.get("/api/deployments", params={"limit": 1})
            return r.json()["items"][0]["status"] != "running"

        done = wait(finished, args.wave_timeout * 6 + 60, interval=0.2)
        observed = done and time.monotonic() - t0
        dep = client.get(f"/api/deployments/{dep_id}").json()
        client.close()
        time.sleep(1.0)  # the last births and events
        traffic = since(meter, before)
        meter.close()
        stats = sim.stop()
        sim = None
        new_models = db.scalar("SELECT count(*) FROM device_models WHERE name = 'silero-vad' AND version = 2")
        env.stop_servers()
        return {"dep": dep, "observed_s": observed, "sim": stats, "traffic": traffic, "new_models": new_models,
                "sizes": table_sizes(env.db, SIZE_TABLES)}
    finally:
        if sim is not None:
            sim.stop()
        db.close()
        env.close()


def waves(dep: dict[str, Any]) -> list[dict[str, Any]]:
    """Per wave: devices, outcome counts, first send and last final answer (service clock)."""
    out: list[dict[str, Any]] = []
    for w in range(dep["waves"]):
        devs = [d for d in dep["devices"] if d["wave"] == w]
        sent = [d["sent_at"] for d in devs if d["sent_at"]]
        ends = [d["finished_at"] for d in devs if d["finished_at"]]
        out.append({"wave": w + 1, "devices": len(devs), "statuses": Counter(d["status"] for d in devs),
                    "first_sent": min(sent) if sent else None, "last_final": max(ends) if ends else None})
    return out


def section_rollout(args: argparse.Namespace, pg: PgServer | None) -> dict[str, Any]:
    n = args.devices
    print(f"\n== rollout: {n} simulated devices, canary 1%, waves of 25%, abort threshold 5%, 1 s install, "
          f"wave timeout {args.wave_timeout:g} s; {args.runs} run(s) per configuration; {load()}")
    configs = [("SQLite", 1)] + ([("PostgreSQL", 2)] if pg else [])
    out: dict[str, Any] = {}
    rows = []
    for backend, instances in configs:
        key = f"{backend}, {instances} instance{'s' if instances > 1 else ''}"
        runs = []
        for _ in range(args.runs):
            with pg_database(pg if backend == "PostgreSQL" else None) as url:
                runs.append(rollout_run(args, 0.0, url, instances))
        out[key] = runs
        converge = [(r["dep"]["finished_at"] - r["dep"]["created_at"]) if r["dep"]["status"] == "succeeded"
                    else None for r in runs]
        for r, c in zip(runs, converge, strict=True):
            dep, sim = r["dep"], r["sim"]
            rows.append([key, dep["status"], c, r["observed_s"], dep["counts"]["succeeded"], sim["commands"],
                         sim["deploys_committed"], r["new_models"], verdict(c, 60)])
        middle = sorted(range(len(runs)), key=lambda i: converge[i] or 1e9)[len(runs) // 2]
        start = runs[middle]["dep"]["created_at"]
        table(f"Waves, {key}, median run (seconds since the deployment was created)",
              ["wave", "devices", "first command sent", "last final answer", "succeeded"],
              [[w["wave"], w["devices"], (w["first_sent"] or start) - start, (w["last_final"] or start) - start,
                w["statuses"]["succeeded"]] for w in waves(runs[middle]["dep"])])
    table(f"Rollout to {n} devices, no failures (one row per run); {load()}",
          ["configuration", "status", "converged s (service)", "seen by a client s", "succeeded",
           "commands at devices", "committed at devices", "new model in births", "target 60 s"], rows)
    first = out["SQLite, 1 instance"]
    deploy_traffic(n, first[len(first) // 2]["traffic"])

    aborts = [rollout_run(args, args.failure_rate) for _ in range(args.runs)]  # SQLite, one instance
    rows = []
    for r in aborts:
        dep, sim = r["dep"], r["sim"]
        per_wave = waves(dep)
        stop = dep["current_wave"]
        contacted = sum(1 for d in dep["devices"] if d["sent_at"] is not None)
        planned = sum(w["devices"] for w in per_wave[:stop + 1])
        failed = per_wave[stop]["statuses"]["failed"] + per_wave[stop]["statuses"]["timeout"]
        earlier_ok = all(w["statuses"]["failed"] + w["statuses"]["timeout"] < _threshold(w["devices"])
                         for w in per_wave[:stop])
        ok = (dep["status"] == "aborted" and contacted == planned == sim["commands"] and earlier_ok
              and failed >= _threshold(per_wave[stop]["devices"]) and dep["counts"]["skipped"] == n - planned)
        rows.append([dep["status"], f"{stop + 1} of {dep['waves']}", f"{failed} of {per_wave[stop]['devices']}",
                     _threshold(per_wave[stop]["devices"]), contacted, sim["commands"], dep["counts"]["skipped"],
                     "ok" if ok else "WRONG"])
    table(f"Abort threshold: {args.failure_rate:.0%} of installs fail (one row per run); {load()}",
          ["status", "stopped at wave", "failed in that wave", "threshold", "contacted (service)",
           "commands at devices", "skipped", "verdict"], rows)
    out["aborts"] = aborts
    return out


def _threshold(wave_devices: int) -> int:
    from cloud_sync.fleet.server.rollouts import amount

    return amount("5%", wave_devices, field="abort_threshold", minimum=1)


def deploy_traffic(n: int, traffic: dict[str, tuple[int, int, int]]) -> None:
    rows = [[kind, messages / n, payload / messages, (payload + topic) / n / 1024]
            for kind, (messages, payload, topic) in sorted(traffic.items())]
    table("Traffic per device during the rollout (a deploy of a 1 s install, with background telemetry)",
          ["topic", "messages per device", "payload bytes", "KiB per device"], rows)


# -- storage -----------------------------------------------------------------------------------------------------
def section_storage(rollout: dict[str, Any] | None, ingest: dict[str, Any] | None) -> None:
    """Bytes per row on disk, from the first rollout run of each backend and the ingestion runs."""
    lite = rollout["SQLite, 1 instance"][0]["sizes"] if rollout else {}
    pgs = rollout["PostgreSQL, 2 instances"][0]["sizes"] if rollout and "PostgreSQL, 2 instances" in rollout else {}
    rows: list[list[object]] = [[name, lite.get(name, (0, 0))[0], _per_row(lite.get(name)), _per_row(pgs.get(name))]
                                for name in SIZE_TABLES if name in lite]
    if ingest:
        lite_runs = ingest.get("SQLite, 1 instance", [])
        pg_runs = ingest.get("PostgreSQL, 1 instance", [])
        rows.append(["results (ingest run)", int(lite_runs[0]["rows"]) if lite_runs else 0,
                     median([r["bytes_per_row"] for r in lite_runs]) or "-",
                     median([r["bytes_per_row"] for r in pg_runs]) or "-"])
    table("Storage: bytes per row on disk, table + indexes (PostgreSQL: + TOAST), after a rollout run (devices on "
          "PostgreSQL: with the dead row versions its updates leave until vacuumed)",
          ["table", "rows", "SQLite bytes/row", "PostgreSQL bytes/row"], rows)


def _per_row(size: tuple[int, int] | None) -> object:
    return size[1] / size[0] if size and size[0] else "-"


# -- api ----------------------------------------------------------------------------------------------------
def section_api(args: argparse.Namespace) -> None:
    print(f"\n== api: SQLite, 1,000 devices, 20 with 24 h of telemetry every 60 s; {args.api_calls} calls per "
          f"endpoint per run, one keep-alive client; {args.runs} run(s); {load()}")
    runs = [run_api(None, args.api_calls) for _ in range(args.runs)]
    rows = []
    for i, first in enumerate(runs[0]):
        p50 = median([percentile(r[i]["ms"], 0.5) for r in runs])  # type: ignore[arg-type]
        p99s = [percentile(r[i]["ms"], 0.99) for r in runs]  # type: ignore[arg-type]
        p99 = median(p99s)
        rows.append([first["name"], p50, median([percentile(r[i]["ms"], 0.95) for r in runs]),  # type: ignore[arg-type]
                     p99, spread(p99s), first["bytes"], verdict(p99, 100) if i in (1, 2, 5) else ""])
    table(f"API latency, ms (median of {args.runs} runs); {load()}",
          ["request", "p50", "p95", "p99", "p99 runs", "bytes", "target p99 <= 100 ms"], rows)


def section_console(args: argparse.Namespace) -> None:
    """bench/fleet_console.py in a child process: its own broker, service and fleet of ``--devices``."""
    browser = shutil.which("chromium") is not None
    print(f"\n== console: {args.devices} simulated devices, SQLite, {args.api_calls} requests per page"
          f"{'' if browser else ' (no chromium: pages only)'}; {load()}", flush=True)
    command = [sys.executable, str(Path(__file__).with_name("fleet_console.py")), "--devices", str(args.devices),
               "--requests", str(args.api_calls), "--events", "30" if args.quick else "100",
               *([] if browser else ["--no-browser"])]
    subprocess.run(command, check=True)


# -- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (fresh everything each), default 3")
    p.add_argument("--quick", action="store_true", help="one run, smaller ingestion, fewer API calls")
    p.add_argument("--sections", default="ingest,scale,rollout,api,console", help="comma-separated subset")
    p.add_argument("--devices", type=int, default=1000, help="simulated devices for scale and rollout")
    p.add_argument("--ingest-devices", type=int, default=10)
    p.add_argument("--per-device", type=int, default=5000, help="results per device outbox (ingest)")
    p.add_argument("--telemetry-interval", type=float, default=10.0,
                   help="simulated devices' telemetry interval in s (a device's default is 60)")
    p.add_argument("--window", type=float, default=30.0, help="seconds of steady-state traffic measured")
    p.add_argument("--failure-rate", type=float, default=0.10, help="install failure rate of the abort runs")
    p.add_argument("--wave-timeout", type=float, default=60.0, help="wave_timeout_s of the rollouts")
    p.add_argument("--api-calls", type=int, default=300, help="calls per endpoint per run")
    p.add_argument("--drain-results", type=int, default=60000, help="results queued for the drain measurement")
    p.add_argument("--drain-seconds", type=float, default=20.0, help="seconds of simulated traffic queued")
    p.add_argument("--drain-interval", type=float, default=2.0, help="telemetry interval of that traffic")
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = p.parse_args()
    if args.quick:
        args.runs, args.per_device, args.api_calls, args.window = 1, 2000, 200, 15.0
        args.drain_results, args.drain_seconds = 20000, 10.0
    sections = set(args.sections.split(","))
    unknown = sections - {"ingest", "scale", "rollout", "api", "console"}
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    use_pg = not args.no_postgres and pg_bin() is not None and bool(sections & {"ingest", "rollout"})
    print(f"bench/fleet.py {' '.join(sys.argv[1:])}: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {mosquitto.strip()}, PostgreSQL "
          f"{pg_bin().parts[-2] if use_pg else 'not used'}; {load()}")  # type: ignore[union-attr]
    started = time.monotonic()
    with pg_cluster(durable=True) if use_pg else contextlib.nullcontext() as pg:
        ingest = section_ingest(args, pg) if "ingest" in sections else None
        if "scale" in sections:
            section_scale(args)
        rollout = section_rollout(args, pg) if "rollout" in sections else None
        if "api" in sections:
            section_api(args)
        if rollout or ingest:
            section_storage(rollout, ingest)
    if "console" in sections:
        section_console(args)
    print(f"\ntotal {time.monotonic() - started:.0f} s; {load()}")


if __name__ == "__main__":
    main()
