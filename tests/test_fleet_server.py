"""``edge-fleet server``: settings validation, token commands, and the real process (start, address, stop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from cloud_sync.fleet import cli
from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.config import load_settings, with_client_id
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import ConfigError
from cloud_sync.fleet.server.retention import Retention
from cloud_sync.mqtt.settings import BrokerSettings
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.timeout(60)


def test_defaults_work_out_of_the_box(tmp_path: Path) -> None:
    cfg = load_settings(environ={}, overrides={"state_dir": str(tmp_path)})
    assert cfg.listen_address == ("127.0.0.1", 8080)
    assert str(cfg.db_url) == f"sqlite:///{tmp_path / 'fleet.db'}"
    assert cfg.ingest.shared and cfg.client_id is None
    assert cfg.response_topic == f"edge/v1/console/{cfg.mqtt_client_id}/responses"
    kept = with_client_id(cfg)
    assert kept.client_id == with_client_id(cfg).client_id == (tmp_path / "mqtt-client-id").read_text().strip()
    assert kept.client_id.startswith("edge-fleet-server-")
    other = with_client_id(load_settings(environ={}, overrides={"state_dir": str(tmp_path / "other")}))
    assert other.client_id != kept.client_id  # one state directory per instance: distinct sessions
    pg = load_settings(environ={}, overrides={"db": "postgresql://u:p@db.example/fleet"})
    assert pg.db_url.drivername == "postgresql+psycopg"


def test_settings_errors_name_the_source_and_key(tmp_path: Path) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text('[server]\nlisten = "127.0.0.1:8081"\n[server.ingest]\nbatch_mss = 5\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(toml, environ={})
    assert str(exc.value) == f"{toml}: key 'server.ingest.batch_mss': unknown key"
    toml.write_text('[server.retention.results]\nmax_rows = -1\n')
    with pytest.raises(ConfigError, match=r"server\.retention\.results\.max_rows"):
        load_settings(toml, environ={})
    with pytest.raises(ConfigError, match="environment EDGE_FLEET_SERVER__INGEST__BATCH_MAX"):
        load_settings(environ={"EDGE_FLEET_SERVER__INGEST__BATCH_MAX": "lots"})
    assert load_settings(environ={"EDGE_FLEET_SERVER__INGEST__BATCH_MAX": "7"}).ingest.batch_max == 7
    with pytest.raises(ConfigError, match=r"command line: key 'server\.listen'"):
        load_settings(environ={}, overrides={"listen": "localhost"})
    with pytest.raises(ConfigError, match=r"server\.db"):
        load_settings(environ={}, overrides={"db": "mysql://x/y"})
    with pytest.raises(ConfigError, match=r"broker\.protocol"):
        load_settings(environ={}, broker=BrokerSettings(protocol="3.1.1"))
    toml.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(toml, environ={})


def test_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert cli.main(["server", "--db", db, "token", "create", "--role", "operator", "--name", "ci"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("eft_") and "shown only now" in err
    assert cli.main(["server", "token", "list", "--db", db]) == 0  # the flag also works after the action
    listed = capsys.readouterr().out
    assert '"name": "ci"' in listed and token not in listed
    assert cli.main(["server", "--db", db, "token", "revoke", "1"]) == 0
    assert cli.main(["server", "--db", db, "token", "revoke", "99"]) == 1
    assert "no token 99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["server", "--db", db, "token", "create", "--role", "root"])
    assert exit_.value.code == 2
    assert cli.main(["server", "--db", "mysql://nope", "token", "list"]) == 2


def test_retention_prunes_by_age_and_by_row_cap(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    now = 10_000.0
    with db.write() as conn:
        conn.execute(sa.insert(s.results), [
            {"device_id": "d", "seq": q, "ts": 0.0, "received_at": now - 1000 + q, "stream": "x", "payload": {}}
            for q in range(1, 101)])
        conn.execute(sa.insert(s.gaps), [{"device_id": "d", "first_seq": 5, "last_seq": 6, "detected_at": 0.0}])
    cfg = load_settings(environ={}, overrides={"retention.chunk_rows": 7, "retention.results.max_age_s": 950,
                                               "retention.results.max_rows": 30, "retention.gaps.max_age_s": 10})
    deleted = Retention(db, cfg.retention).prune(now)
    assert deleted == {"results": 70, "gaps": 1}
    with db.read() as conn:
        seqs = conn.execute(sa.select(s.results.c.seq).order_by(s.results.c.seq)).scalars().all()
    assert seqs == list(range(71, 101))  # the newest 30 (the 50 older than 950 s went first)
    assert Retention(db, cfg.retention).prune(now) == {}
    db.dispose()


def _start(tmp_path: Path, broker: Broker, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, STATE_DIRECTORY=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "server", "--broker", broker.url,
                             "--listen", "127.0.0.1:0", *extra], stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "server.log", "w"), text=True, env=env)  # noqa: SIM115
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the address is printed (or the process ends)
    assert line.startswith("edge-fleet server: API at http://127.0.0.1:"), (line, (tmp_path / "server.log")
                                                                            .read_text())
    return proc, line.split()[4].removesuffix("/api")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_server_prints_its_address_serves_and_stops_cleanly(tmp_path: Path, broker: Broker, sig: int) -> None:
    proc, base = _start(tmp_path, broker)
    try:
        deadline = time.monotonic() + 10
        while True:  # the API answers at once; the broker connection may take a moment
            health = httpx.get(f"{base}/api/health").json()
            if health["broker"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert health == {"status": "ok", "database": True, "broker": True}
        assert httpx.get(f"{base}/api/devices").status_code == 401
        assert (tmp_path / "state" / "fleet.db").exists()
        proc.send_signal(sig)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert "fleet.server.stopped" in log and "Traceback" not in log


def test_a_busy_port_is_a_usage_error(tmp_path: Path, broker: Broker) -> None:
    proc, base = _start(tmp_path, broker)
    try:
        port = base.rsplit(":", 1)[1]
        second = subprocess.run([sys.executable, "-m", "cloud_sync.fleet.cli", "server", "--broker", broker.url,
                                 "--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path / 'b.db'}"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 2
        assert f"key 'server.listen': cannot listen on 127.0.0.1:{port}" in second.stderr
    finally:
        proc.terminate()
        proc.wait(20)


def test_deploy_via_server_runs_the_rollout_in_the_service(tmp_path: Path, broker: Broker,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings

    db = f"sqlite:///{tmp_path / 'state' / 'fleet.db'}"
    assert cli.main(["server", "--db", db, "token", "create", "--role", "operator"]) == 0
    token = capsys.readouterr().out.strip()
    proc, base = _start(tmp_path, broker, "--db", db)
    sim = FleetSimulator(SimulatorSettings(devices=4, groups=("lab",), install_time_s=0.1, seed=1),
                         BrokerSettings(url=broker.url, backoff_min_s=0.1, backoff_max_s=1.0))
    sim.start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{base}/api/devices", params={"online": "true"}, headers=headers).json()["items"]) < 4:
            assert time.monotonic() < deadline, "devices did not come online"
            time.sleep(0.1)
        code = cli.main(["deploy", "silero-vad@2", "--group", "lab", "--via-server", base, "--token", token,
                         "--canary", "1", "--wave-size", "2", "--timeout", "30"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "in 3 waves" in out and "wave 3/3" in out and out.rstrip().endswith(
            "succeeded: succeeded 4, failed 0, skipped 0")
        assert sim.counters.deploys_committed == 4
        assert cli.main(["deploy", "silero-vad@2", "--group", "lab", "--via-server", base, "--token", "eft_bad"]) == 1
        assert "fleet service: unauthorized" in capsys.readouterr().err
    finally:
        sim.stop()
        proc.terminate()
        proc.wait(20)


def test_a_shadow_rollout_via_server_then_promote_with_the_cli(tmp_path: Path, broker: Broker,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings

    db = f"sqlite:///{tmp_path / 'state' / 'fleet.db'}"
    assert cli.main(["server", "--db", db, "token", "create", "--role", "operator"]) == 0
    token = capsys.readouterr().out.strip()
    deploy = ["deploy", "silero-vad@2", "--group", "lab", "--via-server", "http://127.0.0.1:9", "--token", token]
    assert cli.main([*deploy, "--sample", "0.5"]) == 2  # policy options need --shadow: refused before any request
    assert "--sample needs --shadow" in capsys.readouterr().err
    assert cli.main([*deploy, "--shadow", "--min-samples", "0"]) == 2
    assert "--min-samples: Input should be greater than or equal to 1" in capsys.readouterr().err
    monkeypatch.delenv("EDGE_FLEET_SERVER", raising=False)
    assert cli.main(["rollout", "promote", "some-id", "--token", token]) == 2
    assert "rollout needs --server URL" in capsys.readouterr().err
    proc, base = _start(tmp_path, broker, "--db", db)
    sim = FleetSimulator(SimulatorSettings(devices=2, groups=("lab",), install_time_s=0.1, seed=1),
                         BrokerSettings(url=broker.url, backoff_min_s=0.1, backoff_max_s=1.0))
    sim.start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{base}/api/devices", params={"online": "true"}, headers=headers).json()["items"]) < 2:
            assert time.monotonic() < deadline, "devices did not come online"
            time.sleep(0.1)
        code = cli.main(["deploy", "silero-vad@2", "--group", "lab", "--via-server", base, "--token", token,
                         "--canary", "2", "--timeout", "30", "--shadow", "--sample", "0.5", "--min-agreement", "0.9"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "as a shadow" in out and "sim-0000: shadowing" in out and "succeeded 2" in out
        dep_id = out.split()[1].rstrip(":")
        dep = httpx.get(f"{base}/api/deployments/{dep_id}", headers=headers).json()
        assert (dep["mode"], dep["shadow"]) == ("shadow", {"sample": 0.5, "min_agreement": 0.9})
        assert (sim.counters.shadows_started, sim.counters.deploys_committed) == (2, 0)
        assert cli.main(["rollout", "promote", dep_id, "--server", base, "--token", token, "--timeout", "30"]) == 0
        out = capsys.readouterr().out
        assert "promote sent to 2 devices" in out and out.rstrip().endswith("promote: succeeded 2, failed 0, "
                                                                             "unanswered 0"), out
        assert sim.counters.shadows_promoted == 2
        assert cli.main(["rollout", "discard", dep_id, "--server", base, "--token", token]) == 1
        assert "fleet service: conflict" in capsys.readouterr().err
    finally:
        sim.stop()
        proc.terminate()
        proc.wait(20)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_uploads_are_mounted_for_admins_when_publishing_is_configured(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from fastapi.testclient import TestClient

    from cloud_sync.fleet.server.api import create_app
    from cloud_sync.fleet.server.auth import TokenStore
    from cloud_sync.fleet.server.context import ServerContext
    from cloud_sync.fleet.server.service import upload_routers

    repo, keys, online = tmp_path / "repo", tmp_path / "keys", tmp_path / "online"
    with pytest.raises(ConfigError, match=r"server\.publish\.repo_dir"):
        upload_routers(load_settings(environ={}, overrides={"publish.repo_dir": str(repo),
                                                            "publish.keys_dir": str(online)}))
    with pytest.raises(ConfigError, match="go together"):
        load_settings(environ={}, overrides={"publish.repo_dir": str(repo)})
    assert cli.main(["keys", "init", "--repo", str(repo), "--keys", str(keys)]) == 0
    assert cli.main(["keys", "export-online", "--repo", str(repo), "--keys", str(keys), "--out", str(online)]) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"server\.publish\.limits\.max_members"):
        upload_routers(load_settings(environ={}, overrides={
            "publish.repo_dir": str(repo), "publish.keys_dir": str(online), "publish.limits": {"max_members": 0}}))
    cfg = load_settings(environ={}, overrides={"publish.repo_dir": str(repo), "publish.keys_dir": str(online),
                                               "db": f"sqlite:///{tmp_path / 'fleet.db'}"})
    db = Database(cfg.db_url)
    db.migrate()
    tokens = TokenStore(db)
    ctx = ServerContext(settings=cfg, db=db, tokens=tokens)
    admin, viewer = tokens.create("admin", "a")[0], tokens.create("viewer", "v")[0]
    with TestClient(create_app(ctx, extra=upload_routers(cfg))) as api:
        assert api.post("/api/models").status_code == 401
        assert api.post("/api/models", headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
        r = api.post("/api/models", headers={"Authorization": f"Bearer {admin}"}, content=b"{}")
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        assert "/api/models" in api.get("/api/openapi.json").json()["paths"]
    with TestClient(create_app(ctx)) as api:  # not configured: not there
        assert api.post("/api/models", headers={"Authorization": f"Bearer {admin}"}).status_code == 404
    db.dispose()
