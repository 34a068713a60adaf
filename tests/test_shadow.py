"""Shadow deployments against a real agent daemon: signed bundles over loopback HTTP (TUF), a real
mosquitto, a real float ONNX classifier serving while candidates run beside it on live traffic.

- its int8 dynamic quantization as a shadow (HTTP deploy): agreement measured on live requests,
  exposed in ``GET /v1/agent/shadows``, ``/metrics``, ``edge-agent status``/``shadows``, the birth
  message and telemetry; promoted with the CLI (normal swap and health window);
- an input-shuffled copy (MQTT deploy with a policy): its agreement is low and the policy discards it;
- a shadow deployed with the CLI and discarded with the CLI, one promoted with the MQTT command;
- every predict is answered correctly by the serving version throughout (0 failed).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from agent.client import AgentClient
from agent.errors import ClientError
from cloud_sync.bundles.build import build_bundle, generate_test_vectors
from cloud_sync.fleet.console import FleetClient
from cloud_sync.mqtt.settings import BrokerSettings
from tests.conftest import Daemon, start_daemon, wait_for
from tests.deploy_env import DeployEnv
from tests.mqtt_broker import Broker
from tests.shadow_models import classifier, inputs, onnx_runner, quantized, top1_agreement

pytestmark = pytest.mark.timeout(240)

NAME = "clf"
POST = {"postprocess": {"type": "classification", "top_k": 1}}


def bundle(env: DeployEnv, model: Path, version: int) -> Path:
    vectors = generate_test_vectors(model, {"input": inputs(1, seed=version)[0]}, onnx_runner)
    path = build_bundle(model, env.base / "bundles", name=NAME, version=version, manifest_extra=POST,
                        test_vectors=vectors)
    env.publish(path)
    return path


class Traffic:
    """Client threads predicting with the classifier until stopped; every answer is checked against
    the version that serves it (its ``model_version``)."""

    def __init__(self, socket: Path, models: dict[int, Path], clients: int = 2) -> None:
        self.socket, self.stop = socket, threading.Event()
        self.x = inputs(256, seed=7)
        # One row at a time, as served: dynamic quantization scales activations per call.
        self.expected = {v: np.concatenate([onnx_runner(p, {"input": row})["probabilities"] for row in self.x])
                         for v, p in models.items()}
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, i: int) -> None:
        with AgentClient(self.socket, timeout=10) as client:
            n = i
            while not self.stop.is_set():
                k = n % len(self.x)
                n += 1
                try:
                    got = client.infer(NAME, {"input": self.x[k]})["probabilities"]
                    if not any(np.allclose(got, want[k], rtol=1e-4, atol=1e-5) for want in self.expected.values()):
                        self.failures.append(f"request {k}: answer matches no version")
                    self.ok += 1
                except (ClientError, OSError) as exc:
                    self.failures.append(f"client {i}: {exc}")


def api(client: AgentClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, data = client.request(method, path, orjson.dumps(body) if body is not None else b"",
                                     {"Content-Type": "application/json"})
    return status, orjson.loads(data) if data else None


def record(client: AgentClient) -> dict[str, Any]:
    return api(client, "GET", f"/v1/agent/deployments/{NAME}")[1]


def default_version(client: AgentClient) -> int:
    return next(m["version"] for m in client.status()["models"] if m["name"] == NAME and m.get("default"))


def cli(daemon: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--socket", str(daemon.socket)],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def world(tmp_path: Path, samples: dict[str, Path], broker: Broker) -> Any:
    env = DeployEnv.create(tmp_path / "tuf", samples)
    float_model = classifier(tmp_path / "src" / "float.onnx")
    models = tmp_path / "models"
    (models / NAME / "1").mkdir(parents=True)
    (models / NAME / "1" / "model.onnx").write_bytes(float_model.read_bytes())
    extra = (f'[mqtt]\nurl = "{broker.url}"\nbackoff_min_s = 0.1\nbackoff_max_s = 0.5\ntelemetry_interval_s = 1\n'
             "[shadow]\nsample = 0.5\nqueue_size = 16\n")
    config = env.agent_config(tmp_path / "agent.toml", health_window_s=1.0, health_min_requests=5, extra=extra)
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(models),
                          env={"EDGE_AGENT_AGENT__DEVICE_ID": "dev1"})
    fleet = FleetClient(BrokerSettings(url=broker.url))
    fleet.connect()
    fleet.subscribe(["edge/v1/devices/dev1/events", "edge/v1/devices/dev1/state", "edge/v1/devices/dev1/telemetry"])
    try:
        yield env, daemon, fleet, float_model, tmp_path
    finally:
        fleet.close()
        daemon.stop()
        env.close()


def drain(fleet: FleetClient, seen: list[tuple[str, dict[str, Any]]], timeout: float = 0.2) -> None:
    for msg in fleet.messages(timeout, quiet=0.05):
        body = msg.json()
        if isinstance(body, dict):
            seen.append((msg.topic.rsplit("/", 1)[-1], body))


def test_shadow_quantized_then_wrong_candidate(world: Any) -> None:
    env, daemon, fleet, float_model, tmp = world
    client = daemon.client
    int8 = quantized(float_model, tmp / "src" / "int8.onnx")
    wrong = classifier(tmp / "src" / "wrong.onnx", shuffle_inputs=True)
    offline = top1_agreement(float_model, int8)
    bundle(env, int8, 2)
    seen: list[tuple[str, dict[str, Any]]] = []

    with Traffic(daemon.socket, {1: float_model, 2: int8, 3: wrong}) as traffic:
        # 1. The int8 candidate as a shadow, deployed over HTTP; it must not serve.
        status, started = api(client, "POST", f"/v1/agent/models/{NAME}:deploy", {"version": 2, "mode": "shadow"})
        assert status == 202 and started["mode"] == "shadow", started
        wait_for(lambda: record(client)["state"] in ("shadowing", "failed"), 60, "the shadow to start")
        assert record(client)["state"] == "shadowing", record(client)
        assert default_version(client) == 1
        shadow = wait_for(lambda: next((s for s in api(client, "GET", "/v1/agent/shadows")[1]["shadows"]
                                        if s["compared"] >= 300), None), 60, "300 compared samples")
        assert shadow["kind"] == "classification" and shadow["version"] == 2 and shadow["serving_version"] == 1
        agreement = shadow["metrics"]["top1_agreement"]
        print(f"\nint8 vs float top-1 agreement on live traffic: {agreement:.4f} ({shadow['compared']} samples; "
              f"offline on 2000 inputs: {offline:.4f}); mean |dp| {shadow['metrics']['mean_abs_dp']:.5f}; "
              f"latency ms {shadow['latency_ms']}; dropped {shadow['dropped']}")
        assert agreement >= 0.9 and shadow["metrics"]["mean_abs_dp"] < 0.02
        assert shadow["latency_ms"]["shadow"]["p50"] is not None and shadow["latency_ms"]["serving"]["p50"] is not None
        assert client.status()["shadows"][0]["version"] == 2
        metrics = client.metrics()
        assert 'edge_agent_shadow_agreement{kind="classification",metric="top1_agreement",model="clf"' in metrics
        assert "edge_agent_shadow_dropped_total" in metrics
        text = cli(daemon, "status")
        assert text.returncode == 0 and "shadows" in text.stdout and "top1_agreement" in text.stdout, text
        assert "classification" in cli(daemon, "shadows").stdout
        reply = fleet.command("dev1", "shadows", timeout=30)
        assert reply["ok"] and reply["result"]["shadows"][0]["kind"] == "classification", reply

        def fleet_sees_shadow() -> bool:
            drain(fleet, seen)
            birth = any(t == "state" and any(s.get("version") == 2 for s in b.get("shadows") or []) for t, b in seen)
            telemetry = any(t == "telemetry" and any(s.get("compared", 0) > 0 for s in b.get("shadows") or [])
                            for t, b in seen)
            return birth and telemetry

        wait_for(fleet_sees_shadow, 15, "the shadow in the birth message and telemetry")

        # 2. Promote with the CLI: the normal swap and health window.
        promoted = cli(daemon, "promote", NAME)
        assert promoted.returncode == 0, promoted.stderr
        assert record(client)["state"] == "committed" and default_version(client) == 2
        assert api(client, "GET", "/v1/agent/shadows")[1]["shadows"] == []

        # 3. The wrong candidate over MQTT with a policy: low agreement, discarded by itself.
        bundle(env, wrong, 3)
        reply = fleet.command("dev1", "deploy", {"model": NAME, "version": 3, "mode": "shadow",
                                                 "shadow": {"min_samples": 150, "min_agreement": 0.9}}, timeout=60)
        assert reply["ok"] and reply["result"]["state"] == "shadowing", reply
        final = wait_for(lambda: record(client)["state"] == "discarded" and record(client), 60, "the policy to discard")
        assert final["error"]["code"] == "policy" and "under min_agreement" in final["error"]["message"], final

        def discarded_event() -> dict[str, Any] | None:
            drain(fleet, seen)
            return next((b for t, b in seen if t == "events" and b.get("type") == "deploy.discarded"
                         and b.get("version") == 3), None)

        event = wait_for(discarded_event, 15, "deploy.discarded")
        low = event["shadow"]["agreement"]
        print(f"input-shuffled candidate: agreement {low:.4f} after {event['shadow']['compared']} samples: discarded")
        assert low < 0.5
        assert default_version(client) == 2
        assert not list((daemon.socket.parent.parent / "models").glob(f"{NAME}/.staging-*"))

        # 4. The CLI deploys a shadow and discards it; MQTT deploys one and promotes it.
        bundle(env, float_model, 4)
        out = cli(daemon, "deploy", NAME, "--version", "4", "--shadow", "--sample", "1")
        assert out.returncode == 0 and "runs as a shadow of version 2" in out.stdout, out
        wait_for(lambda: api(client, "GET", "/v1/agent/shadows")[1]["shadows"][0]["compared"] >= 20, 30, "samples")
        out = cli(daemon, "discard", NAME)
        assert out.returncode == 0 and "discarded after" in out.stdout, out
        assert record(client)["state"] == "discarded" and record(client)["error"]["code"] == "manual"
        bundle(env, float_model, 5)
        reply = fleet.command("dev1", "deploy", {"model": NAME, "version": 5, "mode": "shadow"}, timeout=60)
        assert reply["ok"] and reply["result"]["state"] == "shadowing", reply
        status, body = api(client, "POST", f"/v1/agent/models/{NAME}:deploy", {"version": 5})
        assert status == 409 and body["code"] == "busy", body  # one shadow at a time, and no swap beside it
        # A promote meant for version 4 (discarded above) must not reach version 5's shadow.
        reply = fleet.command("dev1", "promote", {"model": NAME, "version": 4}, timeout=30)
        assert not reply["ok"] and reply["error"]["code"] == "no_shadow", reply
        assert "version 4" in reply["error"]["message"] and "is version 5" in reply["error"]["message"], reply
        status, body = api(client, "POST", f"/v1/agent/models/{NAME}:discard", {"version": 4})
        assert status == 404 and body["code"] == "no_shadow", body
        assert record(client)["state"] == "shadowing"
        reply = fleet.command("dev1", "promote", {"model": NAME, "version": 5}, timeout=60)
        assert reply["ok"] and reply["result"]["state"] == "committed", reply
        assert default_version(client) == 5
        reply = fleet.command("dev1", "discard", {"model": NAME}, timeout=30)
        assert not reply["ok"] and reply["error"]["code"] == "no_shadow", reply
        time.sleep(0.2)
    assert traffic.ok > 500 and not traffic.failures, traffic.failures[:5]


def test_a_fleet_service_shadow_rollout_reaches_the_real_agent_then_promotes_it(world: Any, broker: Broker) -> None:
    """The fleet service's rollout engine (ingestion, commands, runner; SQLite) against the real agent: the
    device succeeds in ``shadowing``, the service stores its reported shadow, and the operator's promote
    swaps it in on the device."""
    import sqlalchemy as sa

    from cloud_sync.fleet.server import schema as s
    from cloud_sync.fleet.server.db import Database
    from cloud_sync.fleet.server.rollouts import RolloutRunner, Rollouts
    from cloud_sync.fleet.server.service import build
    from tests.fleet_env import settings

    env, daemon, _fleet, float_model, tmp = world
    client = daemon.client
    int8 = quantized(float_model, tmp / "src" / "int8.onnx")
    bundle(env, int8, 2)
    cfg = settings(f"sqlite:///{tmp / 'fleet.db'}", broker.url, tmp, client_id="fleet-shadow")
    db = Database(cfg.db_url)
    db.migrate()
    ctx = build(cfg, db)
    assert ctx.ingestor is not None and ctx.commands is not None
    ctx.ingestor.start()
    try:
        assert ctx.ingestor.wait_ready(10)
        runner, rollouts = RolloutRunner(db, ctx.commands, "fleet-shadow", resend_s=5.0), Rollouts(db)

        def device() -> Any:
            with db.read() as conn:
                return conn.execute(sa.select(s.devices).where(s.devices.c.id == "dev1")).first()

        wait_for(lambda: (row := device()) is not None and row.online, 30, "dev1 online in the fleet database")
        with Traffic(daemon.socket, {1: float_model, 2: int8}) as traffic:
            dep = rollouts.create(model=NAME, version=2, devices=["dev1"], mode="shadow",
                                  shadow={"sample": 1.0, "min_samples": 1000}, wave_timeout_s=120)
            done = wait_for(lambda: (runner.tick(), rollouts.get(dep["id"]))[1]["status"] != "running"
                            and rollouts.get(dep["id"]), 120, "the rollout to finish")
            assert done["status"] == "succeeded", done
            assert record(client)["state"] == "shadowing" and default_version(client) == 1
            with db.read() as conn:
                args = conn.execute(sa.select(s.commands.c.args).where(s.commands.c.name == "deploy")).scalar_one()
            assert args == {"model": NAME, "version": 2, "mode": "shadow",
                            "shadow": {"sample": 1.0, "min_samples": 1000}}
            reported = wait_for(lambda: next((x for x in ((device().telemetry or {}).get("shadows") or [])
                                              if x.get("compared", 0) > 0), None), 30, "the shadow in telemetry")
            assert reported["version"] == 2 and reported["serving_version"] == 1 and reported["sample"] == 1.0
            assert [x["version"] for x in (device().state or {}).get("shadows", [])] == [2]  # the birth's too
            rollouts.act(dep["id"], "promote", commands=ctx.commands, by="test")
            acted = wait_for(lambda: (d := rollouts.get(dep["id"]))["action_counts"]["sent"] == 0
                             and d["action_counts"]["accepted"] == 0 and d, 60, "the promote's answer")
            assert acted["action_counts"]["succeeded"] == 1, acted["devices"]
            assert record(client)["state"] == "committed" and default_version(client) == 2
        assert traffic.ok > 0 and not traffic.failures, traffic.failures[:5]
    finally:
        ctx.ingestor.stop()
        db.dispose()


def test_shadow_arguments_are_checked(world: Any) -> None:
    _env, daemon, _fleet, _float_model, _tmp = world
    client = daemon.client
    for body, fragment in (({"mode": "canary"}, "'mode' must be one of"),
                           ({"mode": "shadow", "shadow": {"sample": 2}}, "shadow.sample"),
                           ({"mode": "shadow", "shadow": {"nope": 1}}, "shadow.nope"),
                           ({"shadow": {"sample": 0.5}}, "applies to mode 'shadow' only")):
        status, answer = api(client, "POST", f"/v1/agent/models/{NAME}:deploy", body)
        assert status == 400 and fragment in answer["error"], (body, answer)
    status, answer = api(client, "POST", "/v1/agent/models/nothing:deploy", {"mode": "shadow"})
    assert status == 409 and answer["code"] == "not_serving", answer
    for verb in ("promote", "discard"):
        status, answer = api(client, "POST", f"/v1/agent/models/{NAME}:{verb}")
        assert status == 404 and answer["code"] == "no_shadow", answer
        for body in ({"version": 0}, {"version": "2"}, {"version": True}, {"model": "x"}, [2]):
            status, answer = api(client, "POST", f"/v1/agent/models/{NAME}:{verb}", body)
            assert status == 400 and answer["code"] == "bad_request", (body, answer)
    out = cli(daemon, "deploy", NAME, "--sample", "0.5")
    assert out.returncode == 2 and "--sample applies to --shadow only" in out.stderr, out


def test_stream_items_are_mirrored_with_their_times(tmp_path: Path, samples: dict[str, Path]) -> None:
    """A Silero VAD stream over real speech: a shadow of the same model (a signed bundle whose manifest
    says ``vad``) sees the stream's windows with their times, and its speech events agree."""
    from tests.media import speech_wav
    from tests.test_streams import VAD_PRE, stream_status

    env = DeployEnv.create(tmp_path / "tuf", samples)
    try:
        env.publish_silero("vad", 2, manifest_extra={"postprocess": {"type": "vad", "threshold": 0.5}})
        (tmp_path / "models" / "vad" / "1").mkdir(parents=True)
        env.copy_model("silero_vad", tmp_path / "models" / "vad" / "1" / "model.onnx")
        wav = speech_wav(tmp_path / "speech.wav", "one two three, and then a long pause before four")
        extra = (f'[shadow]\nsample = 1.0\nqueue_size = 4096\n[stream.mic]\nmodel = "vad"\n'
                 f'source = {{ type = "wav", path = "{wav}", realtime = true }}\npre = {VAD_PRE}\n'
                 'post = { type = "vad", threshold = 0.5 }\nautostart = false\n')
        config = env.agent_config(tmp_path / "agent.toml", extra=extra)
        daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
        try:
            client = daemon.client
            status, started = api(client, "POST", "/v1/agent/models/vad:deploy", {"version": 2, "mode": "shadow"})
            assert status == 202, started
            wait_for(lambda: api(client, "GET", "/v1/agent/deployments/vad")[1]["state"] == "shadowing", 60,
                     "the shadow")
            assert api(client, "POST", "/v1/agent/streams/mic:start")[0] == 200
            wait_for(lambda: stream_status(daemon, "mic")["state"] == "ended", 60, "the WAV to end")
            shadow = wait_for(lambda: next((s for s in api(client, "GET", "/v1/agent/shadows")[1]["shadows"]
                                            if s["queue_depth"] == 0 and s["compared"] > 0), None), 30, "the queue")
            m = shadow["metrics"]
            print(f"\nSilero VAD stream shadowed by itself: {shadow['compared']} windows, events {m}")
            assert shadow["kind"] == "events" and shadow["dropped"] == 0 and shadow["errors"] == 0
            assert shadow["compared"] == stream_status(daemon, "mic")["inferred"]
            assert m["events_serving"] >= 1 and m["event_f1"] == 1.0 and m["decision_agreement"] == 1.0
        finally:
            daemon.stop()
    finally:
        env.close()


