"""Fleet service benchmarks: ingestion rate end to end, the server's drain rate, API latency.

    .venv/bin/python bench/fleet_server.py ingest [--devices 10] [--per-device 5000] [--instances 1] [--db URL]
    .venv/bin/python bench/fleet_server.py drain [--messages 60000] [--db URL]
    .venv/bin/python bench/fleet_server.py api [--db URL]

Everything real on loopback: a mosquitto from tests/mqtt_broker.py, ``edge-fleet server`` processes,
devices built from the link's own pieces (``DeviceSession`` + ``Outbox``). ``--db`` defaults to a
fresh SQLite file; give an empty PostgreSQL database URL to measure PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
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


class Env:
    def __init__(self, db: str | None) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.broker: Broker = make_broker(self.work / "mosquitto")
        self.broker.start()
        self.db = db or f"sqlite:///{self.work / 'fleet.db'}"
        self.token = self.cli("server", "--db", self.db, "token", "create", "--role", "viewer").strip()
        self.servers: list[tuple[subprocess.Popen[str], str]] = []

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

    def stored(self) -> int:
        headers = {"Authorization": f"Bearer {self.token}"}
        return sum(httpx.get(f"{b}/api/ingest", headers=headers).json().get("stored", 0) for _, b in self.servers)

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


def wait_stored(env: Env, total: int, t0: float, timeout: float = 600) -> float:
    while env.stored() < total:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timeout: {env.stored()} of {total} stored")
        time.sleep(0.1)
    return time.monotonic() - t0


def ingest(args: argparse.Namespace) -> None:
    env = Env(args.db)
    try:
        for i in range(args.instances):
            env.start_server(f"s{i}")
        sessions = []
        for d in range(args.devices):
            outbox = Outbox(env.work / f"dev{d}.db", max_messages=10**7, max_bytes=10**10)
            topic = Topics("edge/v1", f"dev{d}").results("cam")
            outbox.put_many([("result", topic, {"ts": time.time(), **RESULT}) for _ in range(args.per_device)])
            link = LinkSettings(device_id=f"dev{d}", broker=BrokerSettings(url=env.broker.url))
            sessions.append(DeviceSession(link, outbox))
        total = args.devices * args.per_device
        t0 = time.monotonic()
        for session in sessions:
            session.start()
        elapsed = wait_stored(env, total, t0)
        n, distinct = env.rows()
        print(f"ingest: {args.devices} devices x {args.per_device} results, {args.instances} instance(s), "
              f"{'postgresql' if env.db.startswith('postgres') else 'sqlite'}: {total / elapsed:,.0f} results/s "
              f"stored end to end; rows {n}, distinct (device, seq) {distinct}, lost {total - distinct}")
        for session in sessions:
            session.stop()
    finally:
        env.close()


def drain(args: argparse.Namespace) -> None:
    env = Env(args.db)
    try:
        env.start_server("s", client_id="bench-drain")
        env.stop_servers()  # its persistent session now collects what devices send
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub",
                             protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.connect(env.broker.host, env.broker.port)
        client.loop_start()
        infos = [client.publish(f"edge/v1/devices/dev{i % 10}/results/cam",
                                orjson.dumps({"seq": i // 10 + 1, "ts": time.time(), **RESULT}), qos=1)
                 for i in range(args.messages)]
        for info in infos:
            info.wait_for_publish(60)
        client.disconnect()
        client.loop_stop()
        t0 = time.monotonic()
        env.start_server("s", client_id="bench-drain")
        started = time.monotonic() - t0
        elapsed = wait_stored(env, args.messages, t0)
        print(f"drain: {args.messages} results queued in the session: {args.messages / elapsed:,.0f} results/s "
              f"including start-up ({started:.1f} s), {args.messages / (elapsed - started):,.0f}/s after it")
    finally:
        env.close()


def api(args: argparse.Namespace) -> None:
    from cloud_sync.fleet.server.db import Database
    from cloud_sync.fleet.server.messages import Topics as Parser
    from cloud_sync.fleet.server.messages import parse
    from cloud_sync.fleet.server.store import Store

    env = Env(args.db)
    try:
        db = Database(env.db)
        db.migrate()
        store, topics, now = Store(db), Parser("edge/v1"), time.time()

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
        db.dispose()
        base = env.start_server("s")
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {env.token}"})

        def measure(name: str, path: str, n: int = 300, **params: object) -> None:
            for _ in range(20):
                client.get(path, params=params)
            lat = []
            for _ in range(n):
                t = time.perf_counter()
                r = client.get(path, params=params)
                lat.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
            lat.sort()
            p95, p99 = lat[int(n * 0.95) - 1], lat[int(n * 0.99) - 1]
            print(f"  {name:<40} p50 {lat[n // 2]:6.1f} ms  p95 {p95:6.1f} ms  p99 {p99:6.1f} ms  "
                  f"{len(r.content):>7} bytes")

        print("api (1,000 devices; 20 with 24 h of telemetry every 60 s):")
        measure("GET /api/health", "/api/health")
        measure("devices, page of 100", "/api/devices", limit=100)
        measure("devices, all 1,000 in one page", "/api/devices", limit=1000)
        measure("devices, group + online filter", "/api/devices", group="g3", online="true")
        measure("one device", "/api/devices/dev-0005")
        measure("24 h telemetry series, 200 points", "/api/devices/dev-0005/telemetry",
                metric="system.cpu_percent", points=200)
    finally:
        env.close()


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
