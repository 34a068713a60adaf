"""Health-window verdict: pure arithmetic on counters and latencies, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HealthPolicy:
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0


def verdict(policy: HealthPolicy, requests: int, errors: int, latencies: Sequence[float],
            baseline: Sequence[float]) -> str | None:
    """None if healthy, else why not. Too few requests is no evidence either way: healthy."""
    if requests < policy.min_requests:
        return None
    rate = errors / requests
    if rate > policy.max_error_rate:
        return f"error rate {rate:.1%} over {requests} requests exceeds {policy.max_error_rate:.1%}"
    if len(latencies) >= policy.min_requests and len(baseline) >= policy.min_requests:
        new, old = float(np.median(latencies)), float(np.median(baseline))
        if old > 0 and new > old * policy.max_latency_ratio:
            return (f"median latency {new * 1e3:.2f} ms is {new / old:.1f}x the previous version's "
                    f"{old * 1e3:.2f} ms (limit {policy.max_latency_ratio:g}x)")
    return None
