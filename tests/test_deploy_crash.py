"""Crash safety of the install state machine: SIGKILL the agent at each step, then restart it.

Each case installs ``vad`` version 1 as the active version, starts a real agent, deploys
version 2 (a signed Silero bundle padded with a large file) from a real TUF repository over
loopback HTTP, and kills the agent with SIGKILL at one step: paused there with
the ``tests.plugins.deploy_pause`` plugin, or caught in the act (mid-download, mid-extract, inside the
health window). The agent is then restarted on the same state dir, models dir and config.
Afterwards it must serve a valid model (and never none), the deployment record must say the
step was interrupted, nothing half-installed may be left, and deploying again must commit.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from agent.client import AgentClient
from tests.conftest import Daemon, install, start_daemon
from tests.deploy_env import DeployEnv, silero_inputs, silero_runner
from tests.plugins.deploy_pause import ENV as PAUSE_ENV

pytestmark = pytest.mark.timeout(90)

NAME = "vad"
PAD_BYTES = 16 << 20  # incompressible padding: makes download and extraction take measurable time
BANDWIDTH = 8 << 20  # bytes/s, for the mid-download case only


@dataclass(frozen=True)
class Crash:
    """Where to kill the agent and what recovery must leave behind."""

    at: str  # the record's state when the agent is killed
    # "pause": EDGE_AGENT_DEPLOY_PAUSE_AT=<at>, killed while it sleeps there; otherwise caught in the act:
    # "refresh" (TUF metadata refresh, before the download), "download", "extract", "health" (in the window)
    how: str
    recovered: str  # the record's state after the restart: "failed" (nothing swapped) or "rolled_back"
    health_window_s: float = 0.3


CASES = {
    "mid-refresh": Crash("started", "refresh", "failed"),
    "mid-download": Crash("downloading", "download", "failed"),
    "after-verify": Crash("verified", "pause", "failed"),
    "mid-extract": Crash("verified", "extract", "failed"),
    "after-stage": Crash("staged", "pause", "failed"),
    "after-load": Crash("loaded", "pause", "failed"),
    "after-test": Crash("tested", "pause", "failed"),  # the swap is next
    "after-swap": Crash("swapped", "pause", "rolled_back"),
    # a long window: the kill lands inside it however slowly the checks before it run
    "mid-health-window": Crash("health", "health", "rolled_back", health_window_s=30.0),
}


# -- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> Iterator[DeployEnv]:
    """One repository for the module, serving ``vad`` version 2 padded with PAD_BYTES of random data."""
    base = tmp_path_factory.mktemp("crash-repo")
    env = DeployEnv.create(base, samples)
    pad = base / "padding.bin"
    pad.write_bytes(np.random.default_rng(0).bytes(PAD_BYTES))
    env.publish_silero(NAME, 2, files=(pad,))
    try:
        yield env
    finally:
        env.close()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def record(client: AgentClient) -> dict[str, Any]:
    return dict(client._json("GET", f"/v1/agent/deployments/{NAME}"))


def record_on_disk(state_dir: Path) -> dict[str, Any]:
    return dict(orjson.loads((state_dir / "deployments" / f"{NAME}.json").read_bytes()))


def deploy(client: AgentClient, version: int) -> None:
    client._json("POST", f"/v1/agent/models/{NAME}:deploy", {"version": version})


def finished(client: AgentClient, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        rec = record(client)
        return rec if not rec["running"] and rec["state"] in ("committed", "failed", "rolled_back") else None

    return dict(wait_for(done, "the deployment to finish", timeout, 0.05))


def default_version(client: AgentClient) -> int:
    versions = [m["version"] for m in client.status()["models"] if m["name"] == NAME and m.get("default")]
    assert len(versions) == 1, f"expected one default version of {NAME}, got {versions}"
    return int(versions[0])


def assert_serves_silero(client: AgentClient, samples: dict[str, Path], seed: int) -> None:
    """Whatever version serves, its answer equals onnxruntime's on the original model file."""
    feeds = silero_inputs(seed)
    want = silero_runner(samples["silero_vad"], feeds)
    got = client.infer(NAME, feeds)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def assert_store_consistent(model_dir: Path, active: int) -> None:
    leftovers = sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".staging-"))
    assert not leftovers, f"staging left behind: {leftovers}"
    assert (model_dir / ".active").read_text().strip() == str(active)
    assert (model_dir / str(active) / "model.onnx").is_file(), f".active names {active}, which is not on disk"


