"""Stream metrics as pure logic with a fake clock: current rates over a sliding window, totals apart, and when
an open source counts as stalled."""

from __future__ import annotations

import pytest

from agent.pipelines.runner import RateMeter, StreamMetrics, StreamSpec


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def run_at(meter: RateMeter, clock: Clock, per_s: int, seconds: int) -> None:
    for _ in range(seconds * per_s):
        clock.now += 1 / per_s
        meter.mark()


def test_rate_is_current_not_an_average_since_start() -> None:
    clock = Clock()
    meter = RateMeter(window_s=10, clock=clock)
    run_at(meter, clock, per_s=30, seconds=60)
    assert meter.rate() == pytest.approx(30, rel=0.05)
    run_at(meter, clock, per_s=5, seconds=20)  # the source slows down: the rate follows within the window
    assert meter.rate() == pytest.approx(5, rel=0.1)
    clock.now += 11  # silence longer than the window
    assert meter.rate() == 0.0


def test_young_meter_reports_its_own_span_and_idle_meter_zero() -> None:
    clock = Clock(500.5)
    meter = RateMeter(window_s=10, clock=clock)
    assert meter.rate() == 0.0
    run_at(meter, clock, per_s=10, seconds=2)
    assert meter.rate() == pytest.approx(10, rel=0.05), "two seconds old: the two-second rate, not diluted by 10 s"


def test_a_long_gap_clears_every_bucket() -> None:
    clock = Clock()
    meter = RateMeter(window_s=5, clock=clock)
    run_at(meter, clock, per_s=100, seconds=5)
    clock.now += 1000
    meter.mark()
    assert meter.rate() == pytest.approx(1 / 5, rel=0.25)


def test_metrics_totals_apart_and_zero_rates_when_threads_are_done() -> None:
    clock = Clock()
    metrics = StreamMetrics(clock=clock)
    metrics.capturing = metrics.processing = True
    metrics.opened_at = clock.now
    for _ in range(50):
        clock.now += 0.1
        metrics.item()
    out = metrics.to_dict()
    assert out["captured"] == 50 and out["input_fps"] == pytest.approx(10, rel=0.05)
    assert out["since_last_item_s"] == 0
    metrics.capturing = metrics.processing = False  # a finished stream
    clock.now += 3
    out = metrics.to_dict()
    assert out["input_fps"] == 0 and out["inferred_per_s"] == 0 and out["captured"] == 50
    assert out["since_last_item_s"] == pytest.approx(3)


def test_idle_time_counts_from_the_later_of_last_item_and_reopen() -> None:
    clock = Clock()
    metrics = StreamMetrics(clock=clock)
    assert metrics.idle_for() is None and metrics.since_last_item() is None
    metrics.opened_at = clock.now
    clock.now += 4
    assert metrics.idle_for() == 4 and metrics.since_last_item() == 4, "never delivered: since it opened"
    metrics.item()
    clock.now += 30
    metrics.opened_at = clock.now  # reconnected: idle starts over, the last item stays 30 s old
    clock.now += 1
    assert metrics.idle_for() == 1 and metrics.since_last_item() == 31


@pytest.mark.parametrize(("source", "stall_after", "threshold"), [
    ({"type": "pcm"}, 10.0, 10.0),
    ({"type": "images", "fps": 0.1}, 10.0, 30.0),  # a slow, paced source is not stalled between items
    ({"type": "camera", "fps": 30}, 2.0, 2.0),
])
def test_stall_threshold_respects_slow_sources(source: dict, stall_after: float, threshold: float) -> None:
    spec = StreamSpec(name="s", source=source, model="m", stall_after_s=stall_after)
    assert spec.stall_threshold() == pytest.approx(threshold)
