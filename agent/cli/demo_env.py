"""The demo's surroundings: child processes (mosquitto, the fleet service, the agent), a small client
of the fleet service's REST API, and the demo's media (a looping 'camera' video, a Silero VAD input).

Only ``edge-agent demo`` uses this module. What needs the ``fleet`` extra (httpx) is imported inside
the functions that use it, so ``edge-agent`` keeps working on a device without the extra.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.client import AgentClient
from agent.errors import AgentError, ClientError

#: Top-level modules of the fleet extra that the demo needs (the service runs in a child process).
FLEET_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "httpx", "cryptography", "python_multipart")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.1) -> Any:
    """Poll ``predicate()`` until it is truthy and return it. Raises: AgentError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AgentError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class ChildExitedError(AgentError):
    """A child process of the demo exited while the demo needed it."""


class Child:
    """A child process of the demo with its output in a log file; stopped with SIGTERM, killed if stuck."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            # a session of its own: Ctrl-C reaches the demo, which stops its children in order
            self.proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raises: ChildExitedError if the process has exited."""
        if not self.alive():
            raise ChildExitedError(f"{self.name} exited with code {self.proc.returncode}; see {self.log}")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, wait, SIGKILL after ``timeout``; the exit code (idempotent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_broker(workdir: Path) -> tuple[Child, str]:
    """mosquitto on a free loopback port, anonymous, for this demo only.

    Raises:
        AgentError: mosquitto is not installed or does not start.
    """
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        raise AgentError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto); "
                         "./scripts/demo installs it when run as root")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "log_dest stdout"]
    if os.geteuid() == 0:
        lines.append("user root")  # stay root: the demo's files are root's
    conf.write_text("\n".join(lines) + "\n")
    broker = Child("mosquitto", [binary, "-c", str(conf)], workdir / "mosquitto.log")

    def listening() -> bool:
        broker.check()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        return False

    try:
        wait_until(listening, 10, "mosquitto to listen", interval=0.05)
    except AgentError:
        broker.stop()
        raise
    return broker, f"mqtt://127.0.0.1:{port}"


def wait_for_line(child: Child, prefix: str, timeout: float) -> str:
    """The first line of ``child``'s log starting with ``prefix``.

    Raises:
        AgentError: the process exited or the line did not come in time.
    """
    def found() -> str | None:
        with child.log.open("rb") as fh:
            for raw in fh:
                line = raw.decode(errors="replace").strip()
                if line.startswith(prefix):
                    return line
        child.check()
        return None

    return str(wait_until(found, timeout, f"{child.name} to start (see {child.log})", interval=0.05))


def wait_agent_ready(client: AgentClient, agent: Child, timeout: float) -> None:
    def live() -> bool:
        agent.check()
        with contextlib.suppress(ClientError):
            return client.request("GET", "/v2/health/live")[0] == 200
        return False

    wait_until(live, timeout, "the agent to serve its socket")


class FleetApi:
    """The fleet service's REST API with a bearer token; every failure becomes one AgentError line."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        import httpx

        self.base = base_url
        self._http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """JSON of a 2xx answer. Raises: AgentError with the service's error code and message."""
        import httpx

        try:
            response = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise AgentError(f"fleet service: {method} {path}: {exc}") from None
        if response.is_success:
            return response.json() if response.content else None
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise AgentError(f"fleet service: {method} {path}: HTTP {response.status_code} {message}")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json=body)


def silero_feeds(seed: int) -> dict[str, np.ndarray]:
    """One Silero VAD input: a 220 Hz tone with a little noise (64 context + 512 samples at 16 kHz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(576, dtype=np.float32) / 16000
    return {"input": (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(576))[None].astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def make_video(path: Path, photos: list[Path], fps: int = 10, seconds: int = 4) -> Path:
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
