"""Test plugin: where the daemon's memory goes over time (tracemalloc, live objects, glibc's heap).

Loaded with ``[agent] plugins = ["tests.plugins.memtrace"]`` (or ``EDGE_AGENT_AGENT__PLUGINS``);
``EDGE_AGENT_MEMTRACE`` is ``DIR[:INTERVAL_S[:WARMUP_S[:FRAMES[:types]]]]`` (defaults 60, 120, 8). After
the warm-up it takes a baseline; then every interval it writes ``DIR/memtrace-NNN.txt``: the traced
Python memory, the top differences against the baseline by traceback, with ``types`` the object types
whose live count changed most (``gc.get_objects``: while that list lives, every object has one more
reference, and LiteRT refuses to run an interpreter whose reference count is not what it expects, so
face-detection calls fail meanwhile), and glibc's ``mallinfo2`` (in use vs. free but kept), plus
``DIR/malloc-NNN.xml`` (``malloc_info``, per arena). Python's allocations that grow show in the
first two; memory that glibc keeps but nobody uses (fragmentation, arenas) only in the last.
A diagnostic for bench/soak.py runs, never for production: tracemalloc slows every allocation.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import linecache
import os
import threading
import time
import tracemalloc
from pathlib import Path

import structlog

ENV = "EDGE_AGENT_MEMTRACE"
log = structlog.get_logger(__name__)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def mallinfo() -> dict[str, int]:
    """glibc's heap totals over every arena (empty where glibc or mallinfo2 is missing)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {name: int(getattr(info, name)) for name, _ in _MallInfo2._fields_}


def malloc_info(path: Path) -> None:
    libc = _libc()
    if libc is None:
        return
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    fp = libc.fopen(str(path).encode(), b"w")
    if fp:
        libc.malloc_info(0, fp)
        libc.fclose(fp)


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def _run(out: Path, interval: float, warmup: float, types: bool) -> None:
    time.sleep(warmup)
    # not our own allocations (snapshots, the source lines of formatted tracebacks)
    filters = [tracemalloc.Filter(False, f) for f in (tracemalloc.__file__, __file__, linecache.__file__)]
    base = tracemalloc.take_snapshot().filter_traces(filters)
    base_types = type_counts() if types else collections.Counter()
    base_heap = mallinfo()
    t0 = time.monotonic()
    n = 0
    while True:
        time.sleep(interval)
        n += 1
        snap = tracemalloc.take_snapshot().filter_traces(filters)
        current, peak = tracemalloc.get_traced_memory()
        counts = type_counts() if types else collections.Counter()
        heap = mallinfo()
        lines = [f"after {time.monotonic() - t0:.0f} s: traced {current / 1e6:.2f} MB (peak {peak / 1e6:.2f})"]
        lines.append("heap (MB, now vs. baseline): " + ", ".join(
            f"{k} {heap[k] / 1e6:.2f} ({(heap[k] - base_heap.get(k, 0)) / 1e6:+.2f})"
            for k in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost") if k in heap))
        lines.append("\ntop differences by line:")
        for stat in snap.compare_to(base, "lineno")[:25]:
            lines.append(f"  {stat}")
        lines.append("\ntop differences by traceback:")
        for stat in snap.compare_to(base, "traceback")[:10]:
            lines.append(f"  {stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks")
            lines.extend(f"      {frame.filename}:{frame.lineno}" for frame in list(stat.traceback)[-12:])
        if types:
            lines.append("\nlive objects by type, change since baseline:")
            diff = {k: counts[k] - base_types.get(k, 0) for k in counts | base_types}
            for name, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:25]:
                lines.append(f"  {d:+8d}  {name} ({counts.get(name, 0)})")
        (out / f"memtrace-{n:03d}.txt").write_text("\n".join(lines) + "\n")
        malloc_info(out / f"malloc-{n:03d}.xml")


def _start() -> None:
    spec = os.environ.get(ENV)
    if not spec:
        log.warning("memtrace.off", reason=f"{ENV} is not set")
        return
    parts = spec.split(":")
    out = Path(parts[0])
    interval, warmup, frames = (float(parts[1]) if len(parts) > 1 else 60.0,
                                float(parts[2]) if len(parts) > 2 else 120.0,
                                int(parts[3]) if len(parts) > 3 else 8)
    types = len(parts) > 4 and parts[4] == "types"
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(frames)
    threading.Thread(target=_run, args=(out, interval, warmup, types), name="memtrace", daemon=True).start()
    log.info("memtrace.started", dir=str(out), interval_s=interval, warmup_s=warmup, frames=frames)


_start()
