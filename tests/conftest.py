"""Shared fixtures: real sample models from PyPI wheels, and a real agent daemon process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient
from agent.errors import ClientError
from agent.samples import fetch

MODEL_FILES = {"silero_vad": "model.onnx", "face_detection": "model.tflite", "okay_nabu": "model.tflite"}


@pytest.fixture(scope="session")
def samples() -> dict[str, Path]:
    """Real models and photos, fetched once per machine (cached under ~/.cache/edge-agent)."""
    return {name: fetch(name) for name in (*MODEL_FILES, "astronaut", "coffee", "brick", "camera")}


def install(models_dir: Path, samples: dict[str, Path], name: str, version: int = 1,
            as_name: str | None = None) -> Path:
    dest = models_dir / (as_name or name) / str(version) / MODEL_FILES[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(samples[name], dest)
    return dest


@pytest.fixture
def models_dir(tmp_path: Path, samples: dict[str, Path]) -> Path:
    root = tmp_path / "models"
    for name in MODEL_FILES:
        install(root, samples, name)
    return root


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``wait_for`` on an event loop: polls ``predicate`` between the loop's other work."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(component: Any) -> AsyncIterator[None]:
    """``component.run()`` (a supervised loop: the scaler, the residency) as a task for the block."""
    task = asyncio.get_running_loop().create_task(component.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    client: AgentClient

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


_started: list[Daemon] = []  # every daemon start_daemon started (see _no_daemon_left)


@pytest.fixture(autouse=True)
def _no_daemon_left() -> Iterator[None]:
    """A test that fails before stopping the daemons it started leaves none running (daemons of
    module fixtures, started before the test, are theirs to stop)."""
    first = len(_started)
    yield
    for daemon in _started[first:]:
        if daemon.proc.poll() is None:
            daemon.client.close()
            daemon.proc.kill()
            daemon.proc.wait(30)
    del _started[first:]


def start_daemon(workdir: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True,
                 timeout: float = 60) -> Daemon:
    """Start ``edge-agent run`` as a real process; wait until its socket answers /v2/health/live."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "agent.sock"
    log = workdir / "agent.log"
    full_env = dict(os.environ, EDGE_AGENT_AGENT__STATE_DIR=str(workdir / "state"),
                    EDGE_AGENT_AGENT__RUNTIME_DIR=str(workdir / "run"), **(env or {}))
    cmd = [sys.executable, "-m", "agent.cli", "run", "--socket", str(sock), "--log-format", "json", *args]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    daemon = Daemon(proc, sock, log, AgentClient(sock, timeout=30))
    _started.append(daemon)
    if wait:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode}:\n{daemon.log_text()}")
            try:
                if daemon.client.request("GET", "/v2/health/live")[0] == 200:
                    break
            except ClientError:
                pass
            if time.monotonic() > deadline:
                daemon.stop(signal.SIGKILL)
                raise AssertionError(f"agent not live after {timeout}s:\n{daemon.log_text()}")
            time.sleep(0.05)
    return daemon


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def factory(*args: str, workdir: Path | None = None, **kw: object) -> Daemon:
        d = start_daemon(workdir or tmp_path / f"agent{len(started)}", *args, **kw)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield factory
    for d in started:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


# --- real mosquitto brokers (tests/mqtt_broker.py) ---------------------------------------------------------------

from tests.mqtt_broker import DEVICE_ACL, Broker, make_broker  # noqa: E402
from tests.pg_fixture import db_url, pg_server  # noqa: E402, F401  (fleet service: SQLite + PostgreSQL)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A started plain mosquitto (anonymous, no ACL) on a free loopback port; ``broker.url`` is mqtt://..."""
    b = make_broker(tmp_path / "mosquitto")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Broker]:
    """A started TLS mosquitto: client certificates required (CN = username), DEVICE_ACL enforced.

    ``tls_broker.tls.client("dev-a")`` gives (cert, key) for a client; ``tls_broker.tls.ca`` is the CA.
    """
    b = make_broker(tmp_path / "mosquitto-tls", tls=True, acl=DEVICE_ACL)
    b.start()
    try:
        yield b
    finally:
        b.stop()
