"""Health-window verdict: pure arithmetic on counters and runtime-call times, no I/O.

Latency is judged on the runtime-call time per row (the ``compute_infer`` part of a request),
not on request latency: a request's latency includes its wait in the queue, which grows with
the load of the moment (a camera stream starting during a deploy), not with the version. The
new version's calls in the window are compared with the previous version's recent calls, and a
slowdown must pass both the ratio and an absolute floor, so jitter on a fast model is never a
regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HealthPolicy:
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0
    latency_floor_s: float = 0.002  # a slowdown of less than this per call is never a regression


def verdict(policy: HealthPolicy, requests: int, errors: int, latencies: Sequence[float],
            baseline: Sequence[float], *, nonfinite: int = 0) -> str | None:
    """None if healthy, else why not. Too few requests is no evidence either way: healthy.

    ``errors`` are failed (and rejected) requests; ``nonfinite`` answers that held NaN or
    infinity where the manifest does not allow it count as errors too. ``latencies`` and
    ``baseline`` are runtime-call times (s) of the new and the previous version.
    """
    if requests < policy.min_requests:
        return None
    bad = errors + nonfinite
    rate = bad / requests
    if rate > policy.max_error_rate:
        why = f" ({nonfinite} answers held NaN or infinity)" if nonfinite else ""
        return f"error rate {rate:.1%} over {requests} requests exceeds {policy.max_error_rate:.1%}{why}"
    if len(latencies) >= policy.min_requests and len(baseline) >= policy.min_requests:
        new, old = float(np.median(latencies)), float(np.median(baseline))
        if old > 0 and new > old * policy.max_latency_ratio and new - old > policy.latency_floor_s:
            return (f"median runtime-call time {new * 1e3:.2f} ms is {new / old:.1f}x the previous version's "
                    f"{old * 1e3:.2f} ms (limit {policy.max_latency_ratio:g}x and "
                    f"{policy.latency_floor_s * 1e3:g} ms)")
    return None
