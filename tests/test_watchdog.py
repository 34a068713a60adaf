"""The watchdog heals a model whose delegate fails or hangs at inference time.

The failing delegate is the fault-injection delegate of the ``tests.plugins.fault_delegate``
plugin (this machine has no accelerator to fail): it runs the model on the CPU and starts
raising or hanging after N calls.
"""

from __future__ import annotations

import json
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


def start(tmp_path, samples, options: str, watchdog: str = "", extra: str = ""):
    install(tmp_path / "models", samples, "silero_vad")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "faulty.toml").write_text(PROFILE.format(options=options))
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nprofile = "faulty"\nprofiles_dir = "{tmp_path / "profiles"}"\n'
                      f"[watchdog]\n{watchdog}\n{extra}")
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
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the hung request was answered"  # before the client's own 60 s timeout
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


# -- inputs the runtime refuses are the client's fault, never the model's (issue 12, item 1) -------------------
REFUSED_BY_THE_RUNTIME = [  # fit the metadata ([-1, -1], [2, -1, 128], []), fail inside the graph
    {"input": np.zeros((1, 10), np.float32), "state": np.zeros((2, 1, 128), np.float32),
     "sr": np.array(16000, np.int64)},  # too short for the STFT's reflect padding
    {"input": np.zeros((2, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32),
     "sr": np.array(16000, np.int64)},  # batch 2 against a state of batch 1
    {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32),
     "sr": np.array(8000, np.int64)},  # the 8 kHz branch wants another window
]


def _refused_by_the_runtime(daemon, rounds: int = 4) -> list[tuple[int, str]]:
    answers = []
    for _ in range(rounds):
        for bad in REFUSED_BY_THE_RUNTIME:
            with pytest.raises(ClientError) as caught:
                daemon.client.infer("silero_vad", bad)
            answers.append((caught.value.status, str(caught.value)))
    return answers


def _then_a_real_fault_is_still_healed(daemon, direct) -> None:
    """The delegate starts failing for real (``fail_after``): the watchdog confirms it with the
    known-good input and reloads, once; the model then answers right."""
    for i in range(200):
        try:
            daemon.client.infer("silero_vad", feeds(i))
        except ClientError as exc:
            assert exc.status == 500 and "injected delegate failure" in str(exc), exc
            break
    else:
        raise AssertionError("the delegate never started failing")
    wait_for(lambda: '"event": "watchdog.recovered"' in daemon.log_text(), 30, "the watchdog's recovery")
    out = wait_for(lambda: _answer(daemon, feeds(7)), 30, "an answer after the recovery")
    np.testing.assert_allclose(out["output"], direct.run(None, feeds(7))[0], rtol=1e-5, atol=1e-6)
    log = daemon.log_text()
    assert log.count('"event": "watchdog.recovered"') == 1 and '"action": "reload"' in log
    assert "watchdog.gave_up" not in log


def _answer(daemon, value):
    try:
        return daemon.client.infer("silero_vad", value)
    except ClientError:
        return None


def _status(daemon) -> dict:
    return next(m for m in daemon.client.status()["models"] if m["name"] == "silero_vad")


def test_inputs_the_runtime_refuses_are_400_and_never_move_the_model(tmp_path, samples, direct):
    """Known-good input from the configured warm-up. 12 refused inputs with a watchdog that acts
    on one failure and gives up after one recovery: all answered 400, the model stays on its
    delegate; then a real fault is still healed."""
    daemon = start(tmp_path, samples, "fail_after = 60", "failures_before_recovery = 1\nmax_recoveries = 1",
                   "[model.silero_vad.warmup]\nshapes = { input = [1, 576], state = [2, 1, 128] }\n"
                   "values = { sr = 16000 }\n")
    try:
        assert _status(daemon)["known_good"] == "warmup"
        answers = _refused_by_the_runtime(daemon)
        assert all(status == 400 and "runtime refused this input" in message for status, message in answers), answers
        with pytest.raises(ClientError, match="must not be 0") as caught:  # the issue's [1, 3, 0, 0] kind of shape
            daemon.client.infer("silero_vad", {"input": np.zeros((1, 0), np.float32),
                                               "state": np.zeros((2, 1, 128), np.float32),
                                               "sr": np.array(16000, np.int64)})
        assert caught.value.status == 400
        status = _status(daemon)
        assert status["delegate"] == "FaultInjectionExecutionProvider" and status["errors"] == 12
        text = daemon.client.metrics()
        assert 'code="400",model="silero_vad"' in text and 'code="500",model="silero_vad"' not in text
        out = daemon.client.infer("silero_vad", feeds(3))
        np.testing.assert_allclose(out["output"], direct.run(None, feeds(3))[0], rtol=1e-5, atol=1e-6)
        _then_a_real_fault_is_still_healed(daemon, direct)
    finally:
        assert daemon.stop() == 0


