"""Human-readable tables for the CLI (rich), kept apart from the data they show."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    # Piped output (scripts, logs) gets a wide fixed width instead of being cut at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _shape(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in tensors)


def models_table(status: dict[str, Any], detail: bool = False) -> None:
    table = Table(title="models", title_justify="left")
    for col in ("name", "version", "state", "runtime", "delegate", "batching", "requests", "errors"):
        table.add_column(col)
    if detail:
        table.add_column("inputs")
        table.add_column("outputs")
    for m in status["models"]:
        default = " (default)" if m.get("default") else ""
        row = [m["name"], f"{m['version']}{default}", m["state"], m.get("runtime", "-"), m.get("delegate", "-"),
               "on" if m.get("batching") else "off", str(m.get("requests", "-")), str(m.get("errors", "-"))]
        if detail:
            row += [_shape(m.get("inputs", [])), _shape(m.get("outputs", []))]
        table.add_row(*row)
        if m["state"] == "FAILED":
            table.add_row("", "", f"[red]{m['error']}[/red]", *[""] * (len(row) - 3))
    _console().print(table)


def status_tables(status: dict[str, Any]) -> None:
    a, p, hw = status["agent"], status["profile"], status["hardware"]
    table = Table(show_header=False, title="agent", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in (
        ("version", a["version"]), ("device", a["device_id"]), ("uptime", f"{a['uptime_s']:.0f} s"),
        ("listeners", ", ".join(a["listeners"])), ("models dir", a["models_dir"]),
        ("profile", f"{p['name']} ({p['reason']})"), ("board", hw.get("board") or "-"),
        ("accelerators", ", ".join(x["name"] for x in hw.get("accelerators", [])) or "none"),
    ):
        table.add_row(key, str(value))
    _console().print(table)
    models_table(status)


def detect_tables(report: dict[str, Any]) -> None:
    hw = report["hardware"]
    table = Table(show_header=False, title="hardware", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("arch", hw["arch"])
    table.add_row("board", hw.get("board") or "-")
    table.add_row("cpu", f"{hw.get('cpu_model') or '-'} x{hw.get('cpu_count')}")
    table.add_row("accelerators", "\n".join(f"{x['name']} ({x['evidence']})" for x in hw["accelerators"]) or "none")
    table.add_row("profile", f"{report['profile']} — {report['reason']}")
    _console().print(table)
    rt = Table(title="delegate / execution provider per runtime", title_justify="left")
    for col in ("runtime", "version", "would use", "why"):
        rt.add_column(col)
    for entry in report["runtimes"]:
        rt.add_row(entry["runtime"], entry["version"], entry["delegate"], entry["why"])
    _console().print(rt)
