"""Fleet service benchmarks: ingestion rate end to end, the server's drain rate, API latency.

    .venv/bin/python bench/fleet_server.py ingest [--devices 10] [--per-device 5000] [--instances 1] [--db URL]
    .venv/bin/python bench/fleet_server.py drain [--messages 60000] [--db URL]
    .venv/bin/python bench/fleet_server.py api [--db URL]

Everything real on loopback: a mosquitto from tests/mqtt_broker.py, ``edge-fleet server`` processes,
devices built from the link's own pieces (``DeviceSession`` + ``Outbox``). ``--db`` defaults to a
fresh SQLite file; give an empty PostgreSQL database URL to measure PostgreSQL. bench/fleet.py runs
the same measurements (``run_ingest``, ``run_drain``, ``run_api``) in its tables, with medians.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from cloud_sync.fleet.server.config import normalize_db_url
from cloud_sync.mqtt.session import DeviceSession
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.mqtt.topics import Topics
from cloud_sync.outbox import Outbox
from tests.mqtt_broker import Broker, make_broker

RESULT = {"stream": "cam", "model": "faces@1", "detections": [{"box": [1, 2, 3, 4], "score": 0.9, "label": "face"}]}


def result_bytes() -> int:
    """Payload size of one benchmark result as a device sends it (with its seq and ts)."""
    return len(orjson.dumps({"seq": 123456, "ts": time.time(), **RESULT}))


class Env:
    """A throwaway mosquitto, database and token; ``start_server`` adds ``edge-fleet server`` processes."""

    def __init__(self, db: str | None, *, persistence: bool = False) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.broker: Broker = make_broker(self.work / "mosquitto", persistence=persistence)
        self.broker.start()
        self.db = db or f"sqlite:///{self.work / 'fleet.db'}"
        self.token = self.new_token("viewer")
        self.servers: list[tuple[subprocess.Popen[str], str]] = []

    def new_token(self, role: str) -> str:
        return self.cli("server", "--db", self.db, "token", "create", "--role", role).strip()

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "cloud_sync.fleet.cli", *args], capture_output=True, text=True,
                              check=True).stdout

    def start_server(self, name: str, client_id: str | None = None) -> str:
        env = dict(os.environ, STATE_DIRECTORY=str(self.work / name), EDGE_FLEET_SERVER__LOG_LEVEL="warning")
        if client_id:
            env["EDGE_FLEET_SERVER__CLIENT_ID"] = client_id
        proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "server", "--broker", self.broker.url,
                                 "--db", self.db, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                                stderr=(self.work / f"{name}.log").open("a"), text=True, env=env)
        assert proc.stdout is not None
        base = proc.stdout.readline().split()[4].removesuffix("/api")
        while not httpx.get(f"{base}/api/health").json()["broker"]:
            time.sleep(0.05)
        self.servers.append((proc, base))
        return base

    def stop_servers(self) -> None:
        for proc, _ in self.servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        self.servers.clear()

    def stored(self, counter: str = "stored") -> int:
        """Sum of an ingestion counter over the running servers (``acked``: messages committed)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return sum(httpx.get(f"{b}/api/ingest", headers=headers).json().get(counter, 0) for _, b in self.servers)

    def rows(self) -> tuple[int, int]:
        engine = sa.create_engine(normalize_db_url(self.db))
        with engine.connect() as conn:
            n, distinct = conn.execute(sa.text("SELECT count(*), count(DISTINCT device_id || ':' || seq) "
                                               "FROM results")).one()
        engine.dispose()
        return int(n), int(distinct)

    def close(self) -> None:
        self.stop_servers()
        self.broker.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def table_sizes(db: str, tables: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Rows and on-disk bytes (table + its indexes; PostgreSQL: + TOAST) of each table."""
    engine = sa.create_engine(normalize_db_url(db))
    out: dict[str, tuple[int, int]] = {}
    with engine.connect() as conn:
        for table in tables:
            rows = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            if engine.dialect.name == "postgresql":
                size = conn.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar_one()
            else:
                size = conn.execute(sa.text(
                    "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = :t OR name IN "
                    "(SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = :t)"),
                    {"t": table}).scalar_one()
            out[table] = (int(rows), int(size))
    engine.dispose()
    return out


def wait_stored(env: Env, total: int, t0: float, timeout: float = 600, counter: str = "stored") -> float:
    while env.stored(counter) < total:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timeout: {env.stored(counter)} of {total} {counter}")
        time.sleep(0.1)
    return time.monotonic() - t0


def run_ingest(db: str | None, devices: int, per_device: int, instances: int) -> dict[str, float]:
    """One end-to-end ingestion run: ``devices`` outboxes of ``per_device`` results each, started together."""
    env = Env(db)
    try:
        for i in range(instances):
            env.start_server(f"s{i}")
        sessions = []
        for d in range(devices):
            outbox = Outbox(env.work / f"dev{d}.db", max_messages=10**7, max_bytes=10**10)
            topic = Topics("edge/v1", f"dev{d}").results("cam")
            outbox.put_many([("result", topic, {"ts": time.time(), **RESULT}) for _ in range(per_device)])
            link = LinkSettings(device_id=f"dev{d}", broker=BrokerSettings(url=env.broker.url))
            sessions.append(DeviceSession(link, outbox))
        total = devices * per_device
        t0 = time.monotonic()
        for session in sessions:
            session.start()
        elapsed = wait_stored(env, total, t0)
        n, distinct = env.rows()
        for session in sessions:
            session.stop()
        rows, size = table_sizes(env.db, ("results",))["results"]
        return {"sent": total, "seconds": elapsed, "rate": total / elapsed, "rows": n, "distinct": distinct,
                "lost": total - distinct, "duplicated": n - distinct, "bytes_per_row": size / max(rows, 1)}
    finally:
        env.close()


def ingest(args: argparse.Namespace) -> None:
    r = run_ingest(args.db, args.devices, args.per_device, args.instances)
    print(f"ingest: {args.devices} devices x {args.per_device} results, {args.instances} instance(s), "
          f"{'postgresql' if args.db and args.db.startswith('postgres') else 'sqlite'}: {r['rate']:,.0f} "
          f"results/s stored end to end; rows {r['rows']}, distinct (device, seq) {r['distinct']}, "
          f"lost {r['lost']}")


def run_drain(db: str | None, queue: Callable[[Env], int]) -> dict[str, float]:
    """The server alone: ``queue(env)`` sends messages while the server is stopped (its persistent session
    keeps them) and returns how many; then the server starts and is timed until it has committed them all."""
    env = Env(db)
    try:
        env.start_server("s", client_id="bench-drain")
        env.stop_servers()  # its persistent session now collects what devices send
        total = queue(env)
        t0 = time.monotonic()
        env.start_server("s", client_id="bench-drain")
        started = time.monotonic() - t0
        elapsed = wait_stored(env, total, t0, counter="acked")
        return {"messages": total, "rate": total / elapsed, "start_s": started,
                "rate_after_start": total / (elapsed - started)}
    finally:
        env.close()


def queue_results(messages: int) -> Callable[[Env], int]:
    """``messages`` results of 10 devices, published with paho (QoS 1)."""
    def queue(env: Env) -> int:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub",
                             protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.connect(env.broker.host, env.broker.port)
        client.loop_start()
        infos = [client.publish(f"edge/v1/devices/dev{i % 10}/results/cam",
                                orjson.dumps({"seq": i // 10 + 1, "ts": time.time(), **RESULT}), qos=1)
                 for i in range(messages)]
        for info in infos:
            info.wait_for_publish(60)
        client.disconnect()
        client.loop_stop()
        return messages
    return queue


def drain(args: argparse.Namespace) -> None:
    r = run_drain(args.db, queue_results(args.messages))
    print(f"drain: {args.messages} results queued in the session: {r['rate']:,.0f} results/s "
          f"including start-up ({r['start_s']:.1f} s), {r['rate_after_start']:,.0f}/s after it")


#: (label, path, query parameters) of the API measurements; the seeded device ids are dev-0000 ... dev-0999.
API_CALLS: list[tuple[str, str, dict[str, object]]] = [
    ("GET /api/health", "/api/health", {}),
    ("devices, page of 100", "/api/devices", {"limit": 100}),
    ("devices, all 1,000 in one page", "/api/devices", {"limit": 1000}),
    ("devices, group + online filter", "/api/devices", {"group": "g3", "online": "true"}),
    ("one device", "/api/devices/dev-0005", {}),
    ("24 h telemetry series, 200 points", "/api/devices/dev-0005/telemetry",
     {"metric": "system.cpu_percent", "points": 200}),
]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1)."""
    return sorted_values[max(0, min(len(sorted_values) - 1, int(len(sorted_values) * q + 0.5) - 1))]


def run_api(db: str | None, n: int = 300) -> list[dict[str, object]]:
    """Seed 1,000 devices (20 with 24 h of telemetry every 60 s), start a server, time each call ``n`` times
    with one keep-alive client; returns one row per call: latencies (ms, sorted) and response bytes."""
    from cloud_sync.fleet.server.db import Database
    from cloud_sync.fleet.server.messages import Topics as Parser
    from cloud_sync.fleet.server.messages import parse
    from cloud_sync.fleet.server.store import Store

    env = Env(db)
    try:
        database = Database(env.db)
        database.migrate()
        store, topics, now = Store(database), Parser("edge/v1"), time.time()

        def rec(topic: str, body: object):
            return parse(topics, topic, orjson.dumps(body), received_at=now, max_bytes=1 << 20)

        store.write_batch([rec(f"edge/v1/devices/dev-{i:04d}/state", {
            "online": i % 3 != 0, "agent_version": "1.0", "profile": "rpi5", "groups": ["lab", f"g{i % 10}"],
            "models": [{"name": "faces", "version": 3, "runtime": "tflite", "delegate": "xnnpack"}],
            "health": {"cpu_percent": 5.0}}) for i in range(1000)], now)
        samples = [rec(f"edge/v1/devices/dev-{d:04d}/telemetry", {
            "seq": k + 1, "ts": now - 86400 + k * 60, "system": {"cpu_percent": float(k % 100)}})
            for d in range(20) for k in range(1440)]
        for i in range(0, len(samples), 2000):
            store.write_batch(samples[i:i + 2000], now)
        database.dispose()
        base = env.start_server("s")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {env.token}"})
        rows: list[dict[str, object]] = []
        for name, path, params in API_CALLS:
            for _ in range(20):
                client.get(path, params=params)  # type: ignore[arg-type]
            lat = []
            for _ in range(n):
                t = time.perf_counter()
                r = client.get(path, params=params)  # type: ignore[arg-type]
                lat.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
            rows.append({"name": name, "ms": sorted(lat), "bytes": len(r.content)})
        client.close()
        return rows
    finally:
        env.close()


def api(args: argparse.Namespace) -> None:
    print("api (1,000 devices; 20 with 24 h of telemetry every 60 s):")
    for row in run_api(args.db):
        lat: list[float] = row["ms"]  # type: ignore[assignment]
        print(f"  {row['name']:<40} p50 {percentile(lat, 0.5):6.1f} ms  p95 {percentile(lat, 0.95):6.1f} ms  "
              f"p99 {percentile(lat, 0.99):6.1f} ms  {row['bytes']:>7} bytes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    i = sub.add_parser("ingest")
    i.add_argument("--devices", type=int, default=10)
    i.add_argument("--per-device", type=int, default=5000)
    i.add_argument("--instances", type=int, default=1)
    d = sub.add_parser("drain")
    d.add_argument("--messages", type=int, default=60000)
    a = sub.add_parser("api")
    for parser in (i, d, a):
        parser.add_argument("--db", help="an empty database (default: a new SQLite file)")
    args = p.parse_args()
    {"ingest": ingest, "drain": drain, "api": api}[args.what](args)


if __name__ == "__main__":
    main()
