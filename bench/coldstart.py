"""Cold start of a model unloaded while idle (``[model.NAME] unload_after_s``): face detection
(LiteRT, XNNPACK) and Silero VAD (ONNX Runtime, CPU, optimised-graph cache on as by default).

In one process, on the real registry and residency: per cycle, a warm request (timed), the
version unloaded as if idle (the resident memory it gave back is measured), then the first
request after it (timed: it waits for the load) and the ``cold_start_ms`` the agent reports in
its ``model.reloaded`` event. Prints the medians (and min-max) over ``--cycles`` cycles per model
and the machine's load average, which on a shared machine moves every figure.

Usage: python bench/coldstart.py [--cycles 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.cli.demo_env import silero_feeds
from agent.config import ModelSection, RuntimeSection
from agent.core.metrics import Metrics
from agent.logs import configure_logging
from agent.models.registry import ModelRegistry
from agent.models.residency import Residency
from agent.samples import fetch
from tests.fakes import RecordingSink

MODELS: dict[str, tuple[str, str, Callable[[], dict[str, np.ndarray]]]] = {
    "face_detection": ("model.tflite", "LiteRT XNNPACK",
                       lambda: {"input": np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)}),
    "silero_vad": ("model.onnx", "ONNX Runtime CPU", lambda: silero_feeds(0)),
}


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


async def measure(root: Path, cycles: int) -> list[tuple[str, str, dict[str, list[float]]]]:
    for name, (file, _label, _feeds) in MODELS.items():
        dest = root / "models" / name / "1" / file
        dest.parent.mkdir(parents=True)
        shutil.copyfile(fetch(name), dest)
    options = {name: ModelSection(threads=1, unload_after_s=1.0) for name in MODELS}
    metrics, sink = Metrics(), RecordingSink()
    registry = ModelRegistry(root / "models", model_options=options, versions_policy="latest",
                             runtime=RuntimeSection(), delegates={}, threads=1, metrics=metrics,
                             cache_dir=root / "cache")
    await registry.load_all()
    residency = Residency(registry, sink, metrics, unload_after=lambda n: registry.options(n).unload_after_s)
    process = psutil.Process()
    out = []
    try:
        for name, (_file, label, make_feeds) in MODELS.items():
            served = registry.get(name)
            feeds = make_feeds()
            figures: dict[str, list[float]] = {"warm_ms": [], "first_ms": [], "cold_start_ms": [], "freed_mb": []}
            for _ in range(cycles):
                for _warm in range(20):
                    await served.infer(feeds)
                started = time.perf_counter()
                await served.infer(feeds)
                figures["warm_ms"].append((time.perf_counter() - started) * 1e3)
                rss = process.memory_info().rss
                served.last_used = time.monotonic() - 3600  # as if idle for an hour
                if served.key not in await residency.step():
                    raise RuntimeError(f"{name} was not unloaded")
                figures["freed_mb"].append((rss - process.memory_info().rss) / 2**20)
                events = len(sink.events)
                started = time.perf_counter()
                await served.infer(feeds)
                figures["first_ms"].append((time.perf_counter() - started) * 1e3)
                reloaded = [e for e in sink.events[events:] if e["type"] == "model.reloaded"]
                figures["cold_start_ms"].append(reloaded[0]["cold_start_ms"])
            out.append((name, label, figures))
    finally:
        await residency.stop()
        await registry.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    configure_logging("warning", "console")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(measure(Path(tmp), args.cycles))
    load_after = os.getloadavg()
    print(f"cold start after an idle unload, median (min-max) over {args.cycles} cycles, 1 runtime thread")
    print(f"{'model':<16}{'runtime':<18}{'warm request ms':>24}{'first request ms':>24}{'cold_start_ms':>24}"
          f"{'RSS freed MiB':>24}")
    for name, label, f in results:
        print(f"{name:<16}{label:<18}{_span(f['warm_ms']):>24}{_span(f['first_ms']):>24}"
              f"{_span(f['cold_start_ms']):>24}{_span(f['freed_mb']):>24}")
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
