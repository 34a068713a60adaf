"""``edge-agent detect --root DIR --json`` on trees of real boards and on hostile trees.

Each board (tests/hardware_corpus/boards.py) states the board name, architecture, profile, the exact
selection reason, the delegate each model format would run on, and for every accelerator whether it
is used and why not. The command runs in-process (``agent.cli.cmd_detect``) for speed; one board and the
FIFO tree also run as a real process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from agent.cli import _parser, cmd_detect
from agent.hardware import load_profiles
from tests.hardware_corpus import CharDev, build
from tests.hardware_corpus.boards import BOARDS
from tests.hardware_corpus.hostile import HOSTILE, Hostile

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _logs_kept_off_stdout():
    """structlog prints to stdout by default; keep the log lines out of the JSON the tests parse."""
    with structlog.testing.capture_logs():
        yield


def run_detect(*args: str) -> int:
    """``edge-agent detect ARGS`` in this process (without ``main``'s logging set-up, which would bind
    structlog to pytest's captured stderr for the rest of the session)."""
    return cmd_detect(_parser().parse_args(["detect", *args]))


def detect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert run_detect(*args, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_corpus_covers_every_packaged_profile():
    assert len(BOARDS) >= 25
    assert len({b.id for b in BOARDS}) == len(BOARDS)
    assert {p.name for p in load_profiles()} <= {b.profile for b in BOARDS}


@pytest.mark.parametrize("board", BOARDS, ids=lambda b: b.id)
def test_board(tmp_path, capsys, board):
    root = build(tmp_path / board.id, board.tree)
    report = detect_json(capsys, "--root", str(root))
    hw = report["hardware"]
    assert (hw["board"], hw["arch"]) == (board.board, board.arch)
    assert (report["profile"], report["reason"]) == (board.profile, board.reason)
    assert {f["format"]: f["delegate"] for f in report["formats"]} == board.formats
    found = {a["kind"]: a for a in report["accelerators"]}
    assert set(found) == set(board.accelerators), found
    for kind, (used, fragment) in board.accelerators.items():
        entry = found[kind]
        assert entry["used"] is used, entry
        assert fragment in entry["reason"] or fragment in entry["name"], entry
        assert entry["reason"], entry
    if board.cpu_model is not None:
        assert hw["cpu_model"] == board.cpu_model
    if board.soc is not None:
        assert hw["soc"] == board.soc
    for fragment in board.notes:
        assert any(fragment in n for n in hw["notes"]), hw["notes"]
    assert not any("budget" in n for n in hw["notes"]), hw["notes"]
    assert report["plan_checked_by"] == "prediction from the tree"
    assert report["runtimes_checked_on"] == "this machine, not the device the tree is from"


def test_board_through_the_installed_command(tmp_path):
    board = next(b for b in BOARDS if b.id == "jetson-orin-nano-jp6")
    root = build(tmp_path / "orin", board.tree)
    out = subprocess.run([sys.executable, "-m", "agent.cli", "detect", "--root", str(root), "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["profile"], report["reason"]) == (board.profile, board.reason)


def _build_hostile(tmp_path: Path, case: Hostile) -> Path:
    try:
        return build(tmp_path / case.id, case.tree)
    except PermissionError:
        if any(isinstance(c, CharDev) for c in case.tree.values()):
            pytest.skip("mknod is not permitted here")
        raise


def _check_hostile(case: Hostile, report: dict) -> None:
    hw = report["hardware"]
    assert (hw["arch"], hw["board"], report["profile"]) == (case.arch, case.board, case.profile)
    kinds = {a["kind"] for a in report["accelerators"]}
    assert kinds == set(case.accelerators), report["accelerators"]
    for fragment in case.notes:
        assert any(fragment in n for n in hw["notes"]), hw["notes"]
    text = json.dumps(report, ensure_ascii=False)
    assert "\x1b" not in text and "\x07" not in text
    assert len(hw["board"] or "") <= 256 and all(len(a["name"]) <= 400 for a in report["accelerators"])


@pytest.mark.parametrize("case", [c for c in HOSTILE if not c.subprocess], ids=lambda c: c.id)
def test_hostile_tree(tmp_path, capsys, case):
    root = _build_hostile(tmp_path, case)
    _check_hostile(case, detect_json(capsys, "--root", str(root)))
    # The tables a person reads carry no terminal control characters either.
    assert run_detect("--root", str(root)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out


@pytest.mark.parametrize("case", [c for c in HOSTILE if c.subprocess], ids=lambda c: c.id)
def test_hostile_tree_in_a_process(tmp_path, case):
    """A FIFO used to block detection forever: run it as a process so a hang fails instead of blocking."""
    root = _build_hostile(tmp_path, case)
    out = subprocess.run([sys.executable, "-m", "agent.cli", "detect", "--root", str(root), "--json"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    _check_hostile(case, json.loads(out.stdout))
