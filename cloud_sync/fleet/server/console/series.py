"""Telemetry as plot series for a device page: CPU, memory, temperature, outbox depth, and per model the
request rate (from the cumulative ``requests`` counter) and latency p50/p99 where the device reports it.

One query reads at most ``max_rows`` samples of the range (evenly thinned when there are more), only
the ``system``, ``models`` and ``outbox`` parts of each payload; the rest is pure arithmetic on those
rows, so it is tested without a database. A silence longer than three sample intervals becomes a
break in the lines (a null point) instead of a straight line across it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s

RANGES: dict[str, float] = {"15m": 900.0, "1h": 3600.0, "6h": 6 * 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
DEFAULT_RANGE = "1h"
MAX_ROWS = 1500
#: (key, label, unit) of the device-wide series, in the order the page draws them.
METRICS = (("cpu", "CPU", "%"), ("memory", "Memory", "%"), ("temperature", "Temperature", "°C"),
           ("outbox", "Outbox depth", "messages"))
Sample = tuple[float, Mapping[str, Any] | None, list[Any] | None, Mapping[str, Any] | None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def _latency(model: Mapping[str, Any], which: str) -> float | None:
    """``latency_ms: {p50, p99}`` (or ``latency_p50_ms``) when the device sends it."""
    return _number(_get(model, "latency_ms", which)) if "latency_ms" in model else _number(
        model.get(f"latency_{which}_ms"))


def read_samples(conn: sa.Connection, device_id: str, since: float, until: float,
                 max_rows: int = MAX_ROWS) -> list[Sample]:
    t = s.telemetry
    where = (t.c.device_id == device_id, t.c.ts >= since, t.c.ts < until)
    count = int(conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one())
    q = sa.select(t.c.ts, t.c.payload["system"], t.c.payload["models"], t.c.payload["outbox"]).where(*where)
    if count > max_rows:  # the first sample of each of max_rows equal time slices (rounding differs: harmless)
        width = (until - since) / max_rows
        bucket = sa.cast((t.c.ts - sa.literal(since, sa.Double)) / sa.literal(width, sa.Double), sa.Integer)
        q = q.where(t.c.id.in_(sa.select(sa.func.min(t.c.id)).where(*where).group_by(bucket)))
    return [(float(ts), system, models, outbox) for ts, system, models, outbox in conn.execute(q.order_by(t.c.ts))]


def build(samples: Iterable[Sample]) -> dict[str, Any]:
    """uPlot-ready columns: ``x`` (epoch seconds), ``metrics`` {key: values}, ``models`` {name: {rate,
    p50, p99}}, each list as long as ``x``; ``None`` where a sample lacks the figure."""
    rows = sorted(samples, key=lambda r: r[0])
    steps = [b[0] - a[0] for a, b in itertools.pairwise(rows) if b[0] > a[0]]
    gap = 3 * statistics.median(steps) if steps else math.inf
    x: list[float] = []
    metrics: dict[str, list[float | None]] = {key: [] for key, _, _ in METRICS}
    models: dict[str, dict[str, list[float | None]]] = {}
    previous: dict[str, tuple[float, float]] = {}  # model -> (ts, requests) of its last sample

    def push(ts: float, values: Mapping[str, float | None],
             per_model: Mapping[str, Mapping[str, float | None]]) -> None:
        index = len(x)
        x.append(ts)
        for key, column in metrics.items():
            column.append(values.get(key))
        for name in per_model:
            models.setdefault(name, {"rate": [None] * index, "p50": [None] * index, "p99": [None] * index})
        for name, columns in models.items():
            for key, column in columns.items():
                column.append(per_model.get(name, {}).get(key))

    for i, (ts, system, model_list, outbox) in enumerate(rows):
        if i and ts - rows[i - 1][0] > gap:
            push((ts + rows[i - 1][0]) / 2, {}, {})  # a break in every line
            previous.clear()
        temperatures = _get(system, "temperatures")
        temps = [v for v in (_number(t) for t in temperatures.values()) if v is not None] \
            if isinstance(temperatures, Mapping) else []
        values = {"cpu": _number(_get(system, "cpu_percent")), "memory": _number(_get(system, "memory", "percent")),
                  "temperature": max(temps) if temps else None, "outbox": _number(_get(outbox, "depth"))}
        per_model: dict[str, dict[str, float | None]] = {}
        for model in model_list if isinstance(model_list, list) else []:
            if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
                continue
            name, requests = model["name"], _number(model.get("requests"))
            rate = None
            if requests is not None:
                last = previous.get(name)
                if last is not None and ts > last[0] and requests >= last[1]:  # a drop: restart or new version
                    rate = (requests - last[1]) / (ts - last[0])
                previous[name] = (ts, requests)
            per_model[name] = {"rate": rate, "p50": _latency(model, "p50"), "p99": _latency(model, "p99")}
        push(ts, values, per_model)
    return {"x": x, "metrics": metrics, "models": models}


def series(conn: sa.Connection, device_id: str, range_key: str, now: float) -> dict[str, Any]:
    span = RANGES.get(range_key, RANGES[DEFAULT_RANGE])
    out = build(read_samples(conn, device_id, now - span, now + 1))
    labels = [{"key": key, "label": label, "unit": unit} for key, label, unit in METRICS]
    has_latency = any(v is not None for m in out["models"].values() for v in (*m["p50"], *m["p99"]))
    return {"device_id": device_id, "range": range_key if range_key in RANGES else DEFAULT_RANGE,
            "since": now - span, "until": now, "labels": labels, "latency": has_latency, **out}
