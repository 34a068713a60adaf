"""Abuse the socket API of a real agent and measure what its well-behaved clients see meanwhile.

Starts a real agent daemon (Silero VAD, face detection, okay-nabu) on a Unix socket, then:
  1. runs every malformed-request case of ``tests/test_api_fuzz.py`` once, in turn: each must be
     refused (4xx, 503 ``overloaded``, 505) or have its connection closed;
  2. for ``--seconds``, runs the same cases from ``--workers`` threads at once, in random order,
     together with standing abuse: a slowloris pool dripping heads, an idle-connection flood past
     the connection cap, a client pipelining predicts it never reads, and large bodies over the
     body budget;
  3. meanwhile probes ``GET /v2/health/live`` every ``--interval`` ms on a kept-alive connection and
     on a fresh connection each time, and a Silero predict (checked against ONNX Runtime), and
     samples the agent's RSS.

It prints the cases tried and failed, the agent's peak RSS growth over its warmed-up baseline,
and the probes' latencies: p50, p99 and the longest stall (the slowest probe, reconnection
included). ``--defaults`` runs the agent with its default [api] limits (docs/api.md), else with the
fuzz test's short timeouts; ``--src DIR`` runs the agent from another source tree (for a before/after
comparison; with ``--defaults``, since an older agent may not know the newer settings).

Usage: python bench/api_abuse.py [--seconds 30] [--workers 4] [--interval 20] [--defaults] [--src DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch
from bench.agentproc import start_agent as run_agent
from tests import test_api_fuzz as fuzz
from tests.conftest import MODEL_FILES
from tests.test_api_fuzz import API_CONFIG, CASES, FEEDS, Conn, infer, judge, silero_v2


def start_agent(work: Path, defaults: bool, src: Path | None) -> subprocess.Popen[bytes]:
    for name in ("silero_vad", "face_detection", "okay_nabu"):
        (work / "models" / name / "1").mkdir(parents=True)
        (work / "models" / name / "1" / MODEL_FILES[name]).write_bytes(fetch(name).read_bytes())
    (work / "agent.toml").write_text("[api]\nmax_body_bytes = 4194304\n" if defaults else API_CONFIG)
    env = dict(os.environ, EDGE_AGENT_AGENT__STATE_DIR=str(work / "state"),
               EDGE_AGENT_AGENT__RUNTIME_DIR=str(work / "run"))
    return run_agent(work, work / "agent.toml", work / "models", env, cwd=src)


@dataclass
class Probe:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def row(self) -> str:
        if not self.latencies:
            return f"{self.name:<38}{'-':>8}{'-':>9}{'-':>9}{'-':>11}{len(self.errors):>8}"
        ms = np.asarray(self.latencies) * 1000
        return (f"{self.name:<38}{len(ms):>8}{np.median(ms):>9.2f}{np.percentile(ms, 99):>9.2f}{ms.max():>11.1f}"
                f"{len(self.errors):>8}")


# -- probes: in a process of their own, so the abusers' threads do not delay them ----------------------------------
def probe_kept(sock: Path, stop: threading.Event, probe: Probe, interval: float) -> None:
    client = AgentClient(sock, timeout=60)
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            status = client.request("GET", "/v2/health/live")[0]
            if status != 200:
                probe.errors.append(str(status))
        except ClientError as exc:
            probe.errors.append(str(exc))
            client.close()
        probe.latencies.append(time.perf_counter() - t0)
        time.sleep(interval)
    client.close()


def probe_fresh(sock: Path, stop: threading.Event, probe: Probe, interval: float) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with AgentClient(sock, timeout=60) as client:
                status = client.request("GET", "/v2/health/live")[0]
            if status != 200:
                probe.errors.append(str(status))
        except ClientError as exc:
            probe.errors.append(str(exc))
        probe.latencies.append(time.perf_counter() - t0)
        time.sleep(interval)


def probe_predict(sock: Path, stop: threading.Event, probe: Probe, interval: float) -> None:
    want = ort.InferenceSession(str(fetch("silero_vad")), providers=["CPUExecutionProvider"]).run(["output"], FEEDS)[0]
    client = AgentClient(sock, timeout=60)
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            out = client.infer("silero_vad", FEEDS)["output"]
            if not np.allclose(out, want, rtol=1e-5, atol=1e-6):
                probe.errors.append("wrong answer")
        except ClientError as exc:
            probe.errors.append(str(exc))
            client.close()
        probe.latencies.append(time.perf_counter() - t0)
        time.sleep(interval)
    client.close()


def run_probes(sock: Path, seconds: float, interval: float, out: Any) -> None:
    """Child process: the three probes for ``seconds``; their results go to ``out``."""
    stop = threading.Event()
    probes = [Probe("health, kept-alive"), Probe("health, new connection"), Probe("predict (Silero, v2)")]
    threads = [threading.Thread(target=fn, args=(sock, stop, probe, interval))
               for fn, probe in zip((probe_kept, probe_fresh, probe_predict), probes, strict=True)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(90)
    out.put(probes)


class Run:
    def __init__(self, sock: Path, pid: int) -> None:
        self.sock = sock
        self.proc = psutil.Process(pid)
        self.stop = threading.Event()
        self.tried = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline

    def case(self, name: str, run: object, allow_ok: int) -> None:
        try:
            problems = judge(run(self.sock), allow_ok)  # type: ignore[operator]
        except (AssertionError, OSError) as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        with self.lock:
            self.tried += 1
            if problems:
                self.failures.append(f"{name}: {problems[0][:200]}")

    def sample_rss(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    # -- standing abuse --------------------------------------------------------------------------------
    def slowloris(self, clients: int) -> None:
        conns: list[Conn] = []
        while not self.stop.is_set():
            while len(conns) < clients:
                try:
                    c = Conn(self.sock, timeout=5)
                except OSError:
                    break
                c.send(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: ")
                conns.append(c)
            for c in list(conns):
                if not c.send(b"a"):
                    c.close()
                    conns.remove(c)
            time.sleep(0.5)
        for c in conns:
            c.close()

    def idle_flood(self, clients: int) -> None:
        conns: list[socket.socket] = []
        while not self.stop.is_set():
            for s in conns:
                s.close()
            conns = []
            for _ in range(clients):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(str(self.sock))
                except OSError:
                    s.close()
                    break
                conns.append(s)
            self.stop.wait(1.0)
        for s in conns:
            s.close()

    def unread_pipeline(self) -> None:
        body = infer(silero_v2()) * 200
        while not self.stop.is_set():
            c = Conn(self.sock, timeout=5)
            c.sock.settimeout(2)
            with contextlib.suppress(OSError):
                c.sock.sendall(body)
            self.stop.wait(1.0)
            c.close()

    def big_bodies(self) -> None:
        size = 4_000_000
        head = b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
        while not self.stop.is_set():
            conns = []
            for _ in range(6):
                c = Conn(self.sock, timeout=5)
                c.send(head + b"[" * 100_000)
                conns.append(c)
            self.stop.wait(1.0)
            for c in conns:
                c.close()

    def fuzz_worker(self, seed: int) -> None:
        rng = random.Random(seed)
        cases = list(CASES)
        while not self.stop.is_set():
            rng.shuffle(cases)
            for name, run, allow_ok in cases:
                if self.stop.is_set():
                    return
                self.case(name, run, allow_ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--interval", type=float, default=20.0, help="ms between probes")
    parser.add_argument("--slowloris", type=int, default=100, help="connections dripping heads")
    parser.add_argument("--flood", type=int, default=300, help="idle connections opened every second")
    parser.add_argument("--unread", type=int, default=1, help="clients pipelining predicts they never read")
    parser.add_argument("--bodies", type=int, default=1, help="clients sending 6 large bodies every second")
    parser.add_argument("--defaults", action="store_true", help="the agent's default [api] limits")
    parser.add_argument("--src", type=Path, help="run the agent from this source tree")
    args = parser.parse_args()
    interval = args.interval / 1000
    if args.defaults:  # the cases wait for the default timeouts (a 60 s body timeout) to end them
        fuzz.READ_TIMEOUT = 90.0
    with tempfile.TemporaryDirectory(prefix="edge-abuse-") as tmp:
        work = Path(tmp)
        proc = start_agent(work, args.defaults, args.src)
        try:
            with AgentClient(work / "agent.sock") as client:
                for _ in range(50):
                    client.infer("silero_vad", FEEDS)
            run = Run(work / "agent.sock", proc.pid)
            started = time.perf_counter()
            for name, case, allow_ok in CASES:
                run.case(name, case, allow_ok)
                if proc.poll() is not None:
                    break
            sequential = (run.tried, len(run.failures), time.perf_counter() - started)
            ctx = mp.get_context("spawn")
            results: Any = ctx.Queue()
            quiet_s = min(5.0, args.seconds)
            prober = ctx.Process(target=run_probes, args=(work / "agent.sock", quiet_s, interval, results))
            prober.start()  # the same probes with no abuse, for comparison
            quiet: list[Probe] = results.get(timeout=quiet_s + 120)
            prober.join(30)
            prober = ctx.Process(target=run_probes, args=(work / "agent.sock", args.seconds, interval, results))
            prober.start()
            threads = [threading.Thread(target=run.sample_rss, daemon=True),
                       threading.Thread(target=run.slowloris, args=(args.slowloris,), daemon=True),
                       threading.Thread(target=run.idle_flood, args=(args.flood,), daemon=True),
                       *(threading.Thread(target=run.unread_pipeline, daemon=True) for _ in range(args.unread)),
                       *(threading.Thread(target=run.big_bodies, daemon=True) for _ in range(args.bodies)),
                       *(threading.Thread(target=run.fuzz_worker, args=(i,), daemon=True)
                         for i in range(args.workers))]
            for t in threads:
                t.start()
            probes: list[Probe] = results.get(timeout=args.seconds + 120)
            prober.join(30)
            run.stop.set()
            for t in threads:
                t.join(90)
            alive = proc.poll() is None
            with AgentClient(work / "agent.sock", timeout=10) as client:
                after = client.request("GET", "/v2/health/live")[0] if alive else None
            print(f"\nAPI abuse, agent from {args.src or 'this tree'}, "
                  f"{'default [api] limits' if args.defaults else 'the fuzz test [api] limits'}; "
                  f"{args.seconds:.0f} s concurrent: {args.workers} fuzz workers, {args.slowloris} slowloris, "
                  f"{args.flood} idle connections/s, {args.unread} unread pipeline(s), "
                  f"{args.bodies} x 6 bodies of 4 MB/s")
            print(f"{'':<34}{'value':>12}")
            print(f"{'cases tried, one at a time':<34}{sequential[0]:>12}")
            print(f"{'  failures':<34}{sequential[1]:>12}")
            print(f"{'cases tried, concurrently':<34}{run.tried - sequential[0]:>12}")
            print(f"{'  failures':<34}{len(run.failures) - sequential[1]:>12}")
            print(f"{'agent alive, health after':<34}{after if alive else 'DEAD'!s:>12}")
            print(f"{'RSS baseline (MiB)':<34}{run.baseline / 2**20:>12.1f}")
            print(f"{'peak RSS growth (MiB)':<34}{(run.peak - run.baseline) / 2**20:>12.1f}")
            print(f"\n{f'probe every {args.interval:g} ms':<38}{'calls':>8}{'p50 ms':>9}{'p99 ms':>9}"
                  f"{'longest ms':>11}{'errors':>8}")
            for probe in quiet:
                probe.name += ", no abuse"
                print(probe.row())
            for probe in probes:
                probe.name += ", abuse"
                print(probe.row())
            if run.failures:
                print("\nfailures (first 15):")
                for line in run.failures[:15]:
                    print("  " + line)
            errors = [e for p in probes for e in p.errors]
            if errors:
                print("\nprobe errors (first 5):")
                for line in errors[:5]:
                    print("  " + line[:200])
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
