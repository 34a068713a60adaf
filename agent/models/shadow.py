"""Shadow versions: a candidate that answers a sample of live traffic beside the serving version,
never in its place, so its agreement and speed are known before it serves.

The serving version's ``mirror`` hook hands a sampled request's feeds and answer to ``offer``,
which only draws a random number and, for a sampled one, copies the feeds into a bounded
queue: a full queue drops the sample (counted), so the serving answer never waits for the
shadow. With the candidate in its own process (the default), the event loop writes each sample
to the child's pipe without blocking and reads the figures back when they come: no thread of
the agent competes for the GIL with the serving threads (one that did, preempted while holding
it on a busy CPU, added ~2 ms to serving p99: ``bench/shadow.py``). Without a process, the
shadow's own thread (at a lower CPU priority) runs the candidate. Either way the two answers
are compared (``agent.models.agreement``) and the optional policy judged; a decision is handed
to ``decide`` (the deployer promotes or discards on the event loop).

This module owns no lifecycle beyond its thread: installing, promoting and discarding are the
deployer's (``agent.deploy.installer``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from agent.models.activity import SERVING
from agent.models.agreement import Comparator
from agent.models.shadow_process import Replies, ShadowProcess

if TYPE_CHECKING:
    from agent.models.served import ServedModel

log = structlog.get_logger(__name__)

#: ``decide(model, action, reason)``: the policy reached a verdict, ``action`` is "promote" or "discard".
Decide = Callable[[str, str, str], None]
_STOP = object()


@dataclass(frozen=True)
class ShadowPolicy:
    """How much traffic a shadow sees, and when it decides by itself (never, unless a threshold is set)."""

    sample: float = 0.1
    min_samples: int = 200
    min_agreement: float | None = None
    max_latency_ratio: float | None = None

    @property
    def automatic(self) -> bool:
        return self.min_agreement is not None or self.max_latency_ratio is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ms = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 4), "p99": round(float(np.percentile(ms, 99)), 4)}


class Shadow:
    """One candidate version mirroring its model's serving version. ``offer`` is safe from any thread."""

    def __init__(self, serving: ServedModel, candidate: ServedModel, comparator: Comparator, policy: ShadowPolicy,
                 *, decide: Decide, queue_size: int = 8, nice: int = 10, deployment: str | None = None,
                 process: ShadowProcess | None = None, yield_to_serving: bool = True) -> None:
        self.name = candidate.name
        self.serving, self.candidate = serving, candidate
        self.comparator = comparator
        self.policy = policy
        self.decide = decide
        self.nice = nice
        self.deployment = deployment
        # The candidate runs in this child process (and compares there) when given; else on this thread.
        self.process = process
        # The process is paused while any serving call runs (agent.models.activity).
        self.yield_to_serving = yield_to_serving and process is not None
        self.started_at = time.time()
        self.state = "mirroring"  # then "promoting" or "discarded"
        self.decision: dict[str, str] | None = None
        self.offered = self.dropped = self.errors = 0
        self.last_error: str | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1024)
        # The hand-over shares no lock with the shadow thread: a deque (atomic appends and pops) and a
        # pipe to wake it. A lower-priority thread preempted while holding a queue's mutex would make
        # the serving thread that offers the next sample wait until it runs again (priority inversion).
        self.queue_size = queue_size
        self._items: collections.deque[Any] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._figures: tuple[dict[str, float | None], float | None, int] = (comparator.metrics(), None, 0)
        self._random = random.Random().random  # noqa: S311 - sampling, not security
        self._active = True
        self._thread = threading.Thread(target=self._run, name=f"shadow-{candidate.key}", daemon=True)
        # With a process and an event loop: samples go through the loop (``_pump``), no thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pump_due = False
        self._sending: list[bytes | memoryview] | None = None  # parts of the sample being written
        self._writing = False  # a writer callback waits for room in the pipe
        self._in_flight = False  # a sample is with the child
        self._gone: str | None = None  # why the child cannot take samples any more
        self._replies = Replies()

    # -- lifecycle (event loop) ------------------------------------------------------------------
    def start(self) -> None:
        """Begin mirroring: the serving version's answers are offered from now on."""
        loop = None
        if self.process is not None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        if self.process is not None and loop is not None:
            self._loop, self._loop_thread = loop, threading.get_ident()
            os.set_blocking(self.process.to_child, False)
            os.set_blocking(self.process.from_child, False)
            loop.add_reader(self.process.from_child, self._on_readable)
        else:
            self._thread.start()
        if self.yield_to_serving and self.process is not None:
            SERVING.register(id(self), self.process.pause)
        self.serving.mirror = self.offer

    def stop(self, timeout: float = 5.0) -> None:
        """Stop mirroring and the thread (blocking: call from a thread, or the loop). Idempotent."""
        self._active = False
        if self.serving.mirror == self.offer:
            self.serving.mirror = None
        loop = self._loop
        if loop is not None:
            self._loop = None
            if threading.get_ident() == self._loop_thread:
                self._detach(loop)
            elif not loop.is_closed():
                done = threading.Event()

                def detach() -> None:
                    self._detach(loop)
                    done.set()

                with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing left to detach
                    loop.call_soon_threadsafe(detach)
                    done.wait(timeout)
        if self._thread.is_alive():
            self._items.appendleft(_STOP)
            self._wake()
            self._thread.join(timeout)
        SERVING.unregister(id(self))
        if self.process is not None:
            self.process.close()
        if not self._thread.is_alive() and self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            if not self._pump_due:
                self._pump_due = True
                with contextlib.suppress(RuntimeError):  # the loop closed: the shadow is stopping
                    loop.call_soon_threadsafe(self._pump)
            return
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes the thread
            os.write(self._wake_w, b"\0")

    # -- the child's pipe, on the event loop (with a process) ------------------------------------
    def _detach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.process is not None:
            loop.remove_reader(self.process.from_child)
            loop.remove_writer(self.process.to_child)
        self._writing = False

    def _pump(self) -> None:
        """Send the next queued sample when the child has none (it runs one at a time)."""
        self._pump_due = False
        while self._items and self._sending is None and not self._in_flight and self._loop is not None:
            item = self._items.popleft()
            if item is _STOP or not self._active:
                return
            if self._gone is not None:
                self._failed(self._gone)
                continue
            assert self.process is not None
            self._sending, self._in_flight = self.process.message(*item), True
            self._write_more()

    def _write_more(self) -> None:
        parts, loop, process = self._sending, self._loop, self.process
        if parts is None or loop is None or process is None:
            return
        try:
            while parts:
                written = os.write(process.to_child, parts[0])
                if written < len(parts[0]):
                    parts[0] = memoryview(parts[0])[written:]
                else:
                    parts.pop(0)
        except BlockingIOError:  # the pipe is full: the rest when the child has read
            if not self._writing:
                loop.add_writer(process.to_child, self._write_more)
                self._writing = True
            return
        except OSError as exc:
            self._lost(f"the shadow process is gone: {exc}")
            return
        if self._writing:
            loop.remove_writer(process.to_child)
            self._writing = False
        self._sending = None

    def _on_readable(self) -> None:
        process = self.process
        assert process is not None
        try:
            data = os.read(process.from_child, 1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"the shadow process is gone: {exc}")
            return
        if not data:
            self._lost("the shadow process is gone: it closed its pipe")
            return
        try:
            replies = self._replies.feed(data)
        except Exception as exc:  # noqa: BLE001 - a broken child is a figure, never the serving path's
            self._lost(f"the shadow process is broken: {exc}")
            return
        for reply in replies:
            self._in_flight = False
            if "error" in reply:
                self._failed(str(reply["error"]))
            else:
                self._record(reply["took"], reply["figures"])
        self._pump()

    def _lost(self, reason: str) -> None:
        """The child cannot take samples: this one and every later one is an error."""
        if self._gone is None:
            self._gone = reason
            loop = self._loop
            if loop is not None:
                self._detach(loop)
        if self._in_flight:
            self._failed(reason)
        self._in_flight, self._sending = False, None
        self._pump()

    # -- hot path (any thread) --------------------------------------------------------------------
    def offer(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
              meta: Mapping[str, Any] | None = None) -> None:
        """A served request's feeds and answer: sampled, copied and queued, or dropped when the queue is full."""
        if not self._active or self._random() >= self.policy.sample:
            return
        self.offered += 1
        if len(self._items) >= self.queue_size:
            self.dropped += 1
            return
        self._items.append(({k: np.array(v, copy=True) for k, v in feeds.items()}, dict(outputs),
                            dict(meta) if meta else None))
        self._wake()

    # -- mirror thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        if self.nice:
            # Linux: a thread's own id takes its own priority; the serving threads keep theirs.
            with contextlib.suppress(OSError, AttributeError):
                me = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + self.nice))
        while True:
            if not self._items:
                os.read(self._wake_r, 4096)  # blocks without the GIL until an offer writes
                continue
            item = self._items.popleft()
            if item is _STOP:
                return
            if not self._active:
                continue
            self._compare(*item)

    def _compare(self, feeds: Mapping[str, np.ndarray], served_outputs: Mapping[str, np.ndarray],
                 meta: Mapping[str, Any] | None) -> None:
        started = time.perf_counter()
        try:
            if self.process is not None:
                took, figures = self.process.compare(feeds, served_outputs, meta)
            else:
                outputs = self.candidate.worker.run_sync(feeds)
                took = time.perf_counter() - started
                self.comparator.add(served_outputs, outputs, meta)
                figures = (self.comparator.metrics(), self.comparator.agreement, self.comparator.samples)
        except Exception as exc:  # noqa: BLE001 - a shadow's failure is a figure, never the serving path's
            self._failed(str(exc))
            return
        self._record(took, figures)

    def _failed(self, reason: str) -> None:
        self.errors += 1
        if self.last_error is None or self.errors % 100 == 1:
            log.warning("shadow.sample_failed", model=self.name, version=self.candidate.version, reason=reason[:300])
        self.last_error = reason[:300]

    def _record(self, took: float, figures: tuple[dict[str, float | None], float | None, int]) -> None:
        self._latencies.append(took)
        # Readers (status, /metrics) take this snapshot: they never wait for this thread.
        self._figures = figures
        self._judge()

    def _judge(self) -> None:
        """The policy's verdict once it has ``min_samples``: discard below ``min_agreement`` or over
        ``max_latency_ratio``, else promote. Handed to ``decide`` once."""
        policy = self.policy
        _metrics, agreement, samples = self._figures
        if not policy.automatic or self.decision is not None or samples < policy.min_samples:
            return
        ratio = self.latency_ratio()
        shown = None if agreement is None else round(agreement, 4)
        action, reason = "promote", f"agreement {shown} after {samples} samples"
        if policy.min_agreement is not None and (agreement is None or agreement < policy.min_agreement):
            action, reason = "discard", (f"agreement {agreement if agreement is None else round(agreement, 4)} is "
                                         f"under min_agreement {policy.min_agreement}")
        elif policy.max_latency_ratio is not None and ratio is not None and ratio > policy.max_latency_ratio:
            action = "discard"
            reason = f"latency ratio {ratio:.2f} is over max_latency_ratio {policy.max_latency_ratio}"
        if ratio is not None:
            reason += f" (latency ratio {ratio:.2f})" if action == "promote" else ""
        self.decision = {"action": action, "reason": reason, "by": "policy"}
        log.info("shadow.decided", model=self.name, version=self.candidate.version, action=action, reason=reason)
        self.decide(self.name, action, reason)

    # -- reading (any thread) ---------------------------------------------------------------------
    def _serving_times(self) -> list[float]:
        times = list(self.serving.stats.compute_times)
        return times[-1024:]

    def latency_ratio(self) -> float | None:
        """Shadow p50 over serving p50 (runtime-call times)."""
        shadow, serving = _percentiles(list(self._latencies))["p50"], _percentiles(self._serving_times())["p50"]
        if shadow is None or not serving:
            return None
        return shadow / serving

    def describe(self) -> dict[str, Any]:
        metrics, agreement, samples = self._figures
        shadow_times = list(self._latencies)
        ratio = self.latency_ratio()
        return {
            "model": self.name, "version": self.candidate.version, "serving_version": self.serving.version,
            "state": self.state, "kind": self.comparator.kind, "deployment": self.deployment,
            "started_at": self.started_at, "sample": self.policy.sample, "policy": self.policy.to_dict(),
            "offered": self.offered, "compared": samples, "dropped": self.dropped, "errors": self.errors,
            "queue_depth": len(self._items), "last_error": self.last_error,
            "agreement": None if agreement is None else round(agreement, 6), "metrics": metrics,
            "latency_ms": {"serving": _percentiles(self._serving_times()), "shadow": _percentiles(shadow_times)},
            "latency_ratio": None if ratio is None else round(ratio, 4),
            "delegate": self.process.delegate if self.process is not None else self.candidate.session.delegate,
            "process": self.process.proc.pid if self.process is not None else None, "decision": self.decision,
            "scheduling": (f"{self.process.scheduling}{', paused while serving' if self.yield_to_serving else ''}"
                           if self.process is not None else f"thread, nice +{self.nice}"),
        }

    def summary(self) -> dict[str, Any]:
        """The birth message's line: which candidate, against which version, how it agrees so far."""
        _metrics, agreement, samples = self._figures
        return {"model": self.name, "version": self.candidate.version, "serving_version": self.serving.version,
                "state": self.state, "kind": self.comparator.kind, "compared": samples,
                "agreement": None if agreement is None else round(agreement, 4)}


class Shadows:
    """The running shadows by model name (one per model). Changed on the event loop; read anywhere."""

    def __init__(self) -> None:
        self._by_model: dict[str, Shadow] = {}

    def add(self, shadow: Shadow) -> None:
        self._by_model = {**self._by_model, shadow.name: shadow}

    def pop(self, name: str) -> Shadow | None:
        by_model = dict(self._by_model)
        shadow = by_model.pop(name, None)
        self._by_model = by_model
        return shadow

    def get(self, name: str) -> Shadow | None:
        return self._by_model.get(name)

    def all(self) -> list[Shadow]:
        return sorted(self._by_model.values(), key=lambda s: s.name)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.all()]

    def summary(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self.all()]
