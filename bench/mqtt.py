"""MQTT link throughput: QoS 1 results through the outbox to a local mosquitto, and outbox
replay after an outage, against raw paho-mqtt publishing in the same run.

Usage: python bench/mqtt.py [--messages 20000] [--runs 3]
Prints medians over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_sync.mqtt.session import DeviceSession
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.outbox import Outbox
from tests.mqtt_broker import Broker, make_broker

PAYLOAD = {"stream": "cam", "model": "face_detection@1", "labels": [{"label": "face", "score": 0.93}],
           "ts": 0.0}


def raw_paho(broker: Broker, n: int) -> float:
    """Messages/s for paho alone: publish n QoS 1 messages, time until every PUBACK."""
    import orjson

    acked = threading.Semaphore(0)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-raw",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.on_publish = lambda *_a: acked.release()
    client.connect(broker.host, broker.port)
    client.loop_start()
    time.sleep(0.2)
    payload = orjson.dumps(PAYLOAD)
    start = time.perf_counter()
    for _ in range(n):
        client.publish("edge/v1/devices/bench/results/raw", payload, qos=1)
    for _ in range(n):
        acked.acquire(timeout=60)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return n / elapsed


def wait_empty(box: Outbox, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while box.stats().depth and time.monotonic() < deadline:
        time.sleep(0.005)
    if box.stats().depth:
        raise SystemExit(f"outbox not drained: {box.stats()}")


def session(broker: Broker, work: Path, name: str) -> tuple[DeviceSession, Outbox]:
    box = Outbox(work / f"{name}.db", max_messages=1_000_000, max_bytes=1 << 30)
    settings = LinkSettings(device_id="bench", broker=BrokerSettings(url=broker.url, client_id=f"bench-{name}",
                                                                       backoff_min_s=0.05, backoff_max_s=0.2))
    return DeviceSession(settings, box), box


def through_outbox(broker: Broker, work: Path, n: int) -> tuple[float, float]:
    """(enqueue msg/s, end-to-end msg/s until every message is PUBACKed and deleted)."""
    sess, box = session(broker, work, "live")
    sess.start()
    while not sess.connected:
        time.sleep(0.01)
    topic = sess.topics.results("cam")
    start = time.perf_counter()
    for _ in range(n):
        sess.enqueue("result", topic, PAYLOAD)
    enqueued = time.perf_counter() - start
    wait_empty(box)
    total = time.perf_counter() - start
    sess.stop()
    box.close()
    return n / enqueued, n / total


def replay(broker: Broker, work: Path, n: int) -> float:
    """Messages/s to drain an outbox of n messages once the broker is back."""
    broker.stop()
    sess, box = session(broker, work, "replay")
    topic = sess.topics.results("cam")
    box.put_many([("result", topic, PAYLOAD)] * n)
    sess.start()
    broker.start()
    while not sess.connected:
        time.sleep(0.001)
    start = time.perf_counter()
    wait_empty(box)
    elapsed = time.perf_counter() - start
    sess.stop()
    box.close()
    return n / elapsed


def outbox_alone(work: Path, n: int) -> dict[str, float]:
    """The outbox without a broker: put/s, put_many messages/s, and ms for pending(10k) + ack of them."""
    with Outbox(work / "alone.db", max_messages=1_000_000, max_bytes=1 << 30) as box:
        start = time.perf_counter()
        for _ in range(n):
            box.put("result", "edge/v1/devices/bench/results/cam", PAYLOAD)
        put_rate = n / (time.perf_counter() - start)
        start = time.perf_counter()
        box.ack([m.seq for m in box.pending(limit=10_000)])
        pending_ack_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        box.put_many([("telemetry", "t", PAYLOAD)] * n)
        many_rate = n / (time.perf_counter() - start)
    (work / "alone.db").unlink()
    return {"put": put_rate, "put_many": many_rate, "pending_ack_ms": pending_ack_ms}


def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"raw paho QoS 1 publish": [], "outbox enqueue (SQLite put)": [],
                                    "outbox -> broker, sustained": [], "outbox replay after outage": []}
    with tempfile.TemporaryDirectory(prefix="edge-bench-mqtt-") as tmp:
        work = Path(tmp)
        broker = make_broker(work / "broker")
        broker.start()
        try:
            for run in range(args.runs):
                rows["raw paho QoS 1 publish"].append(raw_paho(broker, args.messages))
                enq, e2e = through_outbox(broker, work / f"r{run}", args.messages)
                rows["outbox enqueue (SQLite put)"].append(enq)
                rows["outbox -> broker, sustained"].append(e2e)
                rows["outbox replay after outage"].append(replay(broker, work / f"r{run}", args.messages))
        finally:
            broker.stop()
        alone = [outbox_alone(work, args.messages) for _ in range(args.runs)]
    raw = statistics.median(rows["raw paho QoS 1 publish"])
    print(f"\nMQTT QoS 1 to local mosquitto, {args.messages} messages, median of {args.runs} runs")
    print(f"{'path':<32}{'msg/s':>10}{'vs raw paho':>13}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:<32}{med:>10.0f}{med / raw:>13.2f}")
    print(f"\noutbox alone (no broker), {args.messages} messages, median of {args.runs} runs: "
          f"put {statistics.median(a['put'] for a in alone):,.0f}/s, "
          f"put_many {statistics.median(a['put_many'] for a in alone):,.0f} msgs/s, "
          f"pending(10k) + ack {statistics.median(a['pending_ack_ms'] for a in alone):.0f} ms")


if __name__ == "__main__":
    main()
