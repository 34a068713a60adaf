"""The fleet REST API over a seeded database, on SQLite and PostgreSQL (FastAPI's TestClient, no broker)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.api import create_app
from cloud_sync.fleet.server.auth import TokenStore
from cloud_sync.fleet.server.context import ServerContext
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.messages import Topics, parse
from cloud_sync.fleet.server.store import Store
from tests.fleet_env import settings

# Starlette >= 1.x prefers the httpx2 package for its TestClient; httpx still works and older Starlettes need it.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
TOPICS = Topics("edge/v1")
T0 = 1_700_000_000.0
INJECTIONS = ["'; DROP TABLE devices; --", "1 OR 1=1", "x\" OR \"1\"=\"1", "%' --", "dev-a'--", "$(rm -rf /)"]


def rec(topic: str, body: object):
    return parse(TOPICS, f"edge/v1/{topic}", orjson.dumps(body), received_at=time.time(), max_bytes=65536)


def seed(db: Database) -> None:
    store = Store(db)
    store.write_batch([
        rec("devices/dev-a/state", {"online": True, "agent_version": "1.0.0", "profile": "rpi5",
                                    "groups": ["lab", "north"],
                                    "models": [{"name": "faces", "version": 3, "runtime": "tflite",
                                                "delegate": "xnnpack"}]}),
        rec("devices/dev-b/state", {"online": False, "agent_version": "1.1.0", "groups": ["lab"],
                                    "models": [{"name": "vad", "version": 1, "runtime": "onnx", "delegate": "cpu"}]}),
        rec("devices/dev-c/state", {"online": True, "agent_version": "1.0.0"}),
    ], time.time())
    store.write_batch([rec("devices/dev-a/results/cam", {"seq": q, "ts": T0 + q, "model": "faces@3", "n": q})
                       for q in range(1, 31)], time.time())
    store.write_batch([rec("devices/dev-b/results/mic", {"seq": q, "ts": T0 + q, "speech": True})
                       for q in (1, 2, 3, 4, 5, 9)], time.time())
    store.write_batch([rec("devices/dev-a/telemetry", {"seq": 30 + i, "ts": T0 + i * 60, "uptime_s": i,
                                                       "system": {"cpu_percent": float(i), "note": "x"}})
                       for i in range(1, 101)], time.time())
    store.write_batch([rec("devices/dev-a/events", {"seq": 131, "ts": T0 + 131, "type": "deploy.committed"}),
                       rec("devices/dev-a/events", {"seq": 132, "ts": T0 + 132, "type": "fallback"})], time.time())


@pytest.fixture
def env(db_url: str, tmp_path: Path):
    cfg = settings(db_url, "mqtt://127.0.0.1:1", tmp_path, **{"api.max_limit": 20})
    db = Database(cfg.db_url)
    db.migrate()
    seed(db)
    tokens = TokenStore(db)
    ctx = ServerContext(settings=cfg, db=db, tokens=tokens)
    with TestClient(create_app(ctx)) as client:
        client.tokens = {role: tokens.create(role, role)[0] for role in ("viewer", "operator", "admin")}
        client.db = db
        yield client
    db.dispose()


def get(client: TestClient, path: str, role: str = "viewer", **params: object):
    return client.get(path, params=params, headers={"Authorization": f"Bearer {client.tokens[role]}"})


def ok(client: TestClient, path: str, **params: object):
    r = get(client, path, **params)
    assert r.status_code == 200, r.text
    return r.json()


def test_devices_filter_and_page_in_a_stable_order(env: TestClient) -> None:
    assert [d["id"] for d in ok(env, "/api/devices")["items"]] == ["dev-a", "dev-b", "dev-c"]
    assert [d["id"] for d in ok(env, "/api/devices", group="lab")["items"]] == ["dev-a", "dev-b"]
    assert [d["id"] for d in ok(env, "/api/devices", online="true")["items"]] == ["dev-a", "dev-c"]
    assert [d["id"] for d in ok(env, "/api/devices", model="vad")["items"]] == ["dev-b"]
    assert [d["id"] for d in ok(env, "/api/devices", model="faces@3")["items"]] == ["dev-a"]
    assert ok(env, "/api/devices", model="faces@4")["items"] == []
    assert [d["id"] for d in ok(env, "/api/devices", version="1.0.0", group="north")["items"]] == ["dev-a"]
    first = ok(env, "/api/devices", limit=2)
    second = ok(env, "/api/devices", limit=2, cursor=first["next"])
    assert [d["id"] for d in first["items"] + second["items"]] == ["dev-a", "dev-b", "dev-c"]
    assert second["next"] is None
    a = first["items"][0]
    assert a["groups"] == ["lab", "north"] and a["models"] == [{"name": "faces", "version": 3, "runtime": "tflite",
                                                                 "delegate": "xnnpack"}]
    assert get(env, "/api/devices", model="faces@x").status_code == 400


def test_one_device_has_state_latest_telemetry_and_gaps(env: TestClient) -> None:
    a = ok(env, "/api/devices/dev-a")
    assert a["state"]["profile"] == "rpi5" and a["profile"] == "rpi5"
    assert a["telemetry"]["payload"]["system"]["cpu_percent"] == 100.0
    assert ok(env, "/api/devices/dev-b")["gaps"] == {"open": 1, "missing": 3}
    r = get(env, "/api/devices/nobody")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_telemetry_series_is_downsampled_to_at_most_n_points(env: TestClient) -> None:
    series = ok(env, "/api/devices/dev-a/telemetry", metric="system.cpu_percent", since=T0, until=T0 + 6000,
                points=10)
    points = series["points"]
    assert len(points) == 10
    assert sum(p["count"] for p in points) == 99  # samples 1..99 fall in [T0, T0 + 6000)
    assert points[0] == {"ts": T0, "avg": 5.0, "min": 1.0, "max": 9.0, "count": 9}
    assert points[-1]["max"] == 99.0
    assert ok(env, "/api/devices/dev-a/telemetry", metric="system.note", since=T0, until=T0 + 6000)["points"] == []
    assert ok(env, "/api/devices/dev-a/telemetry", metric="uptime_s", since=T0, until=T0 + 6001,
              points=1)["points"][0]["count"] == 100
    assert get(env, "/api/devices/dev-a/telemetry", metric="system..x").status_code == 400
    assert get(env, "/api/devices/dev-a/telemetry", metric="a", since=10, until=5).status_code == 400
    assert get(env, "/api/devices/nobody/telemetry", metric="a").status_code == 404


def test_results_filter_page_and_order(env: TestClient) -> None:
    page = ok(env, "/api/results", device="dev-a", limit=10)
    assert [r["seq"] for r in page["items"]] == list(range(1, 11))
    assert page["items"][0]["payload"]["n"] == 1 and page["items"][0]["model"] == "faces@3"
    seqs = []
    cursor = None
    while True:
        page = ok(env, "/api/results", device="dev-a", limit=7, **({"cursor": cursor} if cursor else {}))
        seqs += [r["seq"] for r in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seqs == list(range(1, 31))
    assert [r["seq"] for r in ok(env, "/api/results", stream="mic", order="desc", limit=2)["items"]] == [9, 5]
    assert [r["seq"] for r in ok(env, "/api/results", device="dev-a", since=T0 + 5, until=T0 + 8)["items"]] == [5, 6, 7]
    assert get(env, "/api/results", cursor="abc").status_code == 400


def test_the_page_size_is_capped(env: TestClient) -> None:
    page = ok(env, "/api/results", limit=10_000)
    assert len(page["items"]) == 20 and page["next"] is not None


def test_results_export_as_ndjson_and_csv_streams_every_match(env: TestClient) -> None:
    r = get(env, "/api/results", device="dev-a", format="ndjson")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [orjson.loads(line) for line in r.content.splitlines()]
    assert [row["seq"] for row in rows] == list(range(1, 31))  # more than one page, all of it
    r = get(env, "/api/results", format="csv", stream="mic")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["seq"]) for row in table] == [1, 2, 3, 4, 5, 9]
    assert orjson.loads(table[0]["payload"])["speech"] is True
    assert len(get(env, "/api/results", format="ndjson", limit=3).content.splitlines()) == 3


def test_events_telemetry_and_gaps_lists(env: TestClient) -> None:
    assert [e["type"] for e in ok(env, "/api/events", device="dev-a")["items"]] == ["deploy.committed", "fallback"]
    assert [e["seq"] for e in ok(env, "/api/events", type="fallback")["items"]] == [132]
    assert len(ok(env, "/api/telemetry", device="dev-a", limit=5)["items"]) == 5
    gaps = ok(env, "/api/gaps")["items"]
    assert [(g["device_id"], g["first_seq"], g["last_seq"], g["missing"]) for g in gaps] == [("dev-b", 6, 8, 3)]
    assert ok(env, "/api/gaps", device="dev-a")["items"] == []


def test_sql_looking_strings_in_every_filter_are_harmless(env: TestClient) -> None:
    params = {"/api/devices": ["group", "model", "version", "cursor"],
              "/api/results": ["device", "stream", "cursor"], "/api/telemetry": ["device", "cursor"],
              "/api/events": ["device", "type", "cursor"], "/api/gaps": ["device", "cursor"],
              "/api/commands": ["device", "cursor"]}
    for path, names in params.items():
        for name in names:
            for value in INJECTIONS:
                r = get(env, path, **{name: value})
                assert r.status_code in (200, 400), (path, name, value, r.text)
                if r.status_code == 200 and name != "cursor":  # a device-id cursor is only a position
                    assert r.json()["items"] == [], (path, name, value)
    for value in INJECTIONS:
        for path in (f"/api/devices/{value}", f"/api/commands/{value}"):
            assert get(env, path).status_code in (404, 400), path
        r = get(env, "/api/devices/dev-a/telemetry", metric=value)
        assert r.status_code == 400
    with env.db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.devices)).scalar_one() == 3


def test_missing_wrong_expired_and_revoked_tokens_are_401(env: TestClient) -> None:
    r = env.get("/api/devices")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer eft_wrong", "Bearer nothing-like-a-token", "Basic dXNlcjpwYXNz",
                   f"Bearer {env.tokens['viewer']}x"):
        r = env.get("/api/devices", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert set(r.json()["error"]) == {"code", "message"}
    past = TokenStore(env.db, clock=lambda: time.time() - 3600)
    expired, _ = past.create("admin", "old", expires_in_s=60)
    r = env.get("/api/devices", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    token, record = TokenStore(env.db).create("viewer", "gone")
    TokenStore(env.db).revoke(record["id"])
    r = env.get("/api/devices", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def test_roles_are_checked_on_every_endpoint(env: TestClient) -> None:
    def call(method: str, path: str, role: str, **kw: object):
        return env.request(method, path, headers={"Authorization": f"Bearer {env.tokens[role]}"}, **kw)

    body = {"json": {"name": "ping"}}
    r = call("POST", "/api/devices/dev-a/commands", "viewer", **body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert call("GET", "/api/tokens", "operator").status_code == 403
    assert call("POST", "/api/tokens", "operator", json={"name": "x", "role": "admin"}).status_code == 403
    assert call("DELETE", "/api/tokens/1", "viewer").status_code == 403
    assert call("POST", "/api/devices/dev-a/commands", "operator", **body).status_code == 503  # no broker here
    # every route but health and the docs needs a token
    for route in env.app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/api/") or path in ("/api/health", "/api/openapi.json", "/api/docs",
                                                    "/api/docs/oauth2-redirect"):
            continue
        for method in getattr(route, "methods", ()) - {"HEAD", "OPTIONS"}:
            url = path.replace("{device_id}", "dev-a").replace("{command_id}", "x").replace("{token_id}", "1")
            assert env.request(method, url).status_code == 401, (method, path)


def test_admin_manages_tokens_over_the_api(env: TestClient) -> None:
    headers = {"Authorization": f"Bearer {env.tokens['admin']}"}
    r = env.post("/api/tokens", json={"name": "ci", "role": "operator"}, headers=headers)
    assert r.status_code == 201
    created = r.json()
    assert created["token"].startswith("eft_") and created["role"] == "operator"
    listed = env.get("/api/tokens", headers=headers).json()["items"]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert env.get("/api/devices", headers={"Authorization": f"Bearer {created['token']}"}).status_code == 200
    assert env.delete(f"/api/tokens/{created['id']}", headers=headers).status_code == 204
    assert env.get("/api/devices", headers={"Authorization": f"Bearer {created['token']}"}).status_code == 401
    assert env.delete("/api/tokens/99999", headers=headers).status_code == 404
    assert env.post("/api/tokens", json={"name": "x", "role": "root"}, headers=headers).status_code == 422


def test_openapi_health_and_json_errors(env: TestClient) -> None:
    spec = env.get("/api/openapi.json").json()
    assert {"/api/devices", "/api/results", "/api/devices/{device_id}/commands", "/api/gaps"} <= set(spec["paths"])
    assert env.get("/api/health").json() == {"status": "ok", "database": True, "broker": None}
    r = get(env, "/api/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = get(env, "/api/results", limit="many")
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("query.limit")
    r = env.put("/api/devices", headers={"Authorization": f"Bearer {env.tokens['admin']}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
