"""Commands through the REST API: published to a real device over mosquitto, final response awaited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud_sync.fleet.server.api import create_app
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.service import build
from tests.fleet_env import RawDevice, device_row, settings, wait_for
from tests.mqtt_broker import Broker

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]


def answer(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A device: ping answers at once; reload answers 'accepted' then its result; 'hang' never answers."""
    cid = body["id"]
    if body["name"] == "ping":
        return [{"id": cid, "ok": True, "status": "done", "result": {"pong": True}, "device_id": "spoofed"}]
    if body["name"] == "reload":
        return [{"id": cid, "ok": True, "status": "accepted"},
                {"id": cid, "ok": True, "status": "done", "result": {"added": ["m"]}}]
    if body["name"] == "hang":
        return None
    return [{"id": cid, "ok": False, "status": "done", "error": {"code": "unknown_command", "message": "no"}}]


@pytest.fixture
def api(db_url: str, broker: Broker, tmp_path: Path):
    cfg = settings(db_url, broker.url, tmp_path, **{"api.command_timeout_s": 5, "api.max_command_timeout_s": 10})
    db = Database(cfg.db_url)
    db.migrate()
    ctx = build(cfg, db)
    assert ctx.ingestor is not None
    ctx.ingestor.start()
    assert ctx.ingestor.wait_ready(10)
    device = RawDevice(broker.url, "cam-1", answer=answer)
    device.publish("state", {"online": True})
    wait_for(lambda: device_row(db, "cam-1"), what="device known")
    tokens = {role: ctx.tokens.create(role, f"{role}-token")[0] for role in ("viewer", "operator")}
    with TestClient(create_app(ctx)) as client:
        client.headers["Authorization"] = f"Bearer {tokens['operator']}"
        client.ctx = ctx
        client.device = device
        client.broker = broker
        client.tokens = tokens
        yield client
    device.close()
    ctx.ingestor.stop()
    db.dispose()


def test_a_command_returns_the_final_response_and_is_recorded(api: TestClient) -> None:
    r = api.post("/api/devices/cam-1/commands", json={"name": "ping"})
    assert r.status_code == 200, r.text
    command = r.json()
    assert (command["status"], command["ok"], command["device_id"]) == ("done", True, "cam-1")
    assert command["response"]["result"] == {"pong": True}
    assert command["sent_by"] == "operator-token"
    sent = api.device.commands.get(timeout=5)
    assert sent == {"id": command["id"], "name": "ping", "args": {}}
    assert api.get(f"/api/commands/{command['id']}").json()["status"] == "done"
    assert [c["id"] for c in api.get("/api/commands", params={"device": "cam-1"}).json()["items"]] == [command["id"]]


def test_a_long_running_command_waits_past_accepted(api: TestClient) -> None:
    r = api.post("/api/devices/cam-1/commands", json={"name": "reload", "args": {"force": True}})
    assert r.status_code == 200, r.text
    assert r.json()["response"]["result"] == {"added": ["m"]}
    assert api.device.commands.get(timeout=5)["args"] == {"force": True}


def test_a_failed_command_is_a_200_with_ok_false(api: TestClient) -> None:
    r = api.post("/api/devices/cam-1/commands", json={"name": "frobnicate"})
    assert r.status_code == 200 and r.json()["ok"] is False
    assert r.json()["response"]["error"]["code"] == "unknown_command"


def test_no_answer_is_a_504_naming_the_command(api: TestClient) -> None:
    r = api.post("/api/devices/cam-1/commands", json={"name": "hang", "timeout_s": 0.5})
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "command_timeout"
    cid = error["message"].rsplit("/", 1)[-1]
    assert api.get(f"/api/commands/{cid}").json()["status"] == "sent"


def test_bad_command_requests_are_4xx(api: TestClient) -> None:
    assert api.post("/api/devices/nobody/commands", json={"name": "ping"}).status_code == 404
    assert api.post("/api/devices/cam-1/commands", json={"name": "Bad Name!"}).status_code == 400
    assert api.post("/api/devices/cam-1/commands", json={"name": "ping", "timeout_s": 3600}).status_code == 400
    assert api.post("/api/devices/cam-1/commands", json={"name": "ping", "extra": 1}).status_code == 422
    assert api.post("/api/devices/cam-1/commands", json={"name": "ping", "args": {"x": "y" * 300_000}}
                    ).status_code == 400
    assert api.post("/api/devices/a%2Fb/commands", json={"name": "ping"}).status_code in (400, 404)
    r = api.post("/api/devices/cam-1/commands", json={"name": "ping"},
                 headers={"Authorization": f"Bearer {api.tokens['viewer']}"})
    assert r.status_code == 403


def test_without_the_broker_commands_are_503(api: TestClient) -> None:
    api.broker.stop()
    wait_for(lambda: not api.ctx.ingestor.connected, what="disconnect")
    r = api.post("/api/devices/cam-1/commands", json={"name": "ping"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
    assert api.get("/api/health").json()["status"] == "degraded"