def kill(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL


def partial_bytes(state_dir: Path) -> int:
    parts = list((state_dir / "cache" / "partial").glob("*.part"))
    return max((p.stat().st_size for p in parts), default=0)


def crash(case: Crash, daemon: Daemon, samples: dict[str, Path], model_dir: Path, state_dir: Path) -> int:
    """SIGKILL ``daemon`` at ``case.at``; returns the bytes of the partial download at that moment."""
    client = daemon.client
    killed_at = 0
    if case.how in ("pause", "refresh"):
        # ("started" is persisted before the deployer's steps, so the pause hook cannot hold it there;
        # the TUF refresh that follows takes long enough to kill it in the act.)
        wait_for(lambda: record(client)["state"] == case.at, f"state '{case.at}'")
        if case.at == "swapped":
            assert default_version(client) == 2  # the kill lands after the switch, not before
    elif case.how == "download":
        # Kill a third of the way in: enough bytes on disk to show the resume.
        wait_for(lambda: partial_bytes(state_dir) > PAD_BYTES // 3, "a third of the download")
        killed_at = partial_bytes(state_dir)
    elif case.how == "extract":
        # Spin on the file system: extraction of the padded bundle takes tens of milliseconds.
        staging = model_dir / ".staging-2"
        deadline = time.monotonic() + 30
        while not staging.is_dir():
            assert time.monotonic() < deadline, "no staging directory within 30s"
        kill(daemon)
        return 0
    elif case.how == "health":
        wait_for(lambda: record(client)["state"] == "health", "the health window")
        assert default_version(client) == 2
        assert_serves_silero(client, samples, seed=3)
        assert record(client)["state"] == "health"
    kill(daemon)
    return killed_at


# -- the test -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_sigkill_then_restart_recovers(case: Crash, world: DeployEnv, samples: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    install(models, samples, "silero_vad", 1, as_name=NAME)
    model_dir = models / NAME
    (model_dir / ".active").write_text("1\n")  # version 1 came from an earlier deployment
    extra: dict[str, Any] = {"bandwidth_bytes_s": BANDWIDTH} if case.how == "download" else {}
    config = world.agent_config(tmp_path / "agent.toml", health_window_s=case.health_window_s, **extra)
    work = tmp_path / "agent"
    state_dir = work / "state"
    args = ("--config", str(config), "--models-dir", str(models))
    env = ({PAUSE_ENV: f"{case.at}:120", "EDGE_AGENT_AGENT__PLUGINS": '["tests.plugins.deploy_pause"]'}
           if case.how == "pause" else {})

    # 1. Deploy version 2 and kill the agent at the chosen step.
    first = start_daemon(work, *args, env=env)
    try:
        assert default_version(first.client) == 1
        deploy(first.client, 2)
        killed_at = crash(case, first, samples, model_dir, state_dir)
    finally:
        if first.proc.poll() is None:
            first.stop(signal.SIGKILL)
    (work / "agent.log").rename(work / "agent-killed.log")
    on_disk = record_on_disk(state_dir)
    assert on_disk["state"] == case.at, f"killed in '{on_disk['state']}', wanted '{case.at}'"

    # 2. Restart: the interrupted deployment is undone and version 1 serves (the next deploy's window is short).
    world.agent_config(tmp_path / "agent.toml", health_window_s=Crash.health_window_s, **extra)
    seen = len(world.server.requests)
    second = start_daemon(work, *args)
    try:
        rec = record(second.client)
        assert rec["state"] == case.recovered, rec
        assert rec["error"]["code"] == "interrupted", rec
        assert case.at in rec["error"]["message"]
        assert rec["running"] is False
        assert rec["version"] == 2 and rec["previous"] == 1
        assert [s for s, _ in rec["history"][-2:]] == [case.at, case.recovered]
        assert default_version(second.client) == 1
        assert_serves_silero(second.client, samples, seed=1)
        assert_store_consistent(model_dir, active=1)
        assert not (model_dir / "2").exists(), "the interrupted version must not be left where a scan finds it"

        # 3. Deploying again completes (and resumes a partial download).
        deploy(second.client, 2)
        rec = finished(second.client, timeout=60)
        assert rec["state"] == "committed", rec
        assert rec["error"] is None
        assert default_version(second.client) == 2
        assert_serves_silero(second.client, samples, seed=2)
        assert_store_consistent(model_dir, active=2)
        assert not [p for p in model_dir.iterdir() if p.name.startswith((".rejected-", ".replaced-"))]
        assert partial_bytes(state_dir) == 0, "a finished download must not leave its partial file"
        if case.how == "download":
            bundle = [
                (path, rng) for _method, path, rng in world.server.requests[seen:] if path.endswith(f"{NAME}-2.bundle")
            ]
            assert len(bundle) == 1, bundle
            offset = int((bundle[0][1] or "bytes=0-").removeprefix("bytes=").rstrip("-"))
            assert offset >= killed_at, f"resumed at byte {offset}, but {killed_at} bytes were on disk"
    finally:
        second.stop()
