"""The README's main job: the demo runs the whole loop through the fleet service and stops cleanly.

Beyond its output, the test reads what the loop left behind: the service's SQLite database (the
rollout, each device's outcome, the camera results, the inventory), the model the real agent
installed, and the process table (nothing of the demo still running).
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil


def _rows(db: Path, sql: str, *args: object) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _log_in_to_the_console(console: str, token: str) -> str:
    """The console's devices page, after logging in with the demo's token through the login form."""
    with httpx.Client(base_url=console, timeout=30) as web:
        form = web.get("/login")
        assert form.status_code == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf, form.text
        done = web.post("/login", data={"csrf": csrf.group(1), "token": token, "next": "/devices"})
        assert done.status_code == 303 and done.headers["location"] == "/devices", done.text
        page = web.get("/devices")
        assert page.status_code == 200
        return page.text


def test_demo_runs_the_whole_loop_through_the_fleet_service(tmp_path, samples):
    """With --serve, as a person would: the loop, the console up with a working token, Ctrl-C."""
    workdir = tmp_path / "demo"
    errors = (tmp_path / "demo-stderr.txt").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "demo", "--workdir", str(workdir), "--serve"],
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving: web console" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not serving.wait(0.5):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        served = re.search(r"serving: web console (http://127\.0\.0\.1:\d+/)  token (\S+)", "".join(lines))
        assert served, "".join(lines)
        devices_page = _log_in_to_the_console(served.group(1), served.group(2))
        assert "demo-device" in devices_page and "sim-0000" in devices_page
        assert proc.poll() is None, "--serve keeps everything up"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(30)  # the one reader of stdout: everything the demo printed, to its end
    assert not reader.is_alive()
    out = "".join(lines)
    errors.seek(0)
    err = errors.read()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err
    for step in range(1, 11):
        assert f"[{step}/10]" in out
    # the service's address, printed
    api = re.search(r"API +(http://127\.0\.0\.1:\d+)/api", out)
    assert api, out
    assert f"OpenAPI  {api.group(1)}/api/openapi.json" in out
    assert f"web console {api.group(1)}/   log in with the admin token" in out
    # uploaded through the service, published with the online keys only
    assert "published vad/vad-1.bundle" in out and "1 test vector" in out
    assert not list((workdir / "online-keys").glob("root/*.pem")) and list((workdir / "keys").glob("root/*.pem"))
    # the staged rollout, printed as it went, committed on the real agent (the canary) and the simulated devices
    assert "wave 1/3 (canary): demo-device" in out and "wave 3/3" in out
    for event in ("downloading", "verified", "tested", "swapped", "committed"):
        assert f"demo-device event deploy.{event}" in out
    assert "succeeded: 5 of 5 devices committed" in out
    assert "demo-device's own record (GET /v1/agent/deployments/vad on its socket): committed" in out
    assert (workdir / "models" / "vad" / "1" / "model.onnx").is_file()
    # predictions, and a stream started by a command through the service
    assert "predict: face score 0.9" in out
    assert "command stream-start stream=camera -> ok=True" in out
    assert out.count("results row ") == 4 and "faces=[0." in out
    # the fleet as the service lists it
    assert re.search(r"demo-device +online=True +agent \S+ +\S+ +models=face_detection@1, okay_nabu@1, vad@1", out)
    assert len(re.findall(r"sim-000\d +online=True .*models=face_detection@1, vad@1", out)) == 4
    # a clean stop
    assert "agent exited with code 0 (socket removed: True)" in out
    assert "4 simulated devices stopped" in out and "fleet service exited with code 0" in out
    assert re.search(r"demo took \d+ s", out)

    db = workdir / "fleet" / "fleet.db"
    assert _rows(db, "SELECT model, version, status FROM deployments") == [("vad", 1, "succeeded")]
    outcomes = dict(_rows(db, "SELECT device_id, status FROM deployment_devices"))
    assert outcomes == {"demo-device": "succeeded", **{f"sim-000{i}": "succeeded" for i in range(4)}}
    results = _rows(db, "SELECT model, payload FROM results WHERE device_id = 'demo-device' AND stream = 'camera'")
    assert len(results) >= 4 and {model for model, _ in results} == {"face_detection@1"}
    assert any(json.loads(payload).get("detections") for _, payload in results), "a face reached the database"
    assert ("demo-device", "vad", 1) in _rows(db, "SELECT device_id, name, version FROM device_models")

    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if str(workdir) in " ".join(p.info["cmdline"] or [])]
    assert left == [], "nothing of the demo is still running"


def test_demo_without_the_fleet_extra_says_what_to_install(tmp_path):
    code = ("import sys\nsys.modules['fastapi'] = None  # as if not installed\n"
            "from agent.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "edge-agent: error: the demo runs the fleet service, which needs the fleet extra (fastapi missing): "
        "pip install '.[fleet]' (./scripts/demo does)"]
    assert not (tmp_path / "demo").exists(), "nothing was started"
