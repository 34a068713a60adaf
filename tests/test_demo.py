"""The README's main job: the demo runs the whole loop and stops cleanly."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_whole_loop(tmp_path, samples):
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in range(1, 9):
        assert f"[{step}/8]" in out
    assert "demo-device: done ok=True" in out, "the staged deploy over MQTT committed"
    assert "stream-start stream=camera -> ok=True" in out
    assert out.count("edge-fleet watch: results/camera") >= 2, "stream results reached the console"
    assert "faces=[0." in out, "a face was detected in the camera stream"
    assert "demo-device: online=True" in out and "models=face_detection@1, okay_nabu@1, vad@1" in out
    assert "stuck=none" in out and "results: online" not in out
    assert "agent exited with code 0; socket removed: True" in out
