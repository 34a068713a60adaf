"""Soak: everything at once for a given time, and whether the daemon's memory, threads or descriptors grow.

Starts a real agent daemon (``python -m agent.cli run``, with the systemd unit's environment), linked to a
local mosquitto (persistent sessions, so results queued across a restart are counted), with:

* ``face``: a ~30 fps face-detection stream (MediaPipe short range, LiteRT) on a looping 640x480 MJPG video
  paced like a camera (``realtime = true``), results ``every`` frame capped at ``--face-results-per-s``;
* ``vad``: a Silero VAD stream (ONNX Runtime) on a looping espeak-ng WAV paced in real time, results
  ``on_change``;
* ``predict``: ``--predict-rate`` requests/s over the Unix socket (Silero VAD, every fifth one face
  detection, OIP v2 binary), plus ``/metrics`` and ``/v1/agent/status`` every few seconds;
* ``broker``: mosquitto restarted every ``--broker-restart-s``;
* ``commands``: a burst of ``--burst`` MQTT commands (ping, status, logs) every ``--burst-every-s``.

Every ``--sample-s`` it reads the daemon's RSS, USS (psutil) and anonymous memory (smaps_rollup), its
threads and open descriptors, and prints a table at the end: the slopes in MB/h after ``--warmup-min`` by
least squares, threads and descriptors at the start and end of that window, answers ok/failed, results
published/delivered, and the machine's load. ``--only face,vad`` runs a subset (to find which activity
grows); ``--agent-env K=V`` passes settings to the daemon (``MALLOC_ARENA_MAX=2``, or the memory tracer
``tests/plugins/memtrace.py``). Samples go to ``--csv`` as they are taken, so a long run can be read while
it runs.

Usage: python bench/soak.py --minutes 120 [--warmup-min 10] [--only face,vad,predict,broker,commands]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch
from bench.footprint import silero_feeds, unit_environment
from bench.streams import make_clip, make_speech
from tests.conftest import Daemon, start_daemon
from tests.mqtt_broker import Broker, make_broker
from tests.test_streams import FACE_POST, FACE_PRE, VAD_PRE

ACTIVITIES = ("face", "vad", "predict", "broker", "commands")
DEVICE = "soak"
MB = 1024 * 1024


# -- the daemon's surroundings -----------------------------------------------------------------------------
def agent_config(path: Path, broker: Broker, video: Path, wav: Path, args: argparse.Namespace,
                 only: set[str]) -> Path:
    text = (f'[agent]\ndevice_id = "{DEVICE}"\n[runtime]\nthreads = 1\n'
            f'[mqtt]\nurl = "{broker.url}"\ntelemetry_interval_s = {args.telemetry_s:g}\n'
            "backoff_min_s = 0.2\nbackoff_max_s = 2\n")
    if "face" in only:
        text += (f'[stream.face]\nmodel = "face_detection"\n'
                 f'source = {{ type = "video", path = "{video}", loop = true, realtime = true }}\n'
                 f"pre = {FACE_PRE}\npost = {FACE_POST}\n"
                 f'results = {{ mode = "every", max_per_s = {args.face_results_per_s:g} }}\n')
    if "vad" in only:
        text += (f'[stream.vad]\nmodel = "silero_vad"\n'
                 f'source = {{ type = "wav", path = "{wav}", loop = true, realtime = true }}\n'
                 f'pre = {VAD_PRE}\npost = {{ type = "vad", threshold = 0.5 }}\nresults = {{ mode = "on_change" }}\n')
    path.write_text(text)
    return path


@dataclass
class Counters:
    """What the load generators saw; written by their threads, read by the sampler."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    predict_ok: int = 0
    predict_failed: int = 0
    polls_ok: int = 0
    polls_failed: int = 0
    commands_sent: int = 0
    commands_ok: int = 0
    commands_failed: int = 0
    commands_unanswered: int = 0
    broker_restarts: int = 0
    results_seen: dict[str, set[int]] = field(default_factory=dict)
    results_duplicates: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def failure(self, text: str) -> None:
        with self.lock:
            if len(self.failures) < 20:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {text}")


