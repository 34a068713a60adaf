"""Fuzz test of the archive reader (``extract_bundle``): over 200 malformed and hostile archives.

The cases and the runner are in ``tests/hostile_archives.py``. They run in a fresh interpreter
so the memory it reports belongs to the extractions alone: for each archive, how far the peak RSS
(VmHWM, reset before each extraction) rose over the RSS just before it. A 512 MiB PAX header
once cost 1.5 GiB.
Every archive must be refused with ``unsafe_archive`` or ``bad_manifest`` (no staging left, a
capped message) or extracted with only regular files and directories inside staging.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIN_CASES = 200
MAX_RSS_GROWTH_MIB = 32

pytestmark = pytest.mark.timeout(300)


def test_every_hostile_archive_is_refused_or_extracted_safely(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "tests.hostile_archives", "--json", "--workdir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert out.stdout.strip(), out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\narchive fuzz: {report['cases']} cases, {len(report['failures'])} failures, "
              f"outcomes {report['outcomes']}, peak RSS growth during one extraction at most "
              f"{report['peak_growth_mib']} MiB ({report['peak_case']}; RSS {report['rss_before_mib']} MiB), "
              f"{report['seconds']} s, slowest {report['slowest']}")
    assert report["failures"] == [], "\n".join(report["failures"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert report["cases"] >= MIN_CASES
    assert report["outcomes"].get("refused:unsafe_archive", 0) > 100 and report["outcomes"].get("extracted", 0) > 0
    assert report["peak_growth_mib"] < MAX_RSS_GROWTH_MIB, report
