"""Per-model inference statistics in the shape of Triton's statistics extension
(``GET /v2/models/{name}/stats``), so Triton tooling and operators can see where a request's
time goes: the agent's own work before the runtime call, the queue, the call, and after it.

Durations are cumulative counts and nanoseconds, as in Triton:
- ``success``: a request from its last byte parsed (as Triton: the upload is the client's and
  the socket's time) to its answer handed to the kernel (stamped
  as the write begins: on a busy CPU the client it wakes may run before the write returns, and
  that is the client's time, not the agent's);
- ``compute_input``: up to the hand-over to the model (HTTP, routing, decoding, checks);
- ``queue``: waiting for the model's thread (0 for inline runs);
- ``compute_infer``: the runtime call, quantization included;
- ``compute_output``: from the call's end to the answer's write (formatting, encoding; for an
  answer written by the event loop, also the hand-back to it);
- ``fail``: requests for this model that got an error, to the moment it was raised.

``ModelStats`` is also the one place a model version's requests are counted: the calls
(admitted, rejected, failed, succeeded, with recent latencies and runtime-call times, and
answers holding NaN while the health window checks them) that the health window and the
watchdog judge, and the answers per protocol and status code that ``/metrics`` exposes. Every
reader (status, telemetry, ``/metrics``, the statistics extension) reads these counters.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

_KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
#: Upper bounds (s) of the predict latency histogram exposed in /metrics.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Upper bounds of the rows-per-runtime-call histogram exposed in /metrics.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Timing:
    """``time.perf_counter_ns`` stamps of one request; the model's worker fills ``started``/``ended``."""

    received: int
    submitted: int = 0
    started: int = 0
    ended: int = 0


class ModelStats:
    """Thread-safe: the worker thread records executions, the event loop and streams record requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = {kind: [0, 0] for kind in _KINDS}  # kind -> [count, ns]
        self._batches: dict[int, list[int]] = {}  # rows per runtime call -> [count, ns]
        self._answers: collections.Counter[tuple[str, str]] = collections.Counter()  # (protocol, code) -> count
        self.inference_count = 0  # rows inferred successfully (a batch of 8 counts 8)
        self.execution_count = 0  # successful runtime calls (a batch counts once)
        self.last_inference_ms = 0
        # Calls into the model, whatever asked (API or stream):
        self.requests = 0  # admitted: their feeds fit the model
        self.rejected = 0  # refused before running: inputs that do not fit this version
        self.errors = 0  # admitted, then failed
        self.successes = 0
        self.consecutive_failures = 0  # runtime failures in a row: the watchdog's signal of a failing delegate
        # Recent successful call latencies (s), queue included.
        self.latencies: collections.deque[float] = collections.deque(maxlen=1024)
        # Runtime-call time per row (s) of recent successful calls: the model's own speed, whatever the
        # queue (the installer's health window compares versions by it).
        self.compute_times: collections.deque[float] = collections.deque(maxlen=1024)
        # Successful answers with NaN or infinity in an output that must be finite (counted only while
        # ``ServedModel.nonfinite_check`` is set: the installer's health window).
        self.nonfinite = 0
        # Agent time of answered predicts, in LATENCY_BUCKETS (the last slot is +Inf), and their sum.
        self._latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._window_from = 0  # ``successes`` when telemetry last took the latency window

    # -- calls ---------------------------------------------------------------------------
    def admitted(self) -> None:
        with self._lock:
            self.requests += 1

    def refused(self) -> None:
        with self._lock:
            self.rejected += 1

    def call_ended(self, latency_s: float | None, runtime_failure: bool = False) -> None:
        """A call's outcome: its latency when it succeeded, else None (``runtime_failure``: the runtime raised)."""
        with self._lock:
            if latency_s is not None:
                self.consecutive_failures = 0
                self.successes += 1
                self.latencies.append(latency_s)
                return
            self.errors += 1
            if runtime_failure:
                self.consecutive_failures += 1

    def latency_window(self) -> dict[str, float] | None:
        """Call latency p50/p99 (ms) of the successes since the previous call, or None if there were none.

        Telemetry's one reader takes it once per sample, so a plot of it shows each interval on its
        own (at most the last 1,024 calls of an interval are kept).
        """
        with self._lock:
            new, self._window_from = self.successes - self._window_from, self.successes
            recent = sorted(itertools.islice(reversed(self.latencies), min(new, len(self.latencies))))
        if not recent:
            return None
        def at(q: float) -> float:
            return round(recent[min(len(recent) - 1, int(q * len(recent)))] * 1000, 3)
        return {"p50": at(0.5), "p99": at(0.99), "count": new}

    def answered_nonfinite(self) -> None:
        with self._lock:
            self.nonfinite += 1

    def restarted(self) -> None:
        """The watchdog replaced the session: failures in a row start over."""
        with self._lock:
            self.consecutive_failures = 0

    # -- answers -------------------------------------------------------------------------
    def answered(self, protocol: str, code: str) -> None:
        with self._lock:
            self._answers[(protocol, code)] += 1

    def answers(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._answers)

    def observe_latency(self, seconds: float) -> None:
        """An answered predict took ``seconds`` inside the agent (``/metrics`` latency histogram)."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._latency_counts[slot] += 1
            self._latency_sum += seconds

    def latency_histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets, +Inf last, and the sum of seconds."""
        with self._lock:
            counts, total = list(self._latency_counts), self._latency_sum
        return _cumulative(LATENCY_BUCKETS, counts), total

    def batch_histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Rows per successful runtime call: cumulative ``(le, count)`` buckets and the sum of rows."""
        with self._lock:
            rows = {r: c for r, (c, _ns) in self._batches.items()}
        counts = [0] * (len(BATCH_BUCKETS) + 1)
        for r, c in rows.items():
            counts[bisect.bisect_left(BATCH_BUCKETS, r)] += c
        return _cumulative(BATCH_BUCKETS, counts), float(sum(r * c for r, c in rows.items()))

    def executed(self, rows: int, ns: int) -> None:
        with self._lock:
            self.inference_count += rows
            self.execution_count += 1
            self.compute_times.append(ns / max(rows, 1) / 1e9)
            entry = self._batches.setdefault(rows, [0, 0])
            entry[0] += 1
            entry[1] += ns

    def succeeded(self, timing: Timing, sent: int) -> None:
        if not timing.ended:  # the worker never ran it (cannot happen for a success; never count garbage)
            return
        with self._lock:
            for kind, ns in (("success", sent - timing.received),
                             ("compute_input", timing.submitted - timing.received),
                             ("queue", max(0, timing.started - timing.submitted)),
                             ("compute_infer", timing.ended - timing.started),
                             ("compute_output", sent - timing.ended)):
                total = self._totals[kind]
                total[0] += 1
                total[1] += ns
            self.last_inference_ms = int(time.time() * 1000)

    def failed(self, received: int) -> None:
        with self._lock:
            total = self._totals["fail"]
            total[0] += 1
            total[1] += time.perf_counter_ns() - received

    def to_dict(self, name: str, version: int) -> dict[str, Any]:
        with self._lock:
            return {
                "name": name, "version": str(version), "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {kind: {"count": c, "ns": ns} for kind, (c, ns) in self._totals.items()},
                "batch_stats": [{"batch_size": rows, "compute_infer": {"count": c, "ns": ns}}
                                for rows, (c, ns) in sorted(self._batches.items())],
            }


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return out
