"""Persisted rollouts: waves, abort threshold, resume, and a service restart mid-rollout, driven against
simulated devices (the fleet simulator: real device-side link code, idempotent command ids) over mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import ConflictError, RequestError
from cloud_sync.fleet.server.rollouts import RolloutRunner, Rollouts, amount, command_id, plan, wave_failed
from cloud_sync.fleet.server.service import build
from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings
from cloud_sync.mqtt.settings import BrokerSettings
from tests.fleet_env import count, settings, wait_for
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.timeout(90)


def test_planning_arithmetic() -> None:
    devices = [f"d{i:02d}" for i in range(20)]
    assert [len(w) for w in plan(devices, canary="1", wave_size="25%")] == [1, 5, 5, 5, 4]
    assert [len(w) for w in plan(devices, canary="10%", wave_size=None)] == [2, 18]
    assert [len(w) for w in plan(devices, canary="0", wave_size="50%")] == [1, 10, 9]  # a canary of at least 1
    assert plan(devices, canary="1", wave_size="25%")[0] == ["d00"]  # stable order
    assert amount("5%", 250, field="x") == 13 and amount("3", 10, field="x") == 3
    assert wave_failed(1, 1, "5%") and not wave_failed(12, 250, "5%") and wave_failed(13, 250, "5%")
    assert command_id("dep", "d1") == command_id("dep", "d1") != command_id("dep", "d2")
    with pytest.raises(RequestError, match="canary"):
        plan(devices, canary="lots", wave_size=None)
    with pytest.raises(RequestError, match="wave_size"):
        plan(devices, canary="1", wave_size="150%")


class Fleet:
    """Simulated devices, one 'service' (ingestor + commands + runner) that can be killed and restarted."""

    def __init__(self, db_url: str, broker: Broker, tmp_path: Path, **sim: object) -> None:
        self.broker, self.tmp_path = broker, tmp_path
        self.cfg = settings(db_url, broker.url, tmp_path, client_id="fleet-1")
        self.db = Database(self.cfg.db_url)
        self.db.migrate()
        options = {"devices": 8, "groups": ("lab",), "install_time_s": 0.1, "seed": 3, **sim}
        self.sim = FleetSimulator(SimulatorSettings(**options),  # type: ignore[arg-type]
                                  BrokerSettings(url=broker.url, backoff_min_s=0.1, backoff_max_s=1.0))
        self.sim.start()
        self.ctx = None
        self.start_service()
        wait_for(lambda: self.online() == options["devices"], timeout=30, what="devices online in the database")

    def start_service(self, client_id: str = "fleet-1", lease_s: float = 15.0) -> None:
        self.ctx = build(self.cfg.model_copy(update={"client_id": client_id}), self.db)
        self.ctx.ingestor.start()
        assert self.ctx.ingestor.wait_ready(10)
        self.runner = RolloutRunner(self.db, self.ctx.commands, client_id, lease_s=lease_s, resend_s=1.0)
        self.rollouts = Rollouts(self.db)

    def kill_service(self) -> None:
        self.ctx.ingestor.stop()

    def online(self) -> int:
        with self.db.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(s.devices.c.online.is_(True))).scalar_one())

    def run_until(self, dep_id: str, *statuses: str, timeout: float = 30.0) -> dict:
        def done():
            self.runner.tick()
            dep = self.rollouts.get(dep_id)
            return dep if dep["status"] in statuses else None
        return wait_for(done, timeout=timeout, what=f"deployment {' or '.join(statuses)}")

    def close(self) -> None:
        self.ctx.ingestor.stop()
        self.sim.stop()
        self.db.dispose()


@pytest.fixture
def fleet_factory(db_url: str, broker: Broker, tmp_path: Path):
    made: list[Fleet] = []

    def make(**sim: object) -> Fleet:
        made.append(Fleet(db_url, broker, tmp_path, **sim))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


def test_a_rollout_goes_wave_by_wave_to_the_whole_group(fleet_factory) -> None:
    fleet = fleet_factory()
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="1", wave_size="50%",
                                created_by="ops")
    assert (dep["status"], dep["waves"], dep["counts"]["pending"]) == ("running", 3, 8)
    assert [d["wave"] for d in dep["devices"]] == [0, 1, 1, 1, 1, 2, 2, 2]
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
    assert done["status"] == "succeeded", done
    assert done["counts"]["succeeded"] == 8
    assert fleet.sim.counters.deploys_committed == 8
    with fleet.db.read() as conn:  # the devices' new model arrives with their next state
        wait_for(lambda: count(fleet.db, s.device_models, name="silero-vad", version=2) == 8, what="new births")
        assert conn.execute(sa.select(sa.func.count()).select_from(s.commands)
                            .where(s.commands.c.name == "deploy", s.commands.c.ok.is_(True))).scalar_one() == 8


def test_the_abort_threshold_stops_the_rollout_and_resume_carries_on(fleet_factory) -> None:
    fleet = fleet_factory(failure_rate=1.0)
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="1", wave_size="4",
                                abort_threshold="50%")
    aborted = fleet.run_until(dep["id"], "aborted", "succeeded", "failed")
    assert aborted["status"] == "aborted" and "wave 1: 1 of 1 devices failed" in aborted["reason"]
    assert aborted["counts"] == {**aborted["counts"], "failed": 1, "skipped": 7}
    failed = next(d for d in aborted["devices"] if d["status"] == "failed")
    assert failed["error"]["code"] in ("download_failed", "model_load_failed", "test_vectors_failed")
    assert fleet.sim.counters.commands == 1  # nobody past the canary was contacted
    with pytest.raises(ConflictError):
        fleet.rollouts.abort(dep["id"])
    resumed = fleet.rollouts.resume(dep["id"])
    assert resumed["status"] == "running" and resumed["counts"]["pending"] == 7
    again = fleet.run_until(dep["id"], "aborted", "succeeded", "failed")
    assert again["status"] == "aborted" and again["reason"].startswith("wave 2: 4 of 4")
    assert fleet.sim.counters.commands == 5


def test_an_operator_abort_skips_the_devices_not_yet_contacted(fleet_factory) -> None:
    fleet = fleet_factory(install_time_s=30.0)  # the canary never finishes during the test
    dep = fleet.rollouts.create(model="silero-vad", version=2, devices=["sim-0000", "sim-0001", "sim-0002"],
                                canary="1")
    fleet.run_until(dep["id"], "running")
    wait_for(lambda: (fleet.runner.tick(), fleet.rollouts.get(dep["id"])["counts"]["accepted"])[1] == 1,
             what="the canary accepted")
    out = fleet.rollouts.abort(dep["id"], "stop")
    assert out["status"] == "aborted" and out["counts"]["skipped"] == 2
    with pytest.raises(RequestError, match="never seen"):
        fleet.rollouts.create(model="silero-vad", version=2, devices=["sim-0000", "ghost"])
    with pytest.raises(RequestError, match="no online device"):
        fleet.rollouts.create(model="silero-vad", version=2, group="nobody")


@pytest.mark.parametrize("takeover", [False, True], ids=["same-instance-restarts", "another-instance-takes-over"])
def test_a_killed_service_resumes_the_rollout_without_redeploying(fleet_factory, takeover: bool) -> None:
    fleet = fleet_factory(install_time_s=0.5)
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="1", wave_size="50%")
    # run until the second wave is in flight, then kill the service (ingestion, commands, runner)
    wait_for(lambda: (fleet.runner.tick(), fleet.rollouts.get(dep["id"]))[1]["current_wave"] == 1,
             what="wave 2 started")
    wait_for(lambda: (fleet.runner.tick(), fleet.rollouts.get(dep["id"]))[1]["counts"]["pending"] == 3,
             what="wave 2 sent")
    fleet.kill_service()
    if takeover:  # another instance, once the dead one's lease has run out
        with fleet.db.write() as conn:
            conn.execute(sa.update(s.deployments).values(lease_until=0.0))
        fleet.start_service(client_id="fleet-2")
    else:  # the same instance starting again: same client id, same session, its own lease
        fleet.start_service(client_id="fleet-1")
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted", timeout=45)
    assert done["status"] == "succeeded", done
    assert fleet.sim.counters.commands == 8  # each device ran its deploy exactly once
    assert fleet.sim.counters.deploys_committed == 8


def test_a_wave_larger_than_the_send_cap_goes_out_over_several_ticks(fleet_factory) -> None:
    # A tick renews the lease: sending a 25,000-device wave in one took longer than the lease (bench/fleet.py).
    fleet = fleet_factory(install_time_s=0.5)
    fleet.runner = RolloutRunner(fleet.db, fleet.ctx.commands, "fleet-1", resend_s=1.0, send_max=3)
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="8")  # one wave of 8
    fleet.runner.tick()
    first = fleet.rollouts.get(dep["id"])
    assert first["counts"]["pending"] == 5
    assert [d["device_id"] for d in first["devices"] if d["status"] != "pending"] == ["sim-0000", "sim-0001",
                                                                                      "sim-0002"]
    fleet.runner.tick()
    assert fleet.rollouts.get(dep["id"])["counts"]["pending"] == 2
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 8
    assert fleet.sim.counters.commands == 8  # each device ran its deploy once


def test_a_command_that_may_not_have_gone_out_is_sent_again_with_the_same_id(fleet_factory) -> None:
    fleet = fleet_factory(devices=2)
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="2")
    with fleet.db.write() as conn:  # as if the service died between recording the send and the broker's PUBACK
        conn.execute(sa.update(s.deployment_devices).values(status="sending"))
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
    assert done["status"] == "succeeded"
    assert fleet.sim.counters.commands == 2


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_deployments_api(fleet_factory) -> None:
    from fastapi.testclient import TestClient

    from cloud_sync.fleet.server.api import create_app

    fleet = fleet_factory(devices=3, install_time_s=30.0)
    tokens = {role: fleet.ctx.tokens.create(role, role)[0] for role in ("viewer", "operator")}
    with TestClient(create_app(fleet.ctx)) as api:
        def call(method: str, path: str, role: str = "operator", **kw: object):
            return api.request(method, path, headers={"Authorization": f"Bearer {tokens[role]}"}, **kw)

        body = {"model": "silero-vad", "version": 2, "group": "lab", "canary": "1", "wave_size": "50%",
                "abort_threshold": "5%", "wave_timeout_s": 60}
        assert call("POST", "/api/deployments", "viewer", json=body).status_code == 403
        assert call("POST", "/api/deployments", json={**body, "canary": "lots"}).status_code == 422
        assert call("POST", "/api/deployments", json={**body, "devices": ["sim-0000"]}).status_code == 400
        assert call("POST", "/api/deployments", json={**body, "group": "nobody"}).status_code == 400
        r = call("POST", "/api/deployments", json=body)
        assert r.status_code == 201, r.text
        dep = r.json()
        assert (dep["status"], dep["waves"], dep["created_by"]) == ("running", 2, "operator")
        assert [d["device_id"] for d in dep["devices"]] == ["sim-0000", "sim-0001", "sim-0002"]
        fleet.runner.tick()
        listed = call("GET", "/api/deployments", "viewer", params={"status": "running"}).json()
        assert [d["id"] for d in listed["items"]] == [dep["id"]] and listed["items"][0]["devices"] is None
        detail = call("GET", f"/api/deployments/{dep['id']}", "viewer").json()
        assert detail["lease_owner"] == "fleet-1" and detail["counts"]["sent"] + detail["counts"]["accepted"] == 1
        assert call("POST", f"/api/deployments/{dep['id']}/resume").status_code == 409
        r = call("POST", f"/api/deployments/{dep['id']}/abort")
        assert r.status_code == 200 and r.json()["reason"] == "aborted by operator"
        assert call("POST", f"/api/deployments/{dep['id']}/abort").status_code == 409
        assert call("POST", f"/api/deployments/{dep['id']}/resume").json()["status"] == "running"
        assert call("GET", "/api/deployments/nope", "viewer").status_code == 404


# -- shadow rollouts (issue 16) ---------------------------------------------------------------------------------
def _deploy_args(fleet: Fleet, dep_id: str) -> list[dict]:
    with fleet.db.read() as conn:
        return [r.args for r in conn.execute(sa.select(s.commands.c.args).where(
            s.commands.c.name == "deploy", s.commands.c.sent_by == f"deployment:{dep_id}"))]


def _states(fleet: Fleet) -> list[dict]:
    with fleet.db.read() as conn:
        return [r.state for r in conn.execute(sa.select(s.devices.c.state))]


def _settled(fleet: Fleet, dep_id: str, n: int) -> dict:
    def done():
        dep = fleet.rollouts.get(dep_id)
        return dep if dep["action_counts"]["succeeded"] + dep["action_counts"]["failed"] >= n else None
    return wait_for(done, timeout=30, what="every action answered")


def test_a_shadow_rollout_stops_in_shadowing_and_promote_swaps_it_in(fleet_factory) -> None:
    fleet = fleet_factory()
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="1", wave_size="50%",
                                mode="shadow", shadow={"sample": 0.5, "min_samples": 10}, created_by="ops")
    assert (dep["mode"], dep["shadow"], dep["action"]) == ("shadow", {"sample": 0.5, "min_samples": 10}, None)
    with pytest.raises(ConflictError, match="still running"):
        fleet.rollouts.act(dep["id"], "promote", commands=fleet.ctx.commands)
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 8, done
    assert (fleet.sim.counters.shadows_started, fleet.sim.counters.deploys_committed) == (8, 0)
    assert _deploy_args(fleet, dep["id"]) == [{"model": "silero-vad", "version": 2, "mode": "shadow",
                                               "shadow": {"sample": 0.5, "min_samples": 10}}] * 8
    # the devices still serve version 1 and report their shadow (birth: short form; telemetry: the figures)
    wait_for(lambda: count(fleet.db, s.device_models, name="silero-vad", version=1) == 8
             and count(fleet.db, s.device_models, name="silero-vad", version=2) == 0, what="births")
    states = _states(fleet)
    assert all([x["version"] for x in st["shadows"]] == [2] for st in states), states
    swap = fleet.rollouts.create(model="silero-vad", version=3, devices=["sim-0000"])
    fleet.rollouts.abort(swap["id"])
    with pytest.raises(ConflictError, match="swap rollout"):  # a swap rollout has no shadow
        fleet.rollouts.act(swap["id"], "promote", commands=fleet.ctx.commands)
    with pytest.raises(RequestError, match="action"):
        fleet.rollouts.act(dep["id"], "swap", commands=fleet.ctx.commands)

    sent = fleet.rollouts.act(dep["id"], "promote", commands=fleet.ctx.commands, by="ops")
    assert (sent["action"], sent["action_by"]) == ("promote", "ops")
    assert {d["action"] for d in sent["devices"]} == {"promote"}
    promoted = _settled(fleet, dep["id"], 8)
    assert promoted["action_counts"] == {"sent": 0, "accepted": 0, "succeeded": 8, "failed": 0}
    assert {d["action_status"] for d in promoted["devices"]} == {"succeeded"}
    assert fleet.sim.counters.shadows_promoted == 8
    wait_for(lambda: count(fleet.db, s.device_models, name="silero-vad", version=2) == 8, what="promoted births")
    # asking again sends nothing new (every device answered); the other action is refused
    fleet.rollouts.act(dep["id"], "promote", commands=fleet.ctx.commands)
    assert count(fleet.db, s.commands, name="promote") == 8
    with pytest.raises(ConflictError, match="already"):
        fleet.rollouts.act(dep["id"], "discard", commands=fleet.ctx.commands)


def test_discard_reaches_the_devices_that_reached_shadowing_and_records_each_answer(fleet_factory) -> None:
    fleet = fleet_factory(devices=3)
    dep = fleet.rollouts.create(model="silero-vad", version=2, group="lab", canary="3", abort_threshold="50%",
                                mode="shadow")
    assert dep["shadow"] == {}  # the agent's defaults
    with fleet.db.write() as conn:  # one device never got there (as if it had failed)
        conn.execute(sa.update(s.deployment_devices).where(s.deployment_devices.c.device_id == "sim-0002")
                     .values(status="failed"))
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
    assert (done["status"], done["counts"]["succeeded"]) == ("failed", 2)
    assert _deploy_args(fleet, dep["id"]) == [{"model": "silero-vad", "version": 2, "mode": "shadow"}] * 2
    with fleet.db.write() as conn:  # a device the service believes shadowing, which runs no shadow: it says so
        conn.execute(sa.update(s.deployment_devices).where(s.deployment_devices.c.device_id == "sim-0002")
                     .values(status="succeeded"))
    fleet.rollouts.act(dep["id"], "discard", commands=fleet.ctx.commands, by="ops")
    discarded = _settled(fleet, dep["id"], 3)
    assert discarded["action_counts"] == {"sent": 0, "accepted": 0, "succeeded": 2, "failed": 1}
    assert [d["action"] for d in discarded["devices"]] == ["discard", "discard", "discard"]
    failed = next(d for d in discarded["devices"] if d["action_status"] == "failed")
    assert failed["device_id"] == "sim-0002" and failed["action_error"]["code"] == "no_shadow"
    fleet.rollouts.act(dep["id"], "discard", commands=fleet.ctx.commands)  # answered: nothing is sent again
    assert count(fleet.db, s.commands, name="discard") == 3
    assert fleet.sim.counters.shadows_discarded == 2 and fleet.sim.counters.shadows_promoted == 0
    wait_for(lambda: not any(st.get("shadows") for st in _states(fleet)), what="births without shadows")
    wait_for(lambda: count(fleet.db, s.events, type="deploy.discarded") == 2, what="the discarded events")


def test_a_shadow_deploy_answered_committed_is_a_failure(fleet_factory) -> None:
    # An agent that swapped instead of shadowing (e.g. one that ignored the mode) must not count as a success.
    fleet = fleet_factory(devices=1, install_time_s=30.0)
    dep = fleet.rollouts.create(model="silero-vad", version=2, devices=["sim-0000"], mode="shadow")
    wait_for(lambda: (fleet.runner.tick(), fleet.rollouts.get(dep["id"])["counts"]["accepted"])[1] == 1,
             what="the device accepted")
    with fleet.db.write() as conn:
        conn.execute(sa.update(s.commands).where(s.commands.c.id == command_id(dep["id"], "sim-0000")).values(
            status="done", ok=True, response={"ok": True, "status": "done", "result": {"state": "committed"}}))
    done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
    assert done["status"] == "aborted"
    assert done["devices"][0]["error"]["code"] == "not_shadowing"
    with pytest.raises(ConflictError, match="no device reached shadowing"):
        fleet.rollouts.act(dep["id"], "promote", commands=fleet.ctx.commands)


@pytest.mark.parametrize("mode, shadow, field", [
    ("blue", None, "mode"), ("swap", {"sample": 0.5}, "shadow"), ("shadow", {"sample": 0}, "shadow.sample"),
    ("shadow", {"sample": 1.5}, "shadow.sample"), ("shadow", {"min_samples": -1}, "shadow.min_samples"),
    ("shadow", {"min_agreement": 2}, "shadow.min_agreement"), ("shadow", {"min_samples": "lots"}, "shadow.min_samples"),
    ("shadow", {"max_latency_ratio": 0}, "shadow.max_latency_ratio"), ("shadow", {"colour": 1}, "shadow.colour"),
    ("shadow", {"max_latency_ratio": float("inf")}, "shadow.max_latency_ratio"), ("shadow", [0.5], "shadow"),
    ("shadow", {"sample": float("nan")}, "shadow.sample"), ("shadow", {"min_samples": True}, "shadow.min_samples"),
])
def test_bad_shadow_arguments_are_refused_and_store_nothing(db_url: str, mode: str, shadow: dict | None,
                                                            field: str) -> None:
    db = Database(db_url)
    db.migrate()
    try:
        with pytest.raises(RequestError, match=rf"^{field}: "):
            Rollouts(db).create(model="m", version=1, devices=["d"], mode=mode, shadow=shadow)
        assert count(db, s.deployments) == 0
    finally:
        db.dispose()


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_shadow_deployments_api_refuses_hostile_input_and_promotes(fleet_factory) -> None:
    from fastapi.testclient import TestClient

    from cloud_sync.fleet.server.api import create_app

    fleet = fleet_factory(devices=2)
    tokens = {role: fleet.ctx.tokens.create(role, role)[0] for role in ("viewer", "operator")}
    with TestClient(create_app(fleet.ctx)) as api:
        def call(method: str, path: str, role: str = "operator", **kw: object):
            return api.request(method, path, headers={"Authorization": f"Bearer {tokens[role]}"}, **kw)

        body = {"model": "silero-vad", "version": 2, "group": "lab", "canary": "2", "mode": "shadow",
                "shadow": {"sample": 0.25, "min_samples": 50, "min_agreement": 0.9, "max_latency_ratio": 2}}
        hostile = [{"mode": "blue"}, {"mode": 1}, {"mode": None}, {"mode": "swap"},  # shadow args without shadow mode
                   {"shadow": {"sample": 0}}, {"shadow": {"sample": 1.01}}, {"shadow": {"sample": -0.5}},
                   {"shadow": {"sample": "half"}}, {"shadow": {"min_samples": -1}}, {"shadow": {"min_samples": 0}},
                   {"shadow": {"min_samples": 2.5}}, {"shadow": {"min_agreement": 1.5}},
                   {"shadow": {"max_latency_ratio": -1}}, {"shadow": {"extra": True}}, {"shadow": [0.1]},
                   {"shadow": "0.1"}, {"shadow": {"min_samples": True}}, {"shadow": {"sample": "0.5"}},
                   {"shadow": {"min_samples": 10.0}}, {"shadow": {"sample": None, "x": 1}}]
        for change in hostile:
            r = call("POST", "/api/deployments", json={**body, **change})
            assert r.status_code == 422, (change, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        assert "shadow.sample" in call("POST", "/api/deployments", json={**body, "shadow": {"sample": 2}}).text
        assert call("POST", "/api/deployments", "viewer", json=body).status_code == 403
        assert call("GET", "/api/deployments", "viewer").json()["items"] == []  # nothing was stored
        assert count(fleet.db, s.deployments) == 0

        r = call("POST", "/api/deployments", json=body)
        assert r.status_code == 201, r.text
        dep = r.json()
        assert (dep["mode"], dep["shadow"], dep["action"], dep["action_counts"]) == ("shadow", body["shadow"], None,
                                                                                     None)
        assert call("POST", f"/api/deployments/{dep['id']}/promote").json()["error"]["code"] == "conflict"  # running
        done = fleet.run_until(dep["id"], "succeeded", "failed", "aborted")
        assert done["status"] == "succeeded", done
        assert call("POST", f"/api/deployments/{dep['id']}/promote", "viewer").status_code == 403
        assert call("POST", "/api/deployments/nope/promote").status_code == 404
        assert count(fleet.db, s.commands, name="promote") == 0
        r = call("POST", f"/api/deployments/{dep['id']}/promote")
        assert r.status_code == 202, r.text
        assert r.json()["action"] == "promote" and r.json()["action_by"] == "operator"
        _settled(fleet, dep["id"], 2)
        detail = call("GET", f"/api/deployments/{dep['id']}", "viewer").json()
        assert [d["action_status"] for d in detail["devices"]] == ["succeeded", "succeeded"]
        assert detail["action_counts"]["succeeded"] == 2
        assert call("POST", f"/api/deployments/{dep['id']}/discard").status_code == 409
        swap = call("POST", "/api/deployments", json={k: v for k, v in body.items() if k not in ("mode", "shadow")})
        assert swap.json()["mode"] == "swap" and swap.json()["shadow"] is None


def test_rollouts_made_before_migration_0004_are_swap_rollouts(db_url: str) -> None:
    from alembic import command

    from cloud_sync.fleet.server.db import _alembic_config

    db = Database(db_url)
    try:
        cfg = _alembic_config()
        with db.write() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            conn.execute(sa.text("INSERT INTO devices (id, online, first_seen, last_seen) VALUES ('d1', true, 1, 1)"))
            conn.execute(sa.text(
                "INSERT INTO deployments (id, model, version, target, canary, abort_threshold, wave_timeout_s, status,"
                " waves, created_at, updated_at) VALUES ('old', 'm', 2, '{\"devices\": [\"d1\"]}', '1', '1', 60,"
                " 'succeeded', 1, 1, 1)"))
            conn.execute(sa.text("INSERT INTO deployment_devices (deployment_id, device_id, wave, command_id, status)"
                                 " VALUES ('old', 'd1', 0, 'c1', 'succeeded')"))
        assert db.migrate() == "0004"
        old = Rollouts(db).get("old")
        assert (old["mode"], old["shadow"], old["action"], old["action_counts"]) == ("swap", None, None, None)
        assert old["devices"][0]["action_status"] is None
    finally:
        db.dispose()
