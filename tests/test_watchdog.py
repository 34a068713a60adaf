"""The watchdog heals a model whose delegate fails or hangs at inference time.

The failing delegate is the fault-injection delegate of the ``tests.plugins.fault_delegate``
plugin (this machine has no accelerator to fail): it runs the model on the CPU and starts
raising or hanging after N calls.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from agent.client import AgentClient
from agent.errors import ClientError
from tests.conftest import install, start_daemon, wait_for

PROFILE = """\
description = "x86 with a delegate that fails on purpose"
priority = 99
[match]
arch = ["x86_64"]
[[runtimes.onnx]]
name = "FaultInjectionExecutionProvider"
options = {{ {options} }}
[[runtimes.onnx]]
name = "CPUExecutionProvider"
"""


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def start(tmp_path, samples, options: str, watchdog: str = ""):
    install(tmp_path / "models", samples, "silero_vad")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "faulty.toml").write_text(PROFILE.format(options=options))
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nprofile = "faulty"\nprofiles_dir = "{tmp_path / "profiles"}"\n'
                      f"[watchdog]\n{watchdog}\n")
    return start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"),
                        env={"EDGE_AGENT_AGENT__PLUGINS": '["tests.plugins.fault_delegate"]'})


def delegate(daemon) -> str:
    return next(m["delegate"] for m in daemon.client.status()["models"] if m["name"] == "silero_vad")




@pytest.fixture(scope="module")
def direct(samples):
    return ort.InferenceSession(str(samples["silero_vad"]), providers=["CPUExecutionProvider"])


def test_failing_delegate_reload_then_fallback_to_cpu(tmp_path, samples, direct):
    daemon = start(tmp_path, samples, "fail_after = 2", "failures_before_recovery = 2")
    try:
        assert delegate(daemon) == "FaultInjectionExecutionProvider"
        outcomes = []
        for i in range(40):
            try:
                daemon.client.infer("silero_vad", feeds(i))
                outcomes.append("ok")
            except ClientError as exc:
                assert exc.status == 500 and "injected delegate failure" in str(exc)
                outcomes.append("err")
            if delegate(daemon) == "CPUExecutionProvider":
                break
            time.sleep(0.3)
        assert delegate(daemon) == "CPUExecutionProvider", outcomes
        log = daemon.log_text()
        assert '"action": "reload"' in log and '"action": "fallback"' in log
        assert '"to_delegate": "CPUExecutionProvider"' in log
        # predictions continue, and they are right
        out = daemon.client.infer("silero_vad", feeds(99))
        np.testing.assert_allclose(out["output"], direct.run(None, feeds(99))[0], rtol=1e-5, atol=1e-6)
        text = daemon.client.metrics()
        assert 'edge_agent_watchdog_recoveries_total{action="fallback",model="silero_vad"} 1.0' in text
    finally:
        assert daemon.stop() == 0


def test_hung_inference_is_recovered(tmp_path, samples, direct):
    daemon = start(tmp_path, samples, "hang_after = 1, hang_s = 120", "stuck_after_s = 1")
    try:
        daemon.client.infer("silero_vad", feeds(0))  # the first call is fine
        model = next(m for m in daemon.client.status()["models"] if m["name"] == "silero_vad")
        assert model["inline"] is False  # not on the CPU: a hang must stall its worker thread, not the API
        errors: list[str] = []

        def hung_call() -> None:
            with AgentClient(daemon.socket, timeout=60) as client:
                try:
                    client.infer("silero_vad", feeds(1))
                except ClientError as exc:
                    errors.append(str(exc))

        thread = threading.Thread(target=hung_call)
        started = time.monotonic()
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the hung request was answered"
        assert time.monotonic() - started < 15
        assert errors and "restarted by the watchdog" in errors[0]
        assert '"event": "watchdog.recovered"' in daemon.log_text()
        out = daemon.client.infer("silero_vad", feeds(2))  # a fresh session serves again
        np.testing.assert_allclose(out["output"], direct.run(None, feeds(2))[0], rtol=1e-5, atol=1e-6)
        assert daemon.client.request("GET", "/v2/health/live")[0] == 200
    finally:
        assert daemon.stop() == 0


def test_recovery_rate_limit_gives_up(tmp_path, samples):
    daemon = start(tmp_path, samples, "fail_after = 0", "failures_before_recovery = 1\nmax_recoveries = 1")
    try:
        for i in range(12):
            with pytest.raises(ClientError):
                daemon.client.infer("silero_vad", feeds(i))
            if "watchdog.gave_up" in daemon.log_text():
                break
            time.sleep(0.3)
        wait_for(lambda: "watchdog.gave_up" in daemon.log_text())
        log = daemon.log_text()
        assert log.count('"event": "watchdog.recovered"') == 1, "one recovery, then the limit"
        assert daemon.client.request("GET", "/v2/health/live")[0] == 200, "the agent keeps running"
    finally:
        assert daemon.stop() == 0