def test_a_shadow_does_not_outlive_the_agent(tmp_path: Path, samples: dict[str, Path]) -> None:
    """Stopping the agent discards its shadow (files and all); the next start serves the old version alone."""
    env = DeployEnv.create(tmp_path / "tuf", samples)
    float_model = classifier(tmp_path / "src" / "float.onnx")
    models = tmp_path / "models"
    (models / NAME / "1").mkdir(parents=True)
    (models / NAME / "1" / "model.onnx").write_bytes(float_model.read_bytes())
    bundle(env, quantized(float_model, tmp_path / "src" / "int8.onnx"), 2)
    config = env.agent_config(tmp_path / "agent.toml")
    args = ("--config", str(config), "--models-dir", str(models))
    try:
        daemon = start_daemon(tmp_path / "agent", *args)
        assert api(daemon.client, "POST", f"/v1/agent/models/{NAME}:deploy", {"version": 2, "mode": "shadow"})[0] == 202
        wait_for(lambda: record(daemon.client)["state"] == "shadowing", 60, "the shadow")
        assert list((models / NAME).glob(".staging-2"))
        assert daemon.stop() == 0
        daemon = start_daemon(tmp_path / "agent", *args)
        try:
            final = record(daemon.client)
            assert final["state"] == "discarded" and final["error"]["message"] == "the agent stopped", final
            assert api(daemon.client, "GET", "/v1/agent/shadows")[1]["shadows"] == []
            assert default_version(daemon.client) == 1 and not list((models / NAME).glob(".staging-*"))
            assert sorted(p.name for p in (models / NAME).iterdir()) == ["1"]
        finally:
            daemon.stop()
    finally:
        env.close()
