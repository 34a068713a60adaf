"""Dynamic batching: ``BatchLayout`` on tensor specs, and ``Worker`` coalescing real Silero VAD
requests on its inference thread. Every batched answer is checked against the same request
run alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.config import BatchingSection
from agent.errors import InferenceError, InvalidInputError
from agent.models.batching import BatchLayout, batch_axis
from agent.models.worker import Outputs, Worker
from agent.runtimes import Session, TensorSpec
from agent.runtimes.litert import LiteRTBackend
from agent.runtimes.onnx import OnnxBackend

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
MakeWorker = Callable[..., Worker]
SAMPLES_PER_ROW = {16000: 576, 8000: 288}  # 64/32 context samples + 512/256 new ones


def vad_feeds(rows: int, seed: int, sr: int = 16000, length: int | None = None) -> dict[str, np.ndarray]:
    """A noisy tone per row and a random LSTM state, as a streaming client would send them."""
    rng = np.random.default_rng(seed)
    n = length or SAMPLES_PER_ROW[sr]
    t = np.arange(n) / sr
    audio = 0.4 * np.sin(2 * np.pi * rng.uniform(150, 900, (rows, 1)) * t) + 0.05 * rng.standard_normal((rows, n))
    return {
        "input": audio.astype(np.float32),
        "state": (0.1 * rng.standard_normal((2, rows, 128))).astype(np.float32),
        "sr": np.array(sr, np.int64),
    }


def assert_same(got: Outputs, want: Outputs) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


def photo(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((128, 128), Image.Resampling.BILINEAR)
    return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


@pytest.fixture(scope="module")
def alone(samples: dict[str, Path]) -> Session:
    """A separate Silero session for the reference answers (sessions are one-thread-only)."""
    return OnnxBackend().load(samples["silero_vad"], [])


@pytest.fixture
def silero(samples: dict[str, Path]) -> Session:
    return OnnxBackend().load(samples["silero_vad"], [])


@pytest.fixture
def make_worker() -> Iterator[MakeWorker]:
    workers: list[Worker] = []

    def make(
        session: Session, batching: BatchingSection | None = None, sizes: list[int] | None = None, name: str = "vad",
        inline_max_us: int = 0, inline_max_bytes: int = 256 * 1024,
    ) -> Worker:
        worker = Worker(name, session, batching, on_batch=None if sizes is None else sizes.append,
                        inline_max_us=inline_max_us, inline_max_bytes=inline_max_bytes)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.stop()


def batching(**kw: object) -> BatchingSection:
    return BatchingSection(enabled=True, **kw)  # type: ignore[arg-type]


#: A queue delay far beyond every deadline in these tests (the config caps it at 1 s, so it is built
#: without validation): "does not wait" is then shown by answering before the deadline, with no bound
#: on speed, and "waits" by a lower bound on a short delay. Load can only make a test slower.
LONG_DELAY_US = 120_000_000
DEADLINE_S = 60


def long_delay(**kw: object) -> BatchingSection:
    return BatchingSection.model_construct(**{**batching(**kw).model_dump(), "max_queue_delay_us": LONG_DELAY_US})


class GatedSession:
    """A session whose ``run`` waits while the gate is closed: requests queue up behind a running one
    for certain, however the threads are scheduled."""

    def __init__(self, inner: Session) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def run(self, feeds: dict[str, np.ndarray], *, raw_outputs: bool = False) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(DEADLINE_S), "the gate stayed closed"
        return self._inner.run(feeds, raw_outputs=raw_outputs)


def infer_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("infer-")}


# -- BatchLayout on specs --------------------------------------------------------------------
def test_batch_axis_from_specs() -> None:
    assert batch_axis(TensorSpec("x", F32, (3, None, 8))) == 1  # the only dynamic axis
    assert batch_axis(TensorSpec("x", F32, (None, None))) == 0  # several: axis 0
    assert batch_axis(TensorSpec("x", F32, (4, None, None))) is None  # several, not 0: unknown
    assert batch_axis(TensorSpec("x", F32, (1, 128, 128, 3))) is None
    assert batch_axis(TensorSpec("sr", I64, ())) is None


def test_fixed_batch_models_get_no_layout(samples: dict[str, Path]) -> None:
    faces = LiteRTBackend().load(samples["face_detection"], [])
    assert BatchLayout.for_model(faces.inputs, faces.outputs) is None
    scalar_only = [TensorSpec("sr", I64, ()), TensorSpec("x", F32, (1, 4))]
    assert BatchLayout.for_model(scalar_only, [TensorSpec("y", F32, (1, 4))]) is None


def test_silero_layout_from_metadata(silero: Session) -> None:
    layout = BatchLayout.for_model(silero.inputs, silero.outputs)
    assert layout is not None
    assert layout.input_axes == {"input": 0, "state": 1, "sr": None}
    assert layout.output_candidates == {"output": {0}, "stateN": {0, 1, 2}}
    assert not layout.unusable


def test_request_size_and_key(silero: Session) -> None:
    layout = BatchLayout.for_model(silero.inputs, silero.outputs)
    assert layout is not None
    a, b = vad_feeds(1, seed=1), vad_feeds(3, seed=2)
    assert layout.request_size(a) == 1
    assert layout.request_size(b) == 3
    assert layout.key(a) == layout.key(b)  # same sr, same trailing shapes, any row count

    mismatched = {**b, "state": a["state"]}  # 3 rows of audio, 1 row of state
    assert layout.request_size(mismatched) is None

    other_sr = vad_feeds(1, seed=1, sr=8000, length=576)
    assert layout.key(other_sr) != layout.key(a)  # unbatched scalars must be equal to coalesce
    shorter = vad_feeds(1, seed=1, length=288)
    assert layout.key(shorter) != layout.key(a)  # different trailing shape
    as_int32 = {**a, "sr": a["sr"].astype(np.int32)}
    assert layout.key(as_int32) != layout.key(a)
    big_unbatched = {**a, "sr": np.full(65, 16000, np.int64)}
    assert layout.key(big_unbatched) is None


def test_merge_and_split_round_trip(silero: Session) -> None:
    layout = BatchLayout.for_model(silero.inputs, silero.outputs)
    assert layout is not None
    parts = [vad_feeds(rows, seed=rows) for rows in (1, 2, 3)]

    merged = layout.merge(parts)

    assert merged["input"].shape == (6, 576)
    assert merged["state"].shape == (2, 6, 128)
    assert merged["sr"] == 16000
    np.testing.assert_array_equal(merged["input"][1:3], parts[1]["input"])
    np.testing.assert_array_equal(merged["state"][:, 3:], parts[2]["state"])

    by_axis = BatchLayout({}, {"input": {0}, "state": {1}})
    split = by_axis.split({"input": merged["input"], "state": merged["state"]}, [1, 2, 3])
    for part, original in zip(split, parts, strict=True):
        np.testing.assert_array_equal(part["input"], original["input"])
        np.testing.assert_array_equal(part["state"], original["state"])


def test_learn_narrows_ambiguous_outputs_from_real_runs(silero: Session, alone: Session) -> None:
    layout = BatchLayout.for_model(silero.inputs, silero.outputs)
    assert layout is not None
    two, three = vad_feeds(2, seed=5), vad_feeds(3, seed=6)

    # stateN is [2, N, 128]: with N == 2 axes 0 and 1 both fit.
    assert layout.learn(silero.run(two), 2) is False
    assert layout.output_candidates["stateN"] == {0, 1}
    assert layout.learn(silero.run(three), 3) is True
    assert layout.output_candidates == {"output": {0}, "stateN": {1}}

    merged = silero.run(layout.merge([two, three]))
    assert layout.learn(merged, 5) is True
    for part, feeds in zip(layout.split(merged, [2, 3]), [two, three], strict=True):
        assert_same(part, alone.run(feeds))


def test_output_batch_axes_override(silero: Session) -> None:
    layout = BatchLayout.for_model(silero.inputs, silero.outputs, {"stateN": 1})
    assert layout is not None
    assert layout.output_candidates == {"output": {0}, "stateN": {1}}
    assert layout.learn(silero.run(vad_feeds(2, seed=1)), 2) is True  # no ambiguity left at N == 2

    wrong = BatchLayout.for_model(silero.inputs, silero.outputs, {"stateN": 2})
    assert wrong is not None
    assert wrong.learn(silero.run(vad_feeds(2, seed=1)), 2) is False
    assert wrong.unusable  # 128 is never the batch size: batching must stop, not guess


# -- Worker with real Silero -----------------------------------------------------------------
async def test_concurrent_requests_are_batched_and_correct(
    silero: Session, alone: Session, make_worker: MakeWorker
) -> None:
    sizes: list[int] = []
    worker = make_worker(silero, batching(max_batch_size=8, max_queue_delay_us=20_000), sizes)
    assert worker.batching_active
    requests = [vad_feeds(1, seed=i) for i in range(16)]

    results = await asyncio.wait_for(asyncio.gather(*(worker.submit(f) for f in requests)), 20)

    for feeds, got in zip(requests, results, strict=True):
        assert_same(got, alone.run(feeds))
    assert max(sizes) > 1
    assert max(sizes) <= 8
    assert worker.layout is not None and worker.layout.output_candidates["stateN"] == {1}


async def test_mixed_sizes_and_sample_rates_in_flight(silero: Session, alone: Session, make_worker: MakeWorker) -> None:
    sizes: list[int] = []
    worker = make_worker(silero, batching(max_batch_size=8, max_queue_delay_us=20_000), sizes)
    requests = [vad_feeds(1 + i % 3, seed=100 + i, sr=(16000, 8000)[i % 2]) for i in range(18)]

    results = await asyncio.wait_for(asyncio.gather(*(worker.submit(f) for f in requests)), 20)

    for feeds, got in zip(requests, results, strict=True):
        assert_same(got, alone.run(feeds))
    assert max(sizes) > 1
    assert max(sizes) <= 8


async def test_preferred_batch_size_dispatches_early(silero: Session, alone: Session, make_worker: MakeWorker) -> None:
    delay_s = 0.5
    sizes: list[int] = []
    # Not adaptive: without the preferred size the batch would wait the whole (long) delay for eight.
    eager = make_worker(silero, long_delay(max_batch_size=8, preferred_batch_sizes=(4,), adaptive_delay=False), sizes)
    requests = [vad_feeds(1, seed=200 + i) for i in range(4)]

    results = await asyncio.wait_for(asyncio.gather(*(eager.submit(f) for f in requests)), DEADLINE_S)

    assert sizes == [4]
    for feeds, got in zip(requests, results, strict=True):
        assert_same(got, alone.run(feeds))

    # Without a preferred size the same four requests wait out the queue delay.
    patient_sizes: list[int] = []
    patient = make_worker(
        OnnxBackend().load(silero.path, []),
        batching(max_batch_size=8, max_queue_delay_us=int(delay_s * 1e6), adaptive_delay=False),
        patient_sizes,
        name="vad-patient",
    )
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(patient.submit(f) for f in requests)), 10)
    assert time.perf_counter() - start >= delay_s * 0.9
    assert patient_sizes == [4]


async def test_adaptive_delay_waits_only_for_as_many_requests_as_last_time(
    silero: Session, alone: Session, make_worker: MakeWorker
) -> None:
    delay_s = 0.5
    sizes: list[int] = []
    gated = GatedSession(silero)
    worker = make_worker(gated, long_delay(max_batch_size=8), sizes)  # type: ignore[arg-type]

    async def timed(*groups: list[dict[str, np.ndarray]], gap: float = 0.0) -> float:
        """Seconds until every answer; a wait for requests that never come outlasts the deadline."""
        start = time.perf_counter()
        pending = []
        for i, group in enumerate(groups):
            if i:
                await asyncio.sleep(gap)
            pending += [worker.submit(f) for f in group]
        results = await asyncio.wait_for(asyncio.gather(*pending), DEADLINE_S)
        for feeds, got in zip([f for g in groups for f in g], results, strict=True):
            assert_same(got, alone.run(feeds))
        return time.perf_counter() - start

    # A lone client does not wait; four requests queued behind it (held at the gate) go as one batch at once.
    gated.gate.clear()
    lone = worker.submit(vad_feeds(1, seed=300))
    assert await asyncio.to_thread(gated.entered.wait, DEADLINE_S)
    queued = [vad_feeds(1, seed=301 + i) for i in range(4)]
    pending = [worker.submit(f) for f in queued]
    gated.gate.set()
    results = await asyncio.wait_for(asyncio.gather(lone, *pending), DEADLINE_S)
    for feeds, got in zip([vad_feeds(1, seed=300), *queued], results, strict=True):
        assert_same(got, alone.run(feeds))
    assert sizes == [1, 4]
    # Two now, two 100 ms later: the batch waits for the other two, as the last one had four.
    elapsed = await timed([vad_feeds(1, seed=310), vad_feeds(1, seed=311)],
                          [vad_feeds(1, seed=312), vad_feeds(1, seed=313)], gap=0.1)
    assert elapsed >= 0.09, elapsed
    assert sizes == [1, 4, 4]
    # Concurrency drops: one request waits out the delay once (a short one here), then lone requests go at once.
    worker.batching = batching(max_batch_size=8, max_queue_delay_us=int(delay_s * 1e6))
    assert await timed([vad_feeds(1, seed=320)]) >= delay_s * 0.9
    worker.batching = long_delay(max_batch_size=8)
    await timed([vad_feeds(1, seed=321)])
    assert sizes == [1, 4, 4, 1, 1]


async def test_outputs_without_a_batch_axis_turn_batching_off(
    silero: Session, alone: Session, make_worker: MakeWorker
) -> None:
    """A wrong ``output_batch_axes`` leaves an output no usable axis: answers stay right and
    later requests stop waiting out the queue delay for batches that will never be formed."""
    sizes: list[int] = []
    config = long_delay(max_batch_size=8, output_batch_axes={"stateN": 2})
    worker = make_worker(silero, config, sizes)
    requests = [vad_feeds(1, seed=600 + i) for i in range(4)]

    results = await asyncio.wait_for(asyncio.gather(*(worker.submit(f) for f in requests)), DEADLINE_S)

    for feeds, got in zip(requests, results, strict=True):
        assert_same(got, alone.run(feeds))
    assert worker.layout is not None and worker.layout.unusable
    assert worker.batching_active is False
    lone = await asyncio.wait_for(worker.submit(vad_feeds(1, seed=610)), DEADLINE_S)  # no batching wait
    assert_same(lone, alone.run(vad_feeds(1, seed=610)))
    assert sizes == [1, 1, 1, 1, 1]  # every run is counted, each alone


async def test_fixed_batch_model_is_never_batched(samples: dict[str, Path], make_worker: MakeWorker) -> None:
    reference = LiteRTBackend().load(samples["face_detection"], [])
    sizes: list[int] = []
    worker = make_worker(
        LiteRTBackend().load(samples["face_detection"], []),
        batching(max_batch_size=8, max_queue_delay_us=20_000),
        sizes,
        name="faces",
    )
    assert worker.batching_active is False
    assert worker.layout is None
    images = [photo(samples[name]) for name in ("astronaut", "coffee", "astronaut", "coffee")]

    results = await asyncio.wait_for(asyncio.gather(*(worker.submit({"input": x}) for x in images)), 20)

    assert sizes == [1, 1, 1, 1]
    for image, got in zip(images, results, strict=True):
        assert got["classificators"].shape == (1, 896, 1)
        assert_same(got, reference.run({"input": image}))
    assert results[0]["classificators"].max() > 0 > results[1]["classificators"].max()  # face, no face


async def test_a_failing_request_does_not_fail_the_others(
    silero: Session, alone: Session, make_worker: MakeWorker
) -> None:
    """Silero's 8 kHz branch fails at runtime on 576-sample rows (its LSTM gets a 5-D input).

    Such a request has a different key (``sr``) from the 16 kHz ones, so it is queued among them
    but never merged with them: no real model fails on content alone, which is what a bad row
    inside one merged batch would need.
    """
    bad = vad_feeds(1, seed=300, sr=8000, length=576)
    with pytest.raises(InferenceError, match="onnx inference failed"):
        alone.run(bad)
    sizes: list[int] = []
    worker = make_worker(silero, batching(max_batch_size=8, max_queue_delay_us=20_000), sizes)
    good = [vad_feeds(1 + i % 2, seed=310 + i) for i in range(6)]
    requests = [*good[:3], bad, *good[3:]]

    results = await asyncio.wait_for(asyncio.gather(*(worker.submit(f) for f in requests), return_exceptions=True), 20)

    # The good ones ran first, so the worker knows an input the model answers: the bad request is
    # the client's fault (400), not a runtime failure (agent.models.probe).
    assert isinstance(results[3], InvalidInputError)
    for feeds, got in zip(good, [*results[:3], *results[4:]], strict=True):
        assert not isinstance(got, BaseException), got
        assert_same(got, alone.run(feeds))
    assert max(sizes) > 1


async def test_cancelled_requests_are_skipped(silero: Session, alone: Session, make_worker: MakeWorker) -> None:
    sizes: list[int] = []
    gated = GatedSession(silero)
    worker = make_worker(gated, batching(max_batch_size=8, max_queue_delay_us=0), sizes)  # type: ignore[arg-type]
    gated.gate.clear()
    busy = worker.submit(vad_feeds(2000, seed=400))  # held at the gate: the thread stays busy
    assert await asyncio.to_thread(gated.entered.wait, DEADLINE_S)
    assert not busy.done()
    # Queued while the thread is busy: one cancelled job comes off the queue first, the other
    # while the worker gathers a batch behind ``first``.
    gone = worker.submit(vad_feeds(3, seed=402))
    first = worker.submit(vad_feeds(2, seed=401))
    gone_too = worker.submit(vad_feeds(3, seed=404))
    second = worker.submit(vad_feeds(2, seed=403))
    gone.cancel()
    gone_too.cancel()
    gated.gate.set()

    await asyncio.wait_for(asyncio.gather(busy, first, second), DEADLINE_S)

    assert gone.cancelled() and gone_too.cancelled()
    assert sizes == [2000, 4]  # the 3-row requests never reached the runtime
    assert_same(first.result(), alone.run(vad_feeds(2, seed=401)))
    assert_same(second.result(), alone.run(vad_feeds(2, seed=403)))


async def test_stop_answers_queued_requests_and_ends_the_thread(silero: Session, alone: Session) -> None:
    worker = Worker("vad-stop", silero, long_delay(max_batch_size=8))
    assert "infer-vad-stop" in infer_threads()
    requests = [vad_feeds(1, seed=500 + i) for i in range(3)]
    futures = [worker.submit(f) for f in requests]

    worker.stop(timeout=DEADLINE_S)

    assert "infer-vad-stop" not in infer_threads()  # stop cut the (two-minute) batching wait short
    results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    for feeds, got in zip(requests, results, strict=True):
        assert_same(got, alone.run(feeds))


# -- Inline runs on the caller's thread ------------------------------------------------------
async def test_quick_idle_model_runs_inline(silero: Session, alone: Session, make_worker: MakeWorker) -> None:
    sizes: list[int] = []
    worker = make_worker(silero, None, sizes, inline_max_us=100_000)
    feeds = vad_feeds(1, seed=700)
    assert worker.inline is False  # its speed is unknown until a call has been timed
    assert worker.run_inline(feeds) is None

    worker.run_sync(vad_feeds(1, seed=0))  # warm-up pays the lazy set-up: not a fair timing
    assert worker.inline is False
    await asyncio.wait_for(worker.submit(vad_feeds(1, seed=1)), 10)  # a real request times the model

    assert worker.inline is True
    got = worker.run_inline(feeds)
    assert got is not None
    assert_same(got, alone.run(feeds))
    assert sizes == [1, 1]  # counted like a run on the worker thread (warm-up is not)
    assert_same(await asyncio.wait_for(worker.submit(feeds), 10), got)  # the worker path still serves


async def test_inline_steps_aside_while_the_worker_is_busy(
    silero: Session, alone: Session, make_worker: MakeWorker
) -> None:
    gated = GatedSession(silero)
    worker = make_worker(gated, None, inline_max_us=1_000_000)  # type: ignore[arg-type]
    await asyncio.wait_for(worker.submit(vad_feeds(1, seed=0)), DEADLINE_S)
    gated.entered.clear()
    gated.gate.clear()
    busy = worker.submit(vad_feeds(1, seed=710))  # held at the gate on the worker thread
    queued = worker.submit(vad_feeds(1, seed=711))

    assert await asyncio.to_thread(gated.entered.wait, DEADLINE_S)
    assert worker.run_inline(vad_feeds(1, seed=712)) is None  # the session is in use: never two callers at once
    gated.gate.set()

    await asyncio.wait_for(asyncio.gather(busy, queued), DEADLINE_S)
    assert_same(queued.result(), alone.run(vad_feeds(1, seed=711)))
    assert worker.run_inline(vad_feeds(1, seed=712)) is not None  # idle again


async def test_slow_models_never_run_inline_batching_ones_once_a_turn(
    samples: dict[str, Path], silero: Session, make_worker: MakeWorker
) -> None:
    off = make_worker(OnnxBackend().load(samples["silero_vad"], []), None, name="off", inline_max_us=0)
    slow = make_worker(LiteRTBackend().load(samples["face_detection"], []), None, name="slow", inline_max_us=50)
    batched = make_worker(silero, batching(max_batch_size=8), name="batched", inline_max_us=1_000_000)
    await asyncio.wait_for(asyncio.gather(off.submit(vad_feeds(1, seed=0)), batched.submit(vad_feeds(1, seed=0)),
                                          slow.submit({"input": np.zeros((1, 128, 128, 3), np.float32)})), 10)

    assert [w.inline for w in (off, slow)] == [False, False]
    assert off.run_inline(vad_feeds(1, seed=1)) is None
    # A quick batching model: only the first request of a turn of the event loop runs inline.
    assert batched.run_inline(vad_feeds(1, seed=1)) is not None
    assert batched.run_inline(vad_feeds(1, seed=2)) is None  # same turn: submitted, to be batched
    await asyncio.sleep(0)
    assert batched.run_inline(vad_feeds(1, seed=3)) is not None  # a new turn


async def test_batching_model_runs_a_lone_request_inline_and_batches_the_others(
    silero: Session, alone: Session, make_worker: MakeWorker
) -> None:
    """With batching on, a request that arrives alone in its turn of the event loop runs on the
    loop's thread (nothing to batch it with); requests that arrive together are batched."""
    sizes: list[int] = []
    worker = make_worker(silero, batching(max_batch_size=8, max_queue_delay_us=0), sizes, inline_max_us=1_000_000)
    await asyncio.wait_for(worker.submit(vad_feeds(1, seed=0)), 10)  # times the model
    assert worker.inline is True
    threads: list[str] = []

    def where(outputs: Outputs) -> Outputs:
        threads.append(threading.current_thread().name)
        return outputs

    feeds = vad_feeds(1, seed=740)
    assert_same(await asyncio.wait_for(worker.submit(feeds, then=where), 10), alone.run(feeds))
    assert threads == [threading.current_thread().name]  # inline, on this (the loop's) thread

    threads.clear()
    sizes.clear()
    many = [vad_feeds(1, seed=750 + i) for i in range(6)]
    got = await asyncio.wait_for(asyncio.gather(*(worker.submit(f, then=where) for f in many)), 10)
    for f, g in zip(many, got, strict=True):
        assert_same(g, alone.run(f))
    assert set(threads) == {"infer-vad"} and sum(sizes) == 6 and max(sizes) > 1  # batched on the worker


