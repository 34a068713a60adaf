"""The health-window verdict (``agent.deploy.health.verdict``): pure arithmetic, table-driven.

``latencies``/``baseline`` are runtime-call times; ``POLICY`` has no absolute floor so the ratio
cases stay small numbers, the floor has cases of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from agent.deploy.health import HealthPolicy, verdict

POLICY = HealthPolicy(min_requests=10, max_error_rate=0.1, max_latency_ratio=2.0, latency_floor_s=0.0)
FAST = [0.001] * 10  # 1 ms, enough samples to judge
SLOW = [0.0025] * 10  # 2.5x FAST


CASES: dict[str, tuple[int, int, Sequence[float], Sequence[float], str | None]] = {
    # name: (requests, errors, latencies, baseline, reason contains / None when healthy)
    "no traffic": (0, 0, [], [], None),
    "too few requests, all failed": (9, 9, [], FAST, None),
    "enough requests, no errors": (10, 0, FAST, FAST, None),
    "error rate at the limit": (10, 1, FAST, FAST, None),
    "error rate over the limit": (10, 2, FAST, FAST, "error rate 20.0% over 10 requests exceeds 10.0%"),
    "every request failed": (50, 50, [], FAST, "error rate 100.0% over 50 requests"),
    "errors are judged before latency": (10, 5, SLOW, FAST, "error rate"),
    "latency over the ratio": (10, 0, SLOW, FAST,
                               "median runtime-call time 2.50 ms is 2.5x the previous version's 1.00 ms"),
    "latency at the ratio": (10, 0, [0.002] * 10, FAST, None),
    "faster than before": (10, 0, FAST, SLOW, None),
    "too few new latencies to judge": (10, 0, SLOW[:9], FAST, None),
    "too few baseline latencies (no previous version)": (10, 0, SLOW, [], None),
    "baseline of zeros is not divided by": (10, 0, SLOW, [0.0] * 10, None),
    "median, not mean: one outlier does not fail": (11, 0, [0.001] * 10 + [10.0], FAST, None),
    "median, not mean: most requests slow": (11, 0, [0.001] + [0.005] * 10, FAST, "5.0x"),
}


@pytest.mark.parametrize(("requests", "errors", "latencies", "baseline", "want"), list(CASES.values()), ids=list(CASES))
def test_verdict(requests: int, errors: int, latencies: Sequence[float], baseline: Sequence[float],
                 want: str | None) -> None:
    got = verdict(POLICY, requests, errors, latencies, baseline)
    if want is None:
        assert got is None
    else:
        assert got is not None and want in got


def test_the_policy_limits_are_the_policys() -> None:
    strict = HealthPolicy(min_requests=1, max_error_rate=0.0, max_latency_ratio=1.0, latency_floor_s=0.0)
    assert verdict(strict, 1, 1, [], []) is not None
    assert verdict(strict, 100, 0, [0.0011], [0.001]) is not None
    assert "limit 1x" in (verdict(strict, 100, 0, [0.0011], [0.001]) or "")
    lax = HealthPolicy(min_requests=1, max_error_rate=1.0, max_latency_ratio=100.0)
    assert verdict(lax, 1, 1, [0.05], [0.001]) is None


FLOORED = HealthPolicy(min_requests=10, max_error_rate=0.1, max_latency_ratio=2.0, latency_floor_s=0.002)


@pytest.mark.parametrize(("latencies", "baseline", "want"), [
    ([0.0005] * 10, [0.0001] * 10, None),  # 5x, but 0.4 ms slower: jitter on a fast model
    ([0.0025] * 10, [0.001] * 10, None),  # 2.5x, 1.5 ms slower: under the floor
    ([0.0035] * 10, [0.001] * 10, "3.5x"),  # over both
    ([0.03] * 10, [0.02] * 10, None),  # 10 ms slower, but only 1.5x
])
def test_a_slowdown_must_pass_the_ratio_and_the_absolute_floor(latencies: list[float], baseline: list[float],
                                                               want: str | None) -> None:
    got = verdict(FLOORED, 10, 0, latencies, baseline)
    assert (got is None) if want is None else (got is not None and want in got and "2 ms" in got), got


@pytest.mark.parametrize(("errors", "nonfinite", "want"), [
    (0, 2, "error rate 20.0% over 10 requests exceeds 10.0% (2 answers held NaN or infinity)"),
    (1, 1, "error rate 20.0%"),
    (0, 1, None),  # at the limit
])
def test_nonfinite_answers_count_as_errors(errors: int, nonfinite: int, want: str | None) -> None:
    got = verdict(POLICY, 10, errors, FAST, FAST, nonfinite=nonfinite)
    assert (got is None) if want is None else (got is not None and want in got), got
