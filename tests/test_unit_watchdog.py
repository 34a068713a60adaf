"""The in-process watchdog (``agent.health.watchdog.Watchdog``) built directly, with fakes of its ports.

The served models are fakes whose (real) statistics and ``busy_since`` the test sets; the
swapper fake loads a "new" model on the first delegate it is given, so the ladder shows in
which delegates each recovery asked for. Metrics are the real Prometheus counters.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.core.metrics import Metrics
from agent.errors import ModelLoadError
from agent.hardware import DelegateSpec
from agent.health import watchdog as watchdog_module
from agent.health.watchdog import Watchdog, WatchdogPolicy
from agent.models.served import ServedModel
from tests.fakes import CPU, FakeClock, FakeSwapper, RecordingSink, drive, fake_session, fake_worker, make_served

FAULTY = "FaultInjectionExecutionProvider"
GPU = "CUDAExecutionProvider"
POLICY = WatchdogPolicy(stuck_after_s=10.0, failures_before_recovery=3, max_recoveries=3, window_s=600.0)


class Rig:
    def __init__(self, policy: WatchdogPolicy = POLICY, profile: tuple[str, ...] = (FAULTY, GPU, CPU)) -> None:
        self.swapper = FakeSwapper(profile={"onnx": [DelegateSpec(name) for name in profile]})
        self.sink = RecordingSink()
        self.metrics = Metrics()
        self.watchdog = Watchdog(policy, self.swapper, self.sink, self.metrics)

    def serve(self, name: str = "vad", version: int = 1, delegate: str = FAULTY) -> ServedModel:
        return self.swapper.add(make_served(name, version, delegate=delegate), active=True)

    def current(self, name: str = "vad", version: int = 1) -> ServedModel:
        served = self.swapper.find(name, version)
        assert served is not None
        return served

    def fail(self, name: str = "vad", version: int = 1, times: int = 3) -> ServedModel:
        """Runtime failures in a row on whatever serves ``name@version`` now."""
        served = self.current(name, version)
        drive(served.stats, failed=times)
        return served

    def recoveries(self, model: str, action: str) -> float:
        return self.metrics.value("edge_agent_watchdog_recoveries", model=model, action=action)

    def fallbacks(self, model: str, runtime: str = "onnx") -> float:
        return self.metrics.value("edge_agent_delegate_fallbacks", model=model, runtime=runtime)


# -- diagnosis --------------------------------------------------------------------------------------------------


def test_diagnose_healthy_model_is_none() -> None:
    rig = Rig()
    served = rig.serve()
    drive(served.stats, ok=10, failed=2)  # failures, but not three in a row at the end
    drive(served.stats, ok=1)
    drive(served.stats, failed=2)
    fake_worker(served).busy_since = time.monotonic() - 9.0  # busy, but under stuck_after_s
    assert rig.watchdog.diagnose(served, time.monotonic()) is None


def test_diagnose_consecutive_failures() -> None:
    rig = Rig()
    served = rig.serve()
    drive(served.stats, failed=3)
    reason, stuck = rig.watchdog.diagnose(served, time.monotonic()) or ("", None)
    assert (reason, stuck) == (f"3 inference failures in a row on {FAULTY}", False)


def test_diagnose_failures_that_are_not_the_runtimes_do_not_count() -> None:
    rig = Rig()
    served = rig.serve()
    drive(served.stats, failed=5, runtime_failure=False)  # e.g. a client that went away
    assert rig.watchdog.diagnose(served, time.monotonic()) is None


def test_diagnose_stuck_call_by_busy_since() -> None:
    rig = Rig()
    served = rig.serve()
    now = 5000.0
    fake_worker(served).busy_since = now - 12.5
    assert rig.watchdog.diagnose(served, now) == ("inference call stuck for 12.5 s", True)


def test_diagnose_stuck_wins_over_failures() -> None:
    rig = Rig()
    served = rig.serve()
    drive(served.stats, failed=3)
    fake_worker(served).busy_since = 0.0
    found = rig.watchdog.diagnose(served, 100.0)
    assert found is not None and found[1] is True


# -- the ladder ---------------------------------------------------------------------------------------------------


async def test_ladder_reload_then_fallback_then_gives_up_once() -> None:
    rig = Rig()
    first = rig.serve()

    # 1. Reload on the same delegates: the whole profile.
    rig.fail()
    await rig.watchdog.check()
    second = rig.current()
    assert second is not first
    assert rig.swapper.prepared[-1].delegates == [FAULTY, GPU, CPU]
    assert rig.swapper.prepared[-1].warm_up is True
    assert fake_session(second).delegate == FAULTY
    assert fake_worker(first).stopped and fake_session(first).closed  # not stuck: closed, not abandoned
    assert second.stats is first.stats and second.stats.consecutive_failures == 0

    # 2. Still failing: fall back past the delegate that failed.
    rig.fail()
    await rig.watchdog.check()
    third = rig.current()
    assert rig.swapper.prepared[-1].delegates == [GPU, CPU]
    assert fake_session(third).delegate == GPU

    # 3. The next delegate fails too: it is excluded as well.
    rig.fail()
    await rig.watchdog.check()
    assert rig.swapper.prepared[-1].delegates == [CPU]
    assert fake_session(rig.current()).delegate == CPU

    recovered = rig.sink.of_type("watchdog.recovered")
    assert [(e["action"], e["from_delegate"], e["to_delegate"]) for e in recovered] == [
        ("reload", FAULTY, FAULTY), ("fallback", FAULTY, GPU), ("fallback", GPU, CPU)]
    assert all(e["model"] == "vad" and e["version"] == 1 and "3 inference failures" in e["reason"]
               for e in recovered)
    assert rig.sink.inventory_changes == 3
    assert rig.watchdog.recoveries == 3
    assert rig.recoveries("vad", "reload") == 1
    assert rig.recoveries("vad", "fallback") == 2
    assert rig.fallbacks("vad") == 2  # the reload stayed on its delegate

    # 4. max_recoveries (3) within window_s: gives up, once, and stops loading.
    rig.fail()
    await rig.watchdog.check()
    await rig.watchdog.check()
    assert len(rig.swapper.prepared) == 3
    gave_up = rig.sink.of_type("watchdog.gave_up")
    assert len(gave_up) == 1
    assert gave_up[0]["recoveries"] == 3 and gave_up[0]["model"] == "vad" and gave_up[0]["version"] == 1
    assert ("vad", 1) in rig.watchdog.gave_up
    assert rig.watchdog.recoveries == 3


async def test_ladder_is_per_model_version() -> None:
    rig = Rig(WatchdogPolicy(max_recoveries=1, failures_before_recovery=1))
    rig.serve("vad", 1)
    rig.serve("vad", 2)
    rig.serve("kws", 1)
    for key in (("vad", 1), ("vad", 2), ("kws", 1)):
        rig.fail(*key, times=1)
    await rig.watchdog.check()
    assert sorted((p.entry.name, p.entry.version, p.delegates[0] if p.delegates else None)
                  for p in rig.swapper.prepared) == [("kws", 1, FAULTY), ("vad", 1, FAULTY), ("vad", 2, FAULTY)]
    assert rig.recoveries("vad", "reload") == 2 and rig.recoveries("kws", "reload") == 1

    rig.fail("vad", 1, times=1)
    await rig.watchdog.check()
    assert [e["model"] for e in rig.sink.of_type("watchdog.gave_up")] == ["vad"]
    assert rig.watchdog.gave_up == {("vad", 1)}


async def test_recoveries_older_than_the_window_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(watchdog_module, "time", clock)
    rig = Rig(WatchdogPolicy(max_recoveries=1, window_s=60.0, failures_before_recovery=1))
    rig.serve()

    rig.fail(times=1)
    await rig.watchdog.check()
    rig.fail(times=1)
    await rig.watchdog.check()
    assert len(rig.swapper.prepared) == 1
    assert len(rig.sink.of_type("watchdog.gave_up")) == 1

    clock.advance(61)
    rig.fail(times=1)
    await rig.watchdog.check()
    assert len(rig.swapper.prepared) == 2
    assert rig.sink.of_type("watchdog.recovered")[-1]["action"] == "reload"


async def test_stuck_worker_is_abandoned_and_replaced() -> None:
    rig = Rig()
    stuck = rig.serve()
    fake_worker(stuck).busy_since = time.monotonic() - 60

    await rig.watchdog.check()

    assert rig.swapper.changes("replace") == [("replace", "vad", 1, True)]
    assert fake_worker(stuck).abandoned is not None  # its thread cannot be joined: it is abandoned, not stopped
    assert not fake_session(stuck).closed
    [event] = rig.sink.of_type("watchdog.recovered")
    assert event["action"] == "reload" and event["reason"].startswith("inference call stuck for 60")
    assert rig.current() is not stuck and fake_worker(rig.current()).busy_since is None


async def test_recovery_that_fails_to_load_is_an_event() -> None:
    rig = Rig()
    served = rig.serve()
    rig.swapper.prepare_error = ModelLoadError("/models/vad/1/model.onnx", "out of memory")
    rig.fail()

    await rig.watchdog.check()

    assert rig.current() is served  # nothing replaced
    assert rig.swapper.changes("replace") == []
    assert rig.sink.events == [{"type": "watchdog.recovery_failed", "model": "vad", "version": 1,
                                "reason": "cannot load /models/vad/1/model.onnx: out of memory"}]
    assert rig.sink.inventory_changes == 0
    assert rig.watchdog.recoveries == 0
    assert rig.recoveries("vad", "reload") == 0


async def test_moot_recovery_closes_the_new_model_quietly() -> None:
    rig = Rig()
    served = rig.serve()
    rig.fail()
    # A deployment unloads this version while the watchdog loads its replacement.
    rig.swapper.on_prepare = lambda _entry: rig.swapper.models["vad"].clear()

    await rig.watchdog.check()

    [new] = rig.swapper.made
    assert rig.swapper.changes("replace") == [("replace", "vad", 1, False)]
    assert fake_session(new).closed and fake_worker(new).stopped
    assert not fake_session(served).closed
    assert rig.sink.events == []
    assert rig.sink.inventory_changes == 0
    assert rig.watchdog.recoveries == 0
    assert rig.recoveries("vad", "reload") == 0


async def test_check_leaves_healthy_models_alone() -> None:
    rig = Rig()
    for v in (1, 2):
        served = rig.serve("vad", v)
        drive(served.stats, ok=100, failed=2)
    await rig.watchdog.check()
    assert rig.swapper.calls == []
    assert rig.sink.events == []


async def test_a_second_give_up_after_the_window_is_announced_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(watchdog_module, "time", clock)
    rig = Rig(WatchdogPolicy(max_recoveries=1, window_s=60.0, failures_before_recovery=1))
    rig.serve()
    for _ in range(2):  # recover, give up
        rig.fail(times=1)
        await rig.watchdog.check()
    clock.advance(61)
    for _ in range(2):  # a new episode: recover, give up again
        rig.fail(times=1)
        await rig.watchdog.check()

    assert len(rig.swapper.prepared) == 2
    assert len(rig.sink.of_type("watchdog.gave_up")) == 2


# -- a fault is confirmed with the known-good input before any recovery (issue 12, item 1) -------------------------
KNOWN_GOOD = {"x": np.zeros((1, 4), np.float32)}


async def test_failures_the_known_good_input_does_not_confirm_are_not_recovered() -> None:
    rig = Rig()
    served = rig.serve()
    served.worker.known_good.warmed_up(KNOWN_GOOD)
    rig.fail()  # e.g. failures that passed, or that a stream's odd input caused

    await rig.watchdog.check()

    assert rig.swapper.prepared == [] and rig.current() is served
    assert served.stats.consecutive_failures == 0  # start over: the next fault is judged afresh
    assert rig.sink.events == [] and rig.watchdog.recoveries == 0


async def test_a_fault_the_known_good_input_confirms_is_recovered_and_the_input_kept() -> None:
    rig = Rig()
    served = rig.serve()
    served.worker.known_good.warmed_up(KNOWN_GOOD)
    fake_session(served).error = RuntimeError("device lost")
    rig.fail()

    await rig.watchdog.check()

    new = rig.current()
    assert new is not served and [e["action"] for e in rig.sink.of_type("watchdog.recovered")] == ["reload"]
    assert new.worker.known_good.source == "warmup"  # the reload (warm-up skipped here) keeps it


async def test_a_known_good_input_that_hangs_confirms_the_fault() -> None:
    rig = Rig(WatchdogPolicy(stuck_after_s=0.2, failures_before_recovery=3, max_recoveries=3, window_s=600.0))
    served = rig.serve()
    served.worker.known_good.warmed_up(KNOWN_GOOD)
    release = threading.Event()

    def hang(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        release.wait(30)
        return [np.zeros((1, 1), np.float32)]

    fake_session(served)._run = hang  # type: ignore[method-assign]
    rig.fail()
    try:
        await rig.watchdog.check()
    finally:
        release.set()
    assert rig.current() is not served and rig.watchdog.recoveries == 1


async def test_without_a_known_good_input_failures_alone_decide() -> None:
    rig = Rig()
    served = rig.serve()
    assert served.worker.known_good.source == "none"
    rig.fail()
    await rig.watchdog.check()
    assert rig.current() is not served and rig.watchdog.recoveries == 1
