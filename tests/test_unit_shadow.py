"""Agreement metrics (``agent.models.agreement``) on hand-made answers, and the mirror
(``agent.models.shadow.Shadow``) on real ONNX sessions: sampling, a bounded queue that drops,
the policy's verdicts, and the serving path never waiting for the shadow."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import RuntimeSection
from agent.core.metrics import Metrics
from agent.models.agreement import (
    ClassificationComparator,
    EventComparator,
    RawComparator,
    make_comparator,
    match_boxes,
    match_events,
)
from agent.models.registry import ModelRegistry
from agent.models.shadow import Shadow, ShadowPolicy
from agent.models.store import ModelVersion
from agent.runtimes.base import TensorSpec
from tests.conftest import wait_for
from tests.shadow_models import classifier, inputs, quantized

pytestmark = pytest.mark.timeout(60)


def spec(name: str, shape: tuple[int | None, ...]) -> TensorSpec:
    return TensorSpec(name, np.dtype(np.float32), shape)


# -- agreement ---------------------------------------------------------------------------------------------------


def test_classification_top1_and_mean_abs_dp() -> None:
    c = ClassificationComparator("p")
    c.add({"p": np.array([[0.7, 0.2, 0.1]])}, {"p": np.array([[0.6, 0.3, 0.1]])})
    c.add({"p": np.array([[0.4, 0.5, 0.1]])}, {"p": np.array([[0.5, 0.4, 0.1]])})
    assert c.agreement == 0.5
    assert c.metrics()["mean_abs_dp"] == pytest.approx((0.1 + 0.1 + 0.1 + 0.1) / 6, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        c.add({"p": np.zeros((1, 3))}, {"p": np.zeros((1, 4))})
    assert c.samples == 2


def test_classification_from_the_manifest_applies_softmax() -> None:
    c = make_comparator({"type": "classification", "softmax": True}, [spec("logits", (None, 3))],
                        [spec("logits", (None, 3))])
    assert c.kind == "classification"
    c.add({"logits": np.array([[2.0, 0.0, 0.0]])}, {"logits": np.array([[2.0, 0.0, 0.0]])})
    assert c.agreement == 1.0 and c.metrics()["mean_abs_dp"] == 0.0


def test_box_matching_f1_and_iou() -> None:
    a = [{"box": [0, 0, 10, 10], "label": "face"}, {"box": [20, 20, 30, 30], "label": "face"}]
    b = [{"box": [1, 0, 11, 10], "label": "face"}, {"box": [50, 50, 60, 60], "label": "face"},
         {"box": [20, 20, 30, 30], "label": "cat"}]
    ious = match_boxes(a, b)
    assert ious == [pytest.approx(90 / 110)]  # the shifted face; the cat is another label, the far one no match
    assert match_boxes([], b) == []


def test_detection_comparator_with_the_real_post_processing() -> None:
    post = {"type": "detection", "format": "yolo", "layout": "v8", "score_threshold": 0.5}
    outputs = [spec("out", (1, 5, 3))]
    c = make_comparator(post, outputs, outputs, ["thing"])

    def yolo(*boxes: tuple[float, float, float, float, float]) -> dict[str, np.ndarray]:
        x = np.zeros((1, 5, 3), np.float32)
        for i, b in enumerate(boxes):
            x[0, :, i] = b
        return {"out": x}

    c.add(yolo((10, 10, 10, 10, 0.9), (50, 50, 10, 10, 0.9)), yolo((11, 10, 10, 10, 0.9), (90, 90, 10, 10, 0.9)))
    c.add(yolo(), yolo())  # nothing on either side agrees fully
    m = c.metrics()
    assert c.kind == "detection" and m["f1_iou50"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["mean_iou"] == pytest.approx(90 / 110, rel=1e-4)


def test_events_match_within_100_ms() -> None:
    a = [{"event": "speech_start", "t": 1.00}, {"event": "speech_end", "start": 1.0, "end": 2.0}]
    assert match_events(a, [{"event": "speech_start", "t": 1.08}, {"event": "speech_end", "start": 1.05,
                                                                   "end": 2.09}]) == 2
    assert match_events(a, [{"event": "speech_start", "t": 1.15}]) == 0
    assert match_events(a, [{"event": "wake_word", "t": 1.0}]) == 0


def test_vad_comparator_uses_each_versions_post_processing() -> None:
    out = [spec("output", (None, 1))]
    c = make_comparator({"type": "vad", "min_speech_ms": 0, "min_silence_ms": 0, "speech_pad_ms": 0}, out, out)
    assert isinstance(c, EventComparator)
    # 32 ms windows: speech from 0.32 s for the serving version, 0.352 s for the shadow (one window late).
    for i in range(40):
        t = i * 0.032
        meta = {"start": t, "end": t + 0.032}
        c.add({"output": np.array([[0.9 if i >= 10 else 0.1]])}, {"output": np.array([[0.9 if i >= 11 else 0.1]])},
              meta)
    m = c.metrics()
    assert m["events_serving"] == 1 and m["events_shadow"] == 1 and m["event_f1"] == 1.0  # 32 ms apart: agree
    assert m["decision_agreement"] == pytest.approx(39 / 40)
    bare = make_comparator({"type": "vad"}, out, out)  # a bare predict has no times: decisions only
    bare.add({"output": np.array([[0.9]])}, {"output": np.array([[0.2]])})
    assert bare.agreement == 0.0 and bare.metrics()["event_f1"] is None


def test_raw_max_abs_and_cosine() -> None:
    c = RawComparator()
    c.add({"a": np.array([1.0, 0.0]), "b": np.array([3.0])}, {"a": np.array([0.0, 1.0]), "b": np.array([3.5])})
    m = c.metrics()
    assert m["max_abs_diff"] == 1.0 and m["cosine"] == pytest.approx((0.0 + 1.0) / 2)
    assert make_comparator(None, [], []).kind == "raw"
    with pytest.raises(KeyError):
        c.add({"a": np.zeros(1)}, {"z": np.zeros(1)})


# -- the mirror on real sessions ------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    """The float classifier serving and its int8 quantization as the candidate, loaded by the real registry."""
    registry = ModelRegistry(tmp_path, model_options={}, versions_policy="latest", runtime=RuntimeSection(),
                             delegates={}, threads=1, metrics=Metrics())
    f = classifier(tmp_path / "clf" / "1" / "model.onnx")
    q = quantized(f, tmp_path / "clf" / "2" / "model.onnx")
    loaded = []
    for version, path in ((1, f), (2, q)):
        served = registry._load_session(ModelVersion("clf", version, path.parent, path, "onnx"), None, 1)
        loaded.append(served)
    yield loaded
    for m in loaded:
        m.close()


def test_mirror_compares_and_the_policy_promotes(pair: Any) -> None:
    serving, candidate = pair
    decisions: list[tuple[str, str, str]] = []
    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"),
                    ShadowPolicy(sample=1.0, min_samples=50, min_agreement=0.9), decide=lambda *d: decisions.append(d),
                    queue_size=1000, nice=0)
    shadow.start()
    try:
        assert serving.mirror == shadow.offer
        for row in inputs(60):
            shadow.offer({"input": row}, serving.worker.run_sync({"input": row}))
        wait_for(lambda: decisions, 10, "a decision")
        assert decisions == [("clf", "promote", decisions[0][2])] and "agreement" in decisions[0][2]
        d = shadow.describe()
        assert d["compared"] >= 50 and d["agreement"] >= 0.9 and d["dropped"] == 0 and d["decision"]["by"] == "policy"
        assert d["latency_ms"]["shadow"]["p50"] > 0
    finally:
        shadow.stop()
    assert serving.mirror is None


def test_policy_discards_on_latency_and_samples_are_drawn(pair: Any) -> None:
    serving, candidate = pair
    decisions: list[tuple[str, str, str]] = []
    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"),
                    ShadowPolicy(sample=0.5, min_samples=20, max_latency_ratio=1e-6),
                    decide=lambda *d: decisions.append(d), queue_size=1000, nice=0)
    serving.stats.executed(1, 1000)  # the serving version's runtime calls so far: 1 µs (a ratio over 1e-6)
    shadow.start()
    try:
        for row in inputs(400):
            shadow.offer({"input": row}, serving.worker.run_sync({"input": row}))
        wait_for(lambda: decisions, 10, "a decision")
        assert decisions[0][1] == "discard" and "latency ratio" in decisions[0][2]
        assert 120 < shadow.offered < 280  # about half of 400 offered were taken
    finally:
        shadow.stop()


def test_a_busy_shadow_drops_and_never_holds_the_caller(pair: Any) -> None:
    serving, candidate = pair
    gate = threading.Event()
    real_run = candidate.worker.run_sync

    def slow(feeds: Any) -> Any:
        gate.wait(10)
        return real_run(feeds)

    candidate.worker.run_sync = slow  # the shadow is stuck on its first sample
    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"), ShadowPolicy(sample=1.0),
                    decide=lambda *d: None, queue_size=4, nice=0)
    shadow.start()
    try:
        outputs = serving.worker.run_sync({"input": inputs(1)[0]})
        for row in inputs(100):  # returns at once although the shadow is stuck: the queue is bounded
            shadow.offer({"input": row}, outputs)
        assert shadow.offered == 100 and shadow.dropped >= 95  # 4 queued, at most 1 taken by the thread
        gate.set()
        wait_for(lambda: shadow.comparator.samples == 100 - shadow.dropped, 10, "the queued samples")
    finally:
        gate.set()
        shadow.stop()


def _child(pair: Any, **options: Any) -> Any:
    """The candidate of ``pair`` in a shadow process (``options``: ShadowProcess's, e.g. ``nice``)."""
    from agent.models.shadow_process import ShadowProcess

    serving, candidate = pair
    return ShadowProcess({"file": str(candidate.source.file), "runtime": "onnx", "delegates": [], "threads": 1,
                          "post": {"type": "classification"}, "labels": None,
                          "serving_outputs": list(serving.outputs), "options": {}}, **options)


def _state(pid: int) -> str:
    """The process's scheduler state from /proc: "T" while stopped."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_the_shadow_process_is_paused_while_a_serving_call_runs(pair: Any) -> None:
    from agent.models.activity import SERVING
    from agent.models.worker import Worker
    from tests.fakes import FakeSession

    serving, candidate = pair
    proc = _child(pair)
    pid = proc.proc.pid
    seen: list[str] = []

    expect_stop = False

    class Probe(FakeSession):
        def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            if expect_stop:
                seen.append(wait_for(lambda: _state(pid) == "T" and "T", 10, "the child stopped"))
            else:
                seen.append(_state(pid))
            return super()._run(feeds)

    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"), ShadowPolicy(sample=1.0),
                    decide=lambda *d: None, nice=0, process=proc)
    worker = Worker("probe", Probe())
    worker._call({"x": np.zeros((1, 4), np.float32)}, False, 1, [None])  # no shadow started: nothing paused
    assert seen and seen[0] != "T", seen
    seen.clear()
    expect_stop = True
    shadow.start()
    try:
        result = worker._call({"x": np.zeros((1, 4), np.float32)}, False, 1, [None])
        assert not isinstance(result, BaseException), result
        assert seen == ["T"]  # stopped for the whole serving call
        wait_for(lambda: _state(pid) != "T", 10, "the child to continue after the call")
        took, _figures = proc.compare({"input": inputs(1)[0]}, serving.worker.run_sync({"input": inputs(1)[0]}), None)
        assert took > 0  # and it works between serving calls
    finally:
        shadow.stop()
        worker.stop()
    assert not SERVING._pausers and proc.proc.poll() is not None


def test_a_paused_child_dies_with_the_agent() -> None:
    """The child is stopped (SIGSTOP) during serving calls: if the agent dies then, the kernel kills it."""
    import subprocess
    import sys

    child = ("from agent.models.shadow_process import _die_with_parent; _die_with_parent(); "
             "import os, signal; os.kill(os.getpid(), signal.SIGSTOP); import time; time.sleep(600)")
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); print(p.pid, flush=True); "
                              "time.sleep(600)"], stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        wait_for(lambda: _state(pid) == "T", 20, "the child stopped")
    finally:
        agent.kill()
        agent.wait()

    def gone() -> bool:
        try:
            return _state(pid) in ("Z", "X")  # reaped, or a zombie of an init that does not reap
        except FileNotFoundError:
            return True

    wait_for(gone, 10, "the paused child to die with its parent")


def test_on_an_event_loop_samples_go_through_the_loop_with_no_thread(pair: Any) -> None:
    """With a process, the loop writes samples to the child without blocking and reads its figures:
    the agent runs no shadow thread (one competing for the GIL slowed serving's tail)."""
    import asyncio

    serving, candidate = pair
    proc = _child(pair)
    decisions: list[tuple[str, str, str]] = []
    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"),
                    ShadowPolicy(sample=1.0, min_samples=60, min_agreement=0.9), decide=lambda *d: decisions.append(d),
                    queue_size=1000, nice=0, process=proc)
    rows = inputs(80)
    answers = [serving.worker.run_sync({"input": row}) for row in rows]

    async def run() -> None:
        shadow.start()
        assert not shadow._thread.is_alive()
        for row, answer in zip(rows[:40], answers[:40], strict=True):  # from the loop's own thread
            shadow.offer({"input": row}, answer)
        await asyncio.to_thread(lambda: [shadow.offer({"input": r}, a)  # and from another one
                                         for r, a in zip(rows[40:], answers[40:], strict=True)])
        deadline = asyncio.get_running_loop().time() + 30
        while not decisions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(shadow.stop)

    try:
        asyncio.run(run())
    finally:
        shadow.stop()
    assert decisions and decisions[0][1] == "promote", decisions  # int8 copy vs float: they agree
    d = shadow.describe()
    assert d["compared"] >= 60 and d["errors"] == 0 and d["offered"] == 80 and d["dropped"] == 0
    assert d["latency_ms"]["shadow"]["p50"] is not None
    assert proc.proc.poll() is not None  # stopped with the shadow


def test_on_an_event_loop_a_dead_child_makes_every_later_sample_an_error(pair: Any) -> None:
    import asyncio

    serving, candidate = pair
    proc = _child(pair)
    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"), ShadowPolicy(sample=1.0),
                    decide=lambda *d: None, queue_size=1000, nice=0, process=proc)
    row = inputs(1)[0]
    answer = serving.worker.run_sync({"input": row})

    async def run() -> None:
        shadow.start()
        shadow.offer({"input": row}, answer)
        deadline = asyncio.get_running_loop().time() + 20
        while shadow.describe()["compared"] < 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        proc.proc.kill()
        await asyncio.to_thread(proc.proc.wait)
        for _ in range(5):
            shadow.offer({"input": row}, answer)
            await asyncio.sleep(0.05)
        while shadow.errors < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(shadow.stop)

    asyncio.run(run())
    d = shadow.describe()
    assert d["compared"] == 1 and d["errors"] == 5, d
    assert "gone" in d["last_error"], d