async def test_only_small_requests_run_inline(silero: Session, alone: Session, make_worker: MakeWorker) -> None:
    """A quick model given a large batch is not quick: a request whose inputs total more than
    ``inline_max_bytes`` goes to the worker thread, and its time does not make the model slow."""
    small, large = vad_feeds(1, seed=730), vad_feeds(64, seed=731)  # 3.3 KB and 213 KB of inputs
    limit = 16 * 1024
    assert sum(v.nbytes for v in small.values()) <= limit < sum(v.nbytes for v in large.values())
    worker = make_worker(silero, None, inline_max_us=1_000_000, inline_max_bytes=limit)
    await asyncio.wait_for(worker.submit(vad_feeds(1, seed=0)), 10)
    assert worker.inline is True

    assert worker.run_inline(large) is None  # submit instead
    assert_same(await asyncio.wait_for(worker.submit(large), 10), alone.run(large))
    got = worker.run_inline(small)
    assert got is not None
    assert_same(got, alone.run(small))

    # A large request (~0.1 s, 6.6 MB) leaves the model's measured speed alone.
    speed = worker._call_s
    await asyncio.wait_for(worker.submit(vad_feeds(2000, seed=732)), 20)
    assert worker._call_s == speed


async def test_inline_failure_raises_to_the_caller(silero: Session, make_worker: MakeWorker) -> None:
    worker = make_worker(silero, None, inline_max_us=1_000_000)
    await asyncio.wait_for(worker.submit(vad_feeds(1, seed=0)), 10)
    with pytest.raises(InvalidInputError, match="onnx inference failed"):  # the first input is known-good
        worker.run_inline(vad_feeds(1, seed=720, sr=8000, length=576))  # fails inside the runtime
    assert worker.run_inline(vad_feeds(1, seed=721)) is not None  # the lock was released