def test_the_bundles_test_vector_is_the_known_good_input(tmp_path, samples, direct):
    """A version installed from a bundle: its first test vector tells the faults apart, even with
    no warm-up (Silero's dynamic dimensions skip it) and before any request succeeded."""
    from cloud_sync.bundles import tensor_value

    vector = feeds(11)
    expected = direct.run(None, vector)
    version_dir = tmp_path / "models" / "silero_vad" / "1"
    manifest = {"schema_version": 1, "name": "silero_vad", "version": 1, "runtime": "onnx", "model": "model.onnx",
                "test_vectors": [{"inputs": {k: tensor_value(v) for k, v in vector.items()},
                                  "expected": {"output": tensor_value(expected[0])}}]}
    install(tmp_path / "models", samples, "silero_vad")
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    daemon = start(tmp_path, samples, "fail_after = 60", "failures_before_recovery = 1\nmax_recoveries = 1")
    try:
        assert _status(daemon)["known_good"] == "test_vector"
        answers = _refused_by_the_runtime(daemon)
        assert all(status == 400 and "runtime refused this input" in message for status, message in answers), answers
        assert _status(daemon)["delegate"] == "FaultInjectionExecutionProvider"
        _then_a_real_fault_is_still_healed(daemon, direct)
    finally:
        assert daemon.stop() == 0


def test_without_warm_up_or_vector_the_first_answered_input_is_known_good(tmp_path, samples, direct):
    daemon = start(tmp_path, samples, "", "failures_before_recovery = 1\nmax_recoveries = 1")
    try:
        assert _status(daemon)["known_good"] == "none"
        with pytest.raises(ClientError) as before:  # nothing to compare with yet: the runtime failed, as far as known
            daemon.client.infer("silero_vad", REFUSED_BY_THE_RUNTIME[0])
        assert before.value.status == 500
        wait_for(lambda: _answer(daemon, feeds(1)), 30, "an answer")  # (the watchdog may have reloaded it)
        assert _status(daemon)["known_good"] == "traffic"
        answers = _refused_by_the_runtime(daemon)
        assert all(status == 400 for status, _ in answers), answers
        recoveries = daemon.log_text().count('"event": "watchdog.recovered"')
        assert recoveries <= 1  # at most the one for the failure before anything was known
        out = daemon.client.infer("silero_vad", feeds(2))
        np.testing.assert_allclose(out["output"], direct.run(None, feeds(2))[0], rtol=1e-5, atol=1e-6)
    finally:
        assert daemon.stop() == 0


def test_the_worker_blames_the_input_only_when_the_known_good_input_runs(samples):
    """Worker level, a real Silero session under the fault-injection layer (calls 6 on fail): nothing
    known, then an input learnt from traffic, then a delegate that really fails."""
    from agent.errors import InferenceError, InvalidInputError
    from agent.models.probe import KnownGood
    from agent.models.worker import Worker
    from agent.runtimes.onnx import OnnxBackend
    from tests.plugins.fault_delegate import FaultySession

    session = FaultySession(OnnxBackend().load(samples["silero_vad"], []), "fault", {"fail_after": 5})
    worker = Worker("vad", session)
    try:
        with pytest.raises(InferenceError):  # call 1: nothing known to compare with
            worker.submit_threadsafe(REFUSED_BY_THE_RUNTIME[0]).result(30)
        worker.submit_threadsafe(feeds(0) | {"input": np.zeros((600, 576), np.float32),
                                             "state": np.zeros((2, 600, 128), np.float32)}).result(30)
        assert worker.known_good.source == "none"  # call 2: answered, but too big to keep a copy of
        worker.submit_threadsafe(feeds(0)).result(30)  # call 3: kept
        assert worker.known_good.source == "traffic"
        with pytest.raises(InvalidInputError, match="runtime refused this input"):  # call 4, its probe is call 5
            worker.submit_threadsafe(REFUSED_BY_THE_RUNTIME[1]).result(30)
    finally:
        worker.stop()
    worker = Worker("vad", session)  # calls 6 on: everything fails, the known-good input included
    worker.known_good = KnownGood()
    worker.known_good.warmed_up(feeds(0))
    try:
        with pytest.raises(InferenceError, match="injected delegate failure"):
            worker.submit_threadsafe(REFUSED_BY_THE_RUNTIME[1]).result(30)
    finally:
        worker.stop()
