"""Cost of the health window's non-finite answer check (``ServedModel.nonfinite_check``).

While a new version is in its health window every answer is checked for NaN and infinity
(``agent.models.served.all_finite``: one ``isfinite`` pass per float output). This measures it
where it runs: ``ServedModel.infer`` on a real Silero VAD version loaded by the agent's registry
(ONNX Runtime, one intra-op thread), in rounds that alternate the check off and on so noise hits
both alike; then ``all_finite`` alone on outputs of growing size.

Usage: python bench/nonfinite_check.py [--rounds 30] [--per-round 500]
Prints per-request medians (µs) with the check off and on (alternating call by call, median of
the rounds' medians), their difference, and the check alone on the same outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import RuntimeSection
from agent.core.metrics import Metrics
from agent.models.registry import ModelRegistry
from agent.models.served import ServedModel, all_finite
from agent.samples import fetch


async def timed_calls(served: ServedModel, feeds: dict[str, np.ndarray], n: int) -> tuple[list[int], list[int]]:
    """``n`` calls each with the check off and on, alternating call by call; ns per call."""
    off: list[int] = []
    on: list[int] = []
    for i in range(2 * n):
        served.nonfinite_check = frozenset() if i % 2 else None
        started = time.perf_counter_ns()
        await served.infer(feeds)
        (on if i % 2 else off).append(time.perf_counter_ns() - started)
    return off, on


async def predict_path(rounds: int, per_round: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        (models / "vad" / "1").mkdir(parents=True)
        (models / "vad" / "1" / "model.onnx").write_bytes(fetch("silero_vad").read_bytes())
        registry = ModelRegistry(models, model_options={}, versions_policy="latest", runtime=RuntimeSection(),
                                 delegates={}, threads=1, metrics=Metrics())
        await registry.load_all()
        try:
            served = registry.find("vad", 1)
            assert served is not None
            rng = np.random.default_rng(0)
            feeds = {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
                     "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
            for _ in range(200):  # warm: session, inline decision, caches
                await served.infer(feeds)
            medians_off, medians_on = [], []
            for _ in range(rounds):
                off, on = await timed_calls(served, feeds, per_round)
                medians_off.append(statistics.median(off) / 1e3)
                medians_on.append(statistics.median(on) / 1e3)
            assert served.stats.nonfinite == 0
            a, b = statistics.median(medians_off), statistics.median(medians_on)
            outputs = await served.infer(feeds)
            direct = min(timeit.repeat(lambda: all_finite(outputs), number=10_000, repeat=5)) / 10_000 * 1e6
            print(f"ServedModel.infer, Silero VAD (outputs 1x1 and 2x1x128 float32), {rounds} rounds of "
                  f"{per_round} calls with the check off and on, alternating:")
            print(f"  check off  {a:8.1f} µs/request (median of round medians)")
            print(f"  check on   {b:8.1f} µs/request")
            print(f"  cost       {b - a:8.1f} µs/request ({(b - a) / a:+.1%}); all_finite on these outputs alone "
                  f"{direct:.1f} µs")
        finally:
            await registry.close()


def alone() -> None:
    print("all_finite alone, one float32 output (µs per call, best of 5):")
    for size in (1, 256, 4096, 65_536, 1_000_000):
        outputs = {"y": np.random.default_rng(1).random(size, dtype=np.float32)}
        n = max(20, 200_000 // max(size // 64, 1))
        t = min(timeit.repeat(lambda o=outputs: all_finite(o), number=n, repeat=5)) / n  # type: ignore[misc]
        print(f"  {size:>9,} values  {t * 1e6:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=500)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    asyncio.run(predict_path(args.rounds, args.per_round))
    alone()


if __name__ == "__main__":
    main()
