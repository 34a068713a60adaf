"""Human-readable tables for the CLI, kept apart from the data they show.

With the ``cli`` extra (``pip install 'edge-agent[cli]'``) they are drawn by rich; a device
installed without it still gets the same tables as aligned plain text (``--json`` is always there).
"""

from __future__ import annotations

import re
import sys
from typing import Any

try:
    from rich.console import Console
    from rich.table import Table
except ImportError:  # the lean device install: plain text
    Console = None  # type: ignore[assignment,misc]
    Table = None  # type: ignore[assignment,misc]

_MARKUP = re.compile(r"\[/?[a-z ]+\]")


class PlainTable:
    """The part of rich's Table these tables use, printed as aligned columns."""

    def __init__(self, title: str = "", show_header: bool = True, **_style: Any) -> None:
        self.title = title
        self.show_header = show_header
        self.columns: list[str] = []
        self.rows: list[list[str]] = []

    def add_column(self, name: str, **_style: Any) -> None:
        self.columns.append(name)

    def add_row(self, *cells: str) -> None:
        self.rows.append([_MARKUP.sub("", c).replace("\n", "; ") for c in cells])

    def render(self) -> str:
        rows = ([self.columns] if self.show_header else []) + self.rows
        widths = [max((len(r[i]) for r in rows if i < len(r)), default=0) for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
        return "\n".join(lines)


def _table(**kwargs: Any) -> Any:
    return Table(**kwargs) if Table is not None else PlainTable(**kwargs)


class _Console:
    def print(self, table: Any) -> None:
        if isinstance(table, PlainTable):
            sys.stdout.write(table.render() + "\n\n")
            return
        # Piped output (scripts, logs) gets a wide fixed width instead of being cut at 80 columns.
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


def _console() -> _Console:
    return _Console()


def _shape(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in tensors)


def models_table(status: dict[str, Any], detail: bool = False) -> None:
    table = _table(title="models", title_justify="left")
    for col in ("name", "version", "state", "runtime", "delegate", "batching", "inline", "instances", "requests",
                "errors"):
        table.add_column(col)
    if detail:
        table.add_column("inputs")
        table.add_column("outputs")
    for m in status["models"]:
        default = " (default)" if m.get("default") else ""
        row = [m["name"], f"{m['version']}{default}", m["state"], m.get("runtime", "-"), m.get("delegate", "-"),
               "on" if m.get("batching") else "off", "yes" if m.get("inline") else "no",
               str(m.get("instances", "-")), str(m.get("requests", "-")), str(m.get("errors", "-"))]
        if detail:
            row += [_shape(m.get("inputs", [])), _shape(m.get("outputs", []))]
        table.add_row(*row)
        if m["state"] == "FAILED":
            table.add_row("", "", f"[red]{m['error']}[/red]", *[""] * (len(row) - 3))
    _console().print(table)


def stats_table(stats: list[dict[str, Any]]) -> None:
    """Mean µs per successful request in each phase; overhead is everything but the runtime call."""
    table = _table(title="inference statistics (mean µs per request)", title_justify="left")
    for col in ("model", "version", "requests", "failed", "input", "queue", "infer", "output", "total", "overhead",
                "batches"):
        table.add_column(col, justify="left" if col in ("model", "version") else "right")
    for entry in stats:
        phases = entry["inference_stats"]
        count = phases["success"]["count"]
        means = {k: v["ns"] / count / 1000 if count else 0.0 for k, v in phases.items()}
        batches = sum(b["compute_infer"]["count"] for b in entry["batch_stats"])
        rows = sum(b["batch_size"] * b["compute_infer"]["count"] for b in entry["batch_stats"])
        table.add_row(entry["name"], entry["version"], str(count), str(phases["fail"]["count"]),
                      *(f"{means[k]:.0f}" for k in ("compute_input", "queue", "compute_infer", "compute_output",
                                                     "success")),
                      f"{means['success'] - means['compute_infer']:.0f}",
                      f"{batches} (avg {rows / batches:.1f} rows)" if batches else "0")
    _console().print(table)


def status_tables(status: dict[str, Any]) -> None:
    a, p, hw = status["agent"], status["profile"], status["hardware"]
    table = _table(show_header=False, title="agent", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in (
        ("version", a["version"]), ("device", a["device_id"]), ("uptime", f"{a['uptime_s']:.0f} s"),
        ("listeners", ", ".join(a["listeners"])), ("models dir", a["models_dir"]),
        ("profile", f"{p['name']} ({p['reason']})"), ("board", hw.get("board") or "-"),
        ("accelerators", ", ".join(x["name"] for x in hw.get("accelerators", [])) or "none"),
        *_health_rows(status),
    ):
        table.add_row(key, str(value))
    _console().print(table)
    models_table(status)
    streams = status.get("streams") or []
    if streams:
        st = _table(title="streams", title_justify="left")
        for col in ("stream", "state", "model", "input fps", "inferred", "dropped", "age p50/p99 ms", "results",
                    "errors"):
            st.add_column(col)
        for s in streams:
            ages = f"{s.get('age_ms_p50') or '-'} / {s.get('age_ms_p99') or '-'}"
            st.add_row(s["name"], s["state"] + (f" ({s['error']})" if s.get("error") else ""), str(s.get("model")),
                       str(s.get("input_fps", "-")), str(s.get("inferred", "-")),
                       str(s.get("dropped_frames", "-")), ages, str(s.get("results", "-")), str(s.get("errors", "-")))
        _console().print(st)
    shadows = status.get("shadows") or []
    if shadows:
        shadows_table(shadows)


def shadows_table(shadows: list[dict[str, Any]]) -> None:
    """Each shadow against its serving version: agreement, the kind's figures, latency p50/p99, drops."""
    table = _table(title="shadows", title_justify="left")
    for col in ("model", "shadow / serving", "state", "kind", "compared", "dropped", "errors", "agreement",
                "figures", "latency p50/p99 ms (serving | shadow)"):
        table.add_column(col)
    for s in shadows:
        figures = ", ".join(f"{k} {v:g}" for k, v in (s.get("metrics") or {}).items() if v is not None)
        lat = s.get("latency_ms") or {}
        served, shadow = lat.get("serving") or {}, lat.get("shadow") or {}
        latency = (f"{served.get('p50') or '-'}/{served.get('p99') or '-'} | "
                   f"{shadow.get('p50') or '-'}/{shadow.get('p99') or '-'}")
        agreement = "-" if s.get("agreement") is None else f"{s['agreement']:.4f}"
        table.add_row(s["model"], f"{s['version']} / {s['serving_version']}", s["state"], s["kind"],
                      str(s["compared"]), str(s["dropped"]), str(s["errors"]), agreement, figures or "-", latency)
    _console().print(table)


def _health_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    system = status.get("system") or {}
    if system:
        cpu = system.get("cpu_percent")
        mem = (system.get("memory") or {}).get("percent")
        proc = system.get("process") or {}
        rows.append(("cpu / memory", f"{cpu if cpu is not None else '-'} % / {mem if mem is not None else '-'} %"))
        if proc.get("rss_bytes"):
            rows.append(("agent process", f"{proc['rss_bytes'] / 2**20:.0f} MiB RSS, {proc.get('threads')} threads"))
        disk = system.get("disk") or {}
        if disk.get("free_bytes") is not None:
            free = f"{disk['free_bytes'] / 2**30:.1f} GiB free"
            rows.append(("disk (state dir)", f"{free}, {disk.get('used_percent')} % used"))
        temps = system.get("temperatures") or {}
        if temps:
            rows.append(("temperatures", ", ".join(f"{k} {v:.0f} °C" for k, v in temps.items())))
        throttling = system.get("throttling")
        if throttling:
            now = [k for k, v in throttling.items() if v is True and not k.endswith("_occurred")]
            rows.append(("throttling", ", ".join(now) or "no"))
        for gpu in system.get("gpus") or []:
            label = f"gpu {gpu.get('index', '')}".strip()
            rows.append((label, f"{gpu.get('name', '')} {gpu.get('utilization_percent')} %"))
    link = status.get("link")
    if link:
        outbox = status.get("outbox") or {}
        rows.append(("cloud link", f"{'connected' if link['connected'] else 'DISCONNECTED'} to {link['broker']}, "
                                   f"{link['reconnects']} reconnects"))
        rows.append(("outbox", f"{outbox.get('depth', 0)} waiting, dropped {outbox.get('dropped', {})}"))
    return rows


def detect_tables(report: dict[str, Any]) -> None:
    """``edge-agent detect``: the facts, each accelerator used or why not, each model format's delegate."""
    hw = report["hardware"]
    table = _table(show_header=False, title="hardware", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    arch = hw["arch"]
    detail = [f"from {hw['arch_source']}"] if hw.get("arch_source") else []
    if hw.get("userspace_arch") and hw["userspace_arch"] != hw["arch"]:
        detail.append(f"userland {hw['userspace_arch']}")
    table.add_row("arch", f"{arch} ({', '.join(detail)})" if detail else arch)
    table.add_row("board", hw.get("board") or "-")
    table.add_row("soc", f"{hw['soc']} (from {hw['soc_source']})" if hw.get("soc") else "-")
    table.add_row("cpu", f"{hw.get('cpu_model') or '-'} x{hw.get('cpu_count')}")
    table.add_row("libraries", ", ".join(hw.get("libraries", [])) or "none of the known ones")
    table.add_row("profile", f"{report['profile']} — {report['reason']}")
    if hw.get("notes"):
        table.add_row("notes", "\n".join(hw["notes"]))
    _console().print(table)
    acc = _table(title="accelerators", title_justify="left")
    for col in ("accelerator", "evidence", "used", "why"):
        acc.add_column(col)
    for entry in report.get("accelerators", []):
        acc.add_row(entry["name"], entry["evidence"], "yes" if entry["used"] else "no", entry["reason"])
    if not report.get("accelerators"):
        acc.add_row("none found", "", "", "")
    _console().print(acc)
    fmt = _table(title=f"model formats ({report.get('plan_checked_by', '')})", title_justify="left")
    for col in ("format", "runtime", "runs on", "skipped / note"):
        fmt.add_column(col)
    for entry in report.get("formats", []):
        fmt.add_row(entry["format"], entry["runtime"], entry["delegate"] or "cannot run",
                    "\n".join([*entry["skipped"], *([entry["note"]] if entry["note"] else [])]))
    _console().print(fmt)
    where = report.get("runtimes_checked_on", "this device")
    rt = _table(title=f"delegate / execution provider per runtime (on {where})", title_justify="left")
    for col in ("runtime", "version", "would use", "why"):
        rt.add_column(col)
    for entry in report["runtimes"]:
        rt.add_row(entry["runtime"], entry["version"], entry["delegate"], entry["why"])
    _console().print(rt)