class Collector:
    """A persistent MQTT 5 session on the device's results and responses: counts every result once."""

    def __init__(self, broker: Broker, counters: Counters) -> None:
        self.counters = counters
        self.responses: dict[str, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="soak-collector",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 2)
        props = Properties(1)  # PacketTypes.CONNECT
        props.SessionExpiryInterval = 0xFFFFFFFF
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe([(f"edge/v1/devices/{DEVICE}/results/#", 1), (f"edge/v1/devices/{DEVICE}/responses", 1)])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            self.counters.failure(f"undecodable message on {msg.topic}")
            return
        if msg.topic.endswith("/responses"):
            result = body.get("result")
            if isinstance(result, dict) and result.get("status") == "accepted":
                return  # a long command's first answer; the final one follows
            with self.cond:
                self.responses[str(body.get("id"))] = body
                self.cond.notify_all()
            return
        stream = msg.topic.rsplit("/", 1)[-1]
        with self.counters.lock:
            seen = self.counters.results_seen.setdefault(stream, set())
            if body.get("seq") in seen:
                self.counters.results_duplicates += 1
            seen.add(int(body.get("seq", -1)))

    def command(self, name: str, args: dict[str, Any]) -> str:
        cid = uuid.uuid4().hex
        payload = orjson.dumps({"id": cid, "name": name, "args": args})
        self.client.publish(f"edge/v1/devices/{DEVICE}/commands", payload, qos=1)
        return cid

    def wait(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(i in self.responses for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return {i: self.responses.pop(i) for i in ids if i in self.responses}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- load generators -----------------------------------------------------------------------------------------
def predict_loop(sock: Path, rate: float, counters: Counters, stop: threading.Event) -> None:
    """``rate`` requests/s (every fifth a face detection), paced on a schedule; status polls every 5 s."""
    client = AgentClient(sock, timeout=30)
    vad = silero_feeds()
    face = {"input": np.zeros((1, 128, 128, 3), np.float32)}
    interval, n = 1.0 / rate, 0
    next_at = next_poll = time.monotonic()
    while not stop.is_set():
        try:
            if n % 5 == 4:
                client.infer("face_detection", face)
            else:
                client.infer("silero_vad", vad)
            counters.add("predict_ok")
        except ClientError as exc:
            counters.add("predict_failed")
            counters.failure(f"predict: {exc}")
        n += 1
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + 5
            for path in ("/metrics", "/v1/agent/status"):
                try:
                    ok = client.request("GET", path)[0] == 200
                except ClientError:
                    ok = False
                counters.add("polls_ok" if ok else "polls_failed")
        next_at = max(next_at + interval, now - 1.0)  # fall behind by at most a second, then drop the debt
        stop.wait(max(0.0, next_at - time.monotonic()))
    client.close()


def command_loop(collector: Collector, burst: int, every_s: float, counters: Counters,
                 stop: threading.Event) -> None:
    """A burst of commands every ``every_s``; each must be answered within 30 s (the broker may be restarting)."""
    names = [("ping", {}), ("status", {}), ("logs", {"lines": 20})]
    while not stop.wait(every_s):
        ids = [collector.command(*names[i % len(names)]) for i in range(burst)]
        counters.add("commands_sent", burst)
        answers = collector.wait(ids, 30)
        ok = sum(1 for a in answers.values() if a.get("ok"))
        counters.add("commands_ok", ok)
        counters.add("commands_failed", len(answers) - ok)
        counters.add("commands_unanswered", burst - len(answers))
        for a in answers.values():
            if not a.get("ok"):
                counters.failure(f"command answered {a.get('error')}")


def broker_loop(broker: Broker, every_s: float, counters: Counters, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        broker.restart()
        counters.add("broker_restarts")


# -- sampling -------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    t: float  # seconds since the load started
    rss: float
    uss: float
    anon: float  # anonymous resident memory (heap, thread stacks): not shared with other processes' files
    threads: int
    fds: int
    cpu_s: float
    load1: float


def take(proc: psutil.Process, t0: float) -> Sample:
    full = proc.memory_full_info()
    times = proc.cpu_times()
    return Sample(time.monotonic() - t0, full.rss / MB, full.uss / MB, anonymous_mb(proc.pid), proc.num_threads(),
                  proc.num_fds(), times.user + times.system, os.getloadavg()[0])


def anonymous_mb(pid: int) -> float:
    """``Anonymous`` of smaps_rollup: the heap and stacks, where a leak grows (USS also moves when another
    process maps or unmaps the same libraries)."""
    with contextlib.suppress(OSError, StopIteration):
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        return int(next(line.split()[1] for line in lines if line.startswith("Anonymous:"))) / 1024
    return float("nan")


def slope_mb_h(samples: list[Sample], key: str) -> float:
    """Least-squares slope of ``key`` (MB) over time, in MB per hour."""
    if len(samples) < 3:
        return float("nan")
    t = np.array([s.t for s in samples]) / 3600
    y = np.array([getattr(s, key) for s in samples])
    return float(np.polyfit(t, y, 1)[0])


def streams(daemon: Daemon) -> dict[str, dict[str, Any]]:
    with contextlib.suppress(ClientError, KeyError, TypeError):
        return {s["name"]: s for s in daemon.client._json("GET", "/v1/agent/streams")["streams"]}
    return {}


def stop_streams(daemon: Daemon) -> None:
    """Stop every stream, so that what they published can be compared with what was delivered."""
    for name in streams(daemon):
        with contextlib.suppress(ClientError):
            daemon.client.request("POST", f"/v1/agent/streams/{name}:stop", b"")


def outbox_depth(daemon: Daemon) -> int | None:
    with contextlib.suppress(ClientError, KeyError, TypeError):
        return int(daemon.client._json("GET", "/v1/agent/status")["outbox"]["depth"])
    return None


# -- the run --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, work: Path) -> int:
    only = set(args.only.split(",")) if args.only else set(ACTIVITIES)
    unknown = only - set(ACTIVITIES)
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))} (known: {', '.join(ACTIVITIES)})")
    models = work / "models"
    for name, file in (("silero_vad", "model.onnx"), ("face_detection", "model.tflite")):
        (models / name / "1").mkdir(parents=True)
        shutil.copyfile(fetch(name), models / name / "1" / file)
    video = make_clip(work / "camera.avi", 8) if "face" in only else work / "none.avi"
    wav = make_speech(work / "speech.wav", 30, work)[0] if "vad" in only else work / "none.wav"
    broker = make_broker(work / "broker", persistence=True)
    broker.start()
    counters = Counters()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    collector: Collector | None = None
    env = dict(unit_environment())
    for item in args.agent_env:
        key, _, value = item.partition("=")
        env[key] = value
    config = agent_config(work / "agent.toml", broker, video, wav, args, only)
    daemon = start_daemon(work / "agent", "--config", str(config), "--models-dir", str(models), env=env)
    proc = psutil.Process(daemon.proc.pid)
    samples: list[Sample] = []
    csv_path = Path(args.csv) if args.csv else work / "samples.csv"
    try:
        collector = Collector(broker, counters)
        if "predict" in only:
            threads.append(threading.Thread(target=predict_loop, args=(daemon.socket, args.predict_rate, counters,
                                                                       stop), name="predict", daemon=True))
        if "commands" in only:
            threads.append(threading.Thread(target=command_loop, args=(collector, args.burst, args.burst_every_s,
                                                                       counters, stop), name="commands", daemon=True))
        if "broker" in only:
            threads.append(threading.Thread(target=broker_loop, args=(broker, args.broker_restart_s, counters, stop),
                                            name="broker", daemon=True))
        t0 = time.monotonic()
        for th in threads:
            th.start()
        end = t0 + args.minutes * 60
        next_report = t0 + 60
        with csv_path.open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["t_s", "rss_mb", "uss_mb", "anon_mb", "threads", "fds", "cpu_s", "load1"])
            while time.monotonic() < end:
                if daemon.proc.poll() is not None:
                    raise SystemExit(f"the agent exited with {daemon.proc.returncode}; log {daemon.log}")
                s = take(proc, t0)
                samples.append(s)
                out.writerow([f"{s.t:.1f}", f"{s.rss:.2f}", f"{s.uss:.2f}", f"{s.anon:.2f}", s.threads, s.fds,
                              f"{s.cpu_s:.2f}", f"{s.load1:.2f}"])
                fh.flush()
                if time.monotonic() >= next_report:
                    next_report += 60
                    print(f"{s.t / 60:6.1f} min  RSS {s.rss:7.1f}  USS {s.uss:7.1f}  anon {s.anon:7.1f} MB  "
                          f"threads {s.threads}  fds {s.fds}  predicts {counters.predict_ok}/{counters.predict_failed} "
                          "failed  "
                          f"commands {counters.commands_ok}/{counters.commands_sent}  "
                          f"load {s.load1:.2f}", file=sys.stderr, flush=True)
                time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        stop.set()
        for th in threads:
            th.join(60)
        if not broker.running:
            broker.start()
        before_stop = streams(daemon)
        stop_streams(daemon)
        # let the outbox drain to the collector before counting what was delivered
        deadline = time.monotonic() + 60
        while (outbox_depth(daemon) or 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        published = {name: int(s.get("results", 0)) for name, s in streams(daemon).items()}
        depth = outbox_depth(daemon)
        time.sleep(1.0)  # the last deliveries reach the collector
    finally:
        stop.set()
        if collector is not None:
            collector.close()
        code = daemon.stop()
        broker.stop()
    report(args, only, samples, counters, published, depth, code, daemon)
    for name, s in sorted(before_stop.items()):
        print(f"stream {name}: state {s.get('state')}, captured {s.get('captured')}, inferred {s.get('inferred')}, "
              f"errors {s.get('errors')}, dropped frames {s.get('dropped_frames')}, "
              f"audio overflow samples {s.get('audio_overflow_samples')}")
    return 0 if code == 0 else 1


def report(args: argparse.Namespace, only: set[str], samples: list[Sample], counters: Counters,
           published: dict[str, int], depth: int | None, code: int, daemon: Daemon) -> None:
    after = [s for s in samples if s.t >= args.warmup_min * 60]
    window = after if len(after) >= 3 else samples
    first, last = window[0], window[-1]
    span_h = (last.t - first.t) / 3600 if len(window) > 1 else 0.0
    cpu = 100 * (last.cpu_s - first.cpu_s) / (last.t - first.t) if last.t > first.t else float("nan")
    loads = [s.load1 for s in samples]
    print(f"\nsoak: {args.minutes:g} min, activities {', '.join(a for a in ACTIVITIES if a in only)}; "
          f"{len(samples)} samples every {args.sample_s:g} s; slope from minute {window[0].t / 60:.1f} "
          f"to {window[-1].t / 60:.1f} ({span_h:.2f} h); {os.cpu_count()} CPUs; agent env "
          f"{' '.join(args.agent_env) or '(unit environment)'}")
    print(f"{'metric':<40}{'start':>10}{'end':>10}{'slope MB/h':>12}")
    print(f"{'RSS (MB)':<40}{first.rss:>10.1f}{last.rss:>10.1f}{slope_mb_h(window, 'rss'):>12.2f}")
    print(f"{'USS (MB)':<40}{first.uss:>10.1f}{last.uss:>10.1f}{slope_mb_h(window, 'uss'):>12.2f}")
    print(f"{'anonymous (MB, heap and stacks)':<40}{first.anon:>10.1f}{last.anon:>10.1f}"
          f"{slope_mb_h(window, 'anon'):>12.2f}")
    print(f"{'threads':<40}{first.threads:>10}{last.threads:>10}   (min {min(s.threads for s in window)}, "
          f"max {max(s.threads for s in window)})")
    print(f"{'open descriptors':<40}{first.fds:>10}{last.fds:>10}   (min {min(s.fds for s in window)}, "
          f"max {max(s.fds for s in window)})")
    print(f"{'RSS at first sample / peak (MB)':<40}{samples[0].rss:>10.1f}{max(s.rss for s in samples):>10.1f}")
    print(f"agent CPU {cpu:.1f} % of a core; machine load (1 min) median {float(np.median(loads)):.2f}, "
          f"max {max(loads):.2f}")
    print(f"predicts ok {counters.predict_ok}, failed {counters.predict_failed}; status/metrics polls ok "
          f"{counters.polls_ok}, failed {counters.polls_failed}")
    print(f"commands sent {counters.commands_sent}: ok {counters.commands_ok}, failed {counters.commands_failed}, "
          f"unanswered {counters.commands_unanswered}; broker restarts {counters.broker_restarts}")
    for stream, n in sorted(published.items()):
        seen = counters.results_seen.get(stream, set())
        print(f"results {stream}: published {n}, delivered {len(seen)} unique "
              f"({n - len(seen)} missing)")
    print(f"duplicates delivered {counters.results_duplicates}; outbox depth at the end {depth}; "
          f"agent exit code {code}")
    for line in counters.failures:
        print(f"  failure: {line}")
    if args.keep:
        print(f"files kept in {daemon.log.parent.parent} (agent log {daemon.log})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--warmup-min", type=float, default=10, help="minutes left out of the slope")
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ACTIVITIES)}")
    ap.add_argument("--predict-rate", type=float, default=50)
    ap.add_argument("--face-results-per-s", type=float, default=10)
    ap.add_argument("--broker-restart-s", type=float, default=120)
    ap.add_argument("--burst", type=int, default=30)
    ap.add_argument("--burst-every-s", type=float, default=20)
    ap.add_argument("--telemetry-s", type=float, default=10)
    ap.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--csv", default="", help="write samples here (default: in the work directory)")
    ap.add_argument("--workdir", default="", help="keep everything here (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        args.keep = True
    else:
        work = Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    try:
        code = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