def test_the_shadow_process_runs_and_compares_in_its_own_process(pair: Any) -> None:
    from agent.errors import AgentError

    serving, candidate = pair
    proc = _child(pair, nice=5)
    decisions: list[tuple[str, str, str]] = []
    shadow = Shadow(serving, candidate, ClassificationComparator("probabilities"),
                    ShadowPolicy(sample=1.0, min_samples=40, min_agreement=0.9), decide=lambda *d: decisions.append(d),
                    queue_size=1000, nice=0, process=proc)
    shadow.start()
    try:
        assert proc.proc.pid != 0 and proc.delegate == "CPUExecutionProvider"
        # Linux's idle class: the child runs only on CPU time serving does not want.
        assert os.sched_getscheduler(proc.proc.pid) == os.SCHED_IDLE and proc.scheduling == "idle"
        for row in inputs(50):
            shadow.offer({"input": row}, serving.worker.run_sync({"input": row}))
        wait_for(lambda: decisions, 20, "a decision from the child's figures")
        d = shadow.describe()
        assert d["process"] == proc.proc.pid and d["kind"] == "classification" and d["compared"] >= 40
        assert d["scheduling"] == "idle, paused while serving"
        assert d["agreement"] >= 0.9 and d["metrics"]["top1_agreement"] == d["agreement"]
        with pytest.raises(AgentError, match="input"):  # a failed sample is reported, the child lives on
            proc.compare({"wrong": np.zeros((1, 64), np.float32)}, {"probabilities": np.zeros((1, 10))}, None)
        took, figures = proc.compare({"input": inputs(1)[0]}, serving.worker.run_sync({"input": inputs(1)[0]}), None)
        assert took > 0 and figures[2] > d["compared"] - 1
    finally:
        shadow.stop()
    assert proc.proc.poll() is not None  # stopped with the shadow
