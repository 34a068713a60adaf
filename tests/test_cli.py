"""The edge-agent and edge-fleet commands, run as real processes against a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def agent(tmp_path_factory, samples):
    from tests.conftest import MODEL_FILES, install, start_daemon

    work = tmp_path_factory.mktemp("cli")
    for name in MODEL_FILES:
        install(work / "models", samples, name)
    daemon = start_daemon(work, "--models-dir", str(work / "models"))
    yield daemon
    daemon.stop()


def test_status_and_models_tables(agent):
    out = cli("status", "--socket", str(agent.socket))
    assert out.returncode == 0, out.stderr
    assert "x86-cpu" in out.stdout and "face_detection" in out.stdout and "AVAILABLE" in out.stdout
    out = cli("models", "--socket", str(agent.socket))
    assert out.returncode == 0 and "CPUExecutionProvider" in out.stdout and "int8" in out.stdout
    assert "inline" in out.stdout
    out = cli("status", "--json", "--socket", str(agent.socket))
    assert {m["name"] for m in json.loads(out.stdout)["models"]} == {"face_detection", "okay_nabu", "silero_vad"}


def test_predict_image_npy_json_wav(agent, samples, tmp_path):
    out = cli("predict", "--socket", str(agent.socket), "--normalize", "signed", "face_detection",
              str(samples["astronaut"]), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert np.asarray(result["classificators"]).shape == (1, 896, 1)
    assert np.max(result["classificators"]) > 0, "a face must be found in the astronaut photo"

    np.save(tmp_path / "state.npy", np.zeros((2, 1, 128), np.float32))
    np.save(tmp_path / "sr.npy", np.array(16000, np.int64))
    (tmp_path / "audio.json").write_text(json.dumps([[0.0] * 576]))
    out = cli("predict", "--socket", str(agent.socket), "silero_vad", f"input={tmp_path / 'audio.json'}",
              f"state={tmp_path / 'state.npy'}", f"sr={tmp_path / 'sr.npy'}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("output float32[1, 1]") and "stateN float32[2, 1, 128]" in out.stdout

    wav_path = tmp_path / "tone.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes((np.sin(np.arange(576) / 5) * 8000).astype("<i2").tobytes())
    out = cli("predict", "--socket", str(agent.socket), "silero_vad", f"input={wav_path}",
              f"state={tmp_path / 'state.npy'}", f"sr={tmp_path / 'sr.npy'}", "--json")
    assert out.returncode == 0, out.stderr
    assert np.asarray(json.loads(out.stdout)["output"]).shape == (1, 1)
    np.save(tmp_path / "feat.npy", np.zeros((1, 3, 40), np.float32))
    out = cli("predict", "--socket", str(agent.socket), "okay_nabu@1", str(tmp_path / "feat.npy"), "--raw-output",
              "--json")
    assert out.returncode == 0, out.stderr
    assert next(iter(json.loads(out.stdout).values()))[0][0] in range(256)


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (("predict", "nope", "x.npy"), 1, "model 'nope' not found"),
    (("predict", "face_detection", "/nonexistent.png"), 1, "no such file"),
    (("predict", "silero_vad", "a.npy"), 1, "give NAME=FILE"),
    (("predict", "face_detection", "README.md"), 1, "unsupported file type"),
    (("predict", "face_detection@x", "a.npy"), 2, "bad model reference"),
])
def test_predict_errors_are_one_line(agent, args, code, fragment):
    out = cli(*args[:1], "--socket", str(agent.socket), *args[1:])
    assert out.returncode == code
    assert fragment in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_status_without_agent_fails_cleanly(tmp_path):
    out = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert out.returncode == 1 and "cannot reach the agent" in out.stderr


def test_detect_shows_profile_and_delegates(tmp_path):
    out = cli("detect", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["hardware"]["arch"] == "x86_64" and report["profile"] == "x86-cpu"
    by_rt = {r["runtime"]: r for r in report["runtimes"]}
    assert by_rt["onnx"]["delegate"] == "CPUExecutionProvider" and by_rt["tflite"]["delegate"] == "xnnpack"
    # a Jetson Orin tree: the profile wants TensorRT/CUDA, this onnxruntime build lacks them -> CPU, with why
    root = tmp_path / "orin"
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/arch").write_text("aarch64\n")
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    out = cli("detect", "--root", str(root), "--json")
    report = json.loads(out.stdout)
    assert report["profile"] == "jetson-orin"
    onnx = next(r for r in report["runtimes"] if r["runtime"] == "onnx")
    assert onnx["delegate"] == "CPUExecutionProvider"
    assert "TensorrtExecutionProvider: not in this onnxruntime build" in onnx["why"]
    table = cli("detect", "--root", str(root))
    assert table.returncode == 0 and "jetson-orin" in table.stdout and "would use" in table.stdout


def test_edge_fleet_without_broker_fails_cleanly():
    proc = subprocess.run([sys.executable, "-c", "import sys; from cloud_sync.fleet.cli import main; "
                           "sys.exit(main(['devices', '--broker', 'mqtt://127.0.0.1:1']))"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot connect to the broker" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stats_table_and_json(agent):
    agent.client.infer("face_detection", {"input": np.zeros((1, 128, 128, 3), np.float32)})
    out = cli("stats", "--socket", str(agent.socket))
    assert out.returncode == 0, out.stderr
    assert "face_detection" in out.stdout and "silero_vad" in out.stdout and "overhead" in out.stdout
    out = cli("stats", "--socket", str(agent.socket), "face_detection@1", "--json")
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert entry["name"] == "face_detection" and entry["inference_stats"]["success"]["count"] >= 1
    out = cli("stats", "--socket", str(agent.socket), "face_detection@x")
    assert out.returncode == 2 and "NAME@VERSION" in out.stderr