async def test_inline_and_worker_calls_never_share_the_interpreter(
    samples: dict[str, Path], make_worker: MakeWorker
) -> None:
    """A stream thread (``submit_threadsafe``) and the API (``run_inline``) on one LiteRT
    interpreter, which is not thread-safe: every answer must still belong to its own input."""
    reference = LiteRTBackend().load(samples["face_detection"], [])
    worker = make_worker(LiteRTBackend().load(samples["face_detection"], []), None, name="faces",
                         inline_max_us=1_000_000)
    images = [photo(samples["astronaut"]), photo(samples["coffee"])]
    want = [reference.run({"input": x}) for x in images]
    await asyncio.wait_for(worker.submit({"input": images[0]}), 10)  # timed: inline from now on
    stream_results: list[tuple[int, Outputs]] = []

    def stream() -> None:  # a paced stream: the worker is busy about half the time
        for i in range(60):
            stream_results.append((i % 2, worker.submit_threadsafe({"input": images[i % 2]}).result(10)))
            time.sleep(0.001)

    thread = threading.Thread(target=stream)
    thread.start()
    inline_runs = i = 0
    while thread.is_alive():
        i += 1
        got = worker.run_inline({"input": images[i % 2]})
        if got is not None:
            inline_runs += 1
            assert_same(got, want[i % 2])
        await asyncio.sleep(0.0002)
    thread.join(30)
    assert inline_runs > 0 and len(stream_results) == 60
    for which, got in stream_results:
        assert_same(got, want[which])
