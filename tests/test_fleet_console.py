"""The web console without a browser: logins, cookies, CSRF and roles over HTTP (the app in process), the page
queries on SQLite and PostgreSQL, plot arithmetic, change detection and the published catalogue.

The browser tests (real Chromium against a real service) are in ``test_fleet_console_browser.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.api import create_app
from cloud_sync.fleet.server.auth import TokenStore
from cloud_sync.fleet.server.config import load_settings
from cloud_sync.fleet.server.console import console_url, installs, live, login_link, mount, series, views
from cloud_sync.fleet.server.console.auth_routes import safe_next
from cloud_sync.fleet.server.console.catalogue import Catalogue
from cloud_sync.fleet.server.console.installs import InstallTracker
from cloud_sync.fleet.server.console.sessions import COOKIE, SessionStore
from cloud_sync.fleet.server.context import ServerContext
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import AuthError

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


class Console:
    """The API app with the console mounted, in process (no MQTT), and a token per role."""

    def __init__(self, db: Database, tmp_path: Path) -> None:
        from fastapi.testclient import TestClient

        cfg = load_settings(environ={}, overrides={"state_dir": str(tmp_path / "state")})
        self.db = db
        self.tokens = TokenStore(db)
        self.ctx = ServerContext(settings=cfg, db=db, tokens=self.tokens)
        app = create_app(self.ctx)
        mount(app, self.ctx)
        self.token = {role: self.tokens.create(role, f"{role}-1")[0] for role in ("viewer", "operator", "admin")}
        self.client = TestClient(app, base_url="http://console.test", follow_redirects=False)

    def login(self, role: str) -> httpx.Client:
        client = self.client
        client.cookies.clear()
        form = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = client.post("/login", data={"csrf": csrf, "token": self.token[role], "next": "/devices"})
        assert r.status_code == 303 and r.headers["location"] == "/devices", r.text
        return client

    def csrf(self) -> str:
        return re.search(r'name="csrf-token" content="([^"]+)"', self.client.get("/devices").text).group(1)


@pytest.fixture
def console(tmp_path: Path) -> Console:
    database = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    database.migrate()
    try:
        yield Console(database, tmp_path)
    finally:
        database.dispose()


def test_login_sets_a_strict_session_cookie_and_a_wrong_token_is_refused(console: Console) -> None:
    c = console.client
    assert c.get("/devices?group=lab").headers["location"] == "/login?next=/devices%3Fgroup%3Dlab"
    assert c.get("/ui/devices").status_code == 401  # fragments and calls: 401, not a redirect
    form = c.get("/login")
    login_cookie = form.headers["set-cookie"]
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie and "Path=/login" in login_cookie
    assert "script-src 'self'" in form.headers["content-security-policy"]
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    bad = c.post("/login", data={"csrf": csrf, "token": "eft_wrong", "next": "/"})
    assert bad.status_code == 401 and "Not logged in: invalid token" in bad.text and COOKIE not in bad.headers.get(
        "set-cookie", "")
    forged = c.post("/login", data={"csrf": "forged", "token": console.token["admin"]})
    assert forged.status_code == 403  # login CSRF; every form shown comes with a new nonce
    csrf = re.search(r'name="csrf" value="([^"]+)"', forged.text).group(1)
    ok = c.post("/login", data={"csrf": csrf, "token": console.token["admin"], "next": "https://evil.example/"})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = next(h for h in ok.headers.get_list("set-cookie") if h.startswith(COOKIE))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie and "Max-Age=" in cookie
    with console.db.read() as conn:  # the cookie's secret is not what the database holds
        stored = conn.execute(sa.select(s.console_sessions.c.id)).scalar_one()
    assert stored not in cookie
    page = c.get("/")
    assert page.status_code == 200 and "admin-1" in page.text and page.headers["x-frame-options"] == "DENY"
    assert page.headers["server-timing"].startswith("app;dur=")


def test_logout_and_revoking_the_token_end_the_session(console: Console) -> None:
    c = console.login("operator")
    csrf = console.csrf()
    assert c.post("/logout", data={"csrf": "nope"}).status_code == 403
    assert c.post("/logout", data={"csrf": csrf}).headers["location"] == "/login"
    assert c.get("/devices").status_code == 303
    c = console.login("viewer")
    assert c.get("/devices").status_code == 200
    viewer_id = next(t["id"] for t in console.tokens.list() if t["role"] == "viewer")
    console.tokens.revoke(viewer_id)
    assert c.get("/devices").status_code == 303  # at once, on every instance: the lookup joins the token


def test_session_store_expiry_follows_the_token(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'f.db'}")
    db.migrate()
    now = [1000.0]
    tokens = TokenStore(db, clock=lambda: now[0])
    store = SessionStore(db, tokens, lifetime_s=100, clock=lambda: now[0])
    short, _ = tokens.create("viewer", "short", expires_in_s=30)
    secret, user = store.login(short)
    assert user.expires_at == 1030 and store.lookup(secret) is not None
    now[0] = 1031
    assert store.lookup(secret) is None
    with pytest.raises(AuthError, match="expired"):
        store.login(short)
    assert store.lookup("x" * 43) is None and store.lookup(None) is None
    db.dispose()


def test_csrf_and_origin_are_checked_on_every_change(console: Console) -> None:
    c = console.login("operator")
    csrf = console.csrf()
    form = {"model": "m@1", "target": "group", "group": "lab", "canary": "1", "abort_threshold": "1",
            "wave_timeout_s": "60", "online_only": "on"}
    assert c.post("/deployments/new", data=form).status_code == 403  # no token
    assert c.post("/deployments/new", data={**form, "csrf": "x" * 43}).status_code == 403
    crossed = c.post("/deployments/new", data={**form, "csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert crossed.status_code == 403 and "cross-origin" in crossed.text
    # with the token and this origin it reaches the rollouts (here: no MQTT, and no such group anyway)
    r = c.post("/deployments/new", data={**form, "csrf": csrf, "model": "bad"},
               headers={"Origin": "http://console.test"})
    assert r.status_code == 400 and "NAME@VERSION" in r.text and 'data-error-for="model"' in r.text
    assert c.post("/devices/d1/command", data={"name": "ping"}, headers={"X-CSRF-Token": "no"}).status_code == 403


def test_roles_hide_controls_and_the_console_refuses_them(console: Console) -> None:
    c = console.login("viewer")
    csrf = console.csrf()
    assert "New deployment" not in c.get("/deployments").text
    assert c.get("/deployments/new").status_code == 403
    r = c.post("/deployments/new", data={"csrf": csrf, "model": "m@1", "group": "lab"})
    assert r.status_code == 403 and "operator role" in r.text
    r = c.post("/devices/d1/command", data={"csrf": csrf, "name": "ping"}, headers={"Accept": "application/json"})
    assert r.status_code == 403
    r = c.post("/deployments/nope/abort", data={"csrf": csrf})
    assert r.status_code == 403
    c = console.login("operator")
    assert "New deployment" in c.get("/deployments").text
    assert c.get("/deployments/nope").status_code == 404
    assert "Uploads are off" not in c.get("/models").text  # only admins are told about uploads


def test_the_wizard_offers_the_shadow_mode_and_names_a_bad_field(console: Console) -> None:
    c = console.login("operator")
    page = c.get("/deployments/new").text
    assert 'id="dep-mode-shadow"' in page and 'name="min_agreement"' in page and 'id="dep-mode-swap" checked' in page
    csrf = console.csrf()
    form = {"csrf": csrf, "model": "m@1", "target": "group", "group": "lab", "canary": "1", "abort_threshold": "1",
            "wave_timeout_s": "60", "online_only": "on", "mode": "shadow"}
    for change, field, text in (({"sample": "2"}, "sample", "less than or equal to 1"),
                                ({"sample": "half"}, "sample", "a number"),
                                ({"min_samples": "-3"}, "min_samples", "greater than or equal to 1"),
                                ({"min_samples": "2.5"}, "min_samples", "a whole number"),
                                ({"min_agreement": "1.2"}, "min_agreement", "less than or equal to 1"),
                                ({"max_latency_ratio": "inf"}, "max_latency_ratio", "a finite number"),
                                ({"mode": "swap", "sample": "0.5"}, "sample", "only for a shadow deployment")):
        r = c.post("/deployments/new", data={**form, **change})
        assert r.status_code == 400, (change, r.text[:300])
        assert f'data-error-for="{field}"' in r.text and text in r.text, (change, field)
        assert f'value="{change.get("sample", change.get(field))}"' in r.text  # the values are kept
    r = c.post("/deployments/new", data={**form, "sample": "0.2"})  # valid: then there is no broker here
    assert r.status_code == 503
    with console.db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.deployments)).scalar_one() == 0


def test_a_shadow_rollout_page_shows_its_mode_and_offers_promote_and_discard(console: Console) -> None:
    from cloud_sync.fleet.server.rollouts import Rollouts

    _fleet(console.db, 2)
    dep = Rollouts(console.db).create(model="vad", version=2, devices=["dev-000", "dev-001"], mode="shadow",
                                      shadow={"sample": 0.25, "min_agreement": 0.9}, canary="2")
    c = console.login("operator")
    page = c.get(f"/deployments/{dep['id']}").text
    assert 'id="rollout-mode"' in page and "sample 0.25" in page and "agreement ≥ 0.9" in page
    assert 'id="promote-button"' not in page  # still running
    assert 'state-shadow">shadow</span>' in c.get("/deployments").text
    with console.db.write() as conn:  # as the runner leaves it: both devices answered in shadowing
        conn.execute(sa.update(s.deployment_devices).values(status="succeeded"))
        conn.execute(sa.update(s.deployments).values(status="succeeded"))
    page = c.get(f"/deployments/{dep['id']}").text
    assert 'id="promote-button"' in page and 'id="discard-button"' in page and "wait for a promote or discard" in page
    assert page.count('data-state="shadowing"') == 2
    r = c.post(f"/deployments/{dep['id']}/promote", data={"csrf": console.csrf()})
    assert r.status_code == 503 and "no MQTT connection" in r.text  # shown with the page, nothing recorded
    assert Rollouts(console.db).get(dep["id"])["action"] is None
    with console.db.write() as conn:  # as an operator's promote leaves it: one answered, one not yet
        conn.execute(sa.update(s.deployments).values(action="promote", action_by="operator-1", action_at=time.time()))
        for dev, status, ok in (("dev-000", "done", True), ("dev-001", "sent", None)):
            conn.execute(sa.update(s.deployment_devices).where(s.deployment_devices.c.device_id == dev)
                         .values(action="promote", action_id=f"a-{dev}"))
            conn.execute(sa.insert(s.commands), [{"id": f"a-{dev}", "device_id": dev, "name": "promote",
                                                  "args": {"model": "vad"}, "sent_at": time.time(), "status": status,
                                                  "ok": ok}])
    page = c.get(f"/deployments/{dep['id']}").text
    assert 'id="promote-button"' not in page and "promote</strong> sent by operator-1" in page
    assert "succeeded 1" in page and "sent 1" in page and "Promote again (1 unanswered)" in page
    c = console.login("viewer")
    assert 'id="promote-button"' not in c.get(f"/deployments/{dep['id']}").text
    assert c.post(f"/deployments/{dep['id']}/discard", data={"csrf": console.csrf()}).status_code == 403


def test_the_device_page_shows_the_shadows_it_reports(console: Console) -> None:
    _fleet(console.db, 1)
    figures = {"model": "vad", "version": 2, "serving_version": 1, "state": "mirroring", "compared": 310,
               "agreement": 0.9871, "dropped": 4, "errors": 0, "latency_ratio": 1.234}
    with console.db.write() as conn:
        conn.execute(sa.update(s.devices).values(state={"online": True, "shadows": [
            {k: figures[k] for k in ("model", "version", "serving_version", "state", "compared", "agreement")}]}))
    c = console.login("viewer")
    page = c.get("/devices/dev-000").text
    assert 'data-shadow="vad@2"' in page and "0.987" in page and "last state" in page
    with console.db.write() as conn:  # telemetry carries the full figures, and wins
        conn.execute(sa.update(s.devices).values(telemetry={"shadows": [figures]}, telemetry_ts=time.time()))
    page = c.get("/devices/dev-000").text
    row = page[page.index('data-shadow="vad@2"'):]
    assert "310" in row and ">4<" in row and "1.23" in row and "From the device's telemetry" in page
    with console.db.write() as conn:
        conn.execute(sa.update(s.devices).values(telemetry={"shadows": []}, state={"shadows": []}))
    assert 'id="shadows"' not in c.get("/devices/dev-000").text


def test_links_for_the_demo() -> None:
    assert console_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/"
    assert login_link("http://127.0.0.1:8080/", "eft_a/b") == "http://127.0.0.1:8080/login#token=eft_a%2Fb"
    assert safe_next("//evil.example") == "/" and safe_next("/api/devices") == "/" and safe_next("/devices?x=1") == \
        "/devices?x=1"


# -- page queries, on SQLite and PostgreSQL ---------------------------------------------------------------------
def _fleet(db: Database, n: int = 120) -> None:
    now = time.time()
    with db.write() as conn:
        conn.execute(sa.insert(s.devices), [
            {"id": f"dev-{i:03d}", "online": i % 3 != 0, "first_seen": now - 100, "last_seen": now - i,
             "agent_version": "1.0" if i % 2 else "1.1", "profile": "rpi5" if i < 60 else "x86",
             "health": {"cpu_percent": float((i * 37) % 100), "memory_percent": 50.0} if i != 7 else None}
            for i in range(n)])
        conn.execute(sa.insert(s.device_groups), [{"device_id": f"dev-{i:03d}", "group": "lab" if i < 30 else "field"}
                                                  for i in range(n)])
        conn.execute(sa.insert(s.device_models), [
            {"device_id": f"dev-{i:03d}", "name": "vad", "version": 1 + i % 2, "runtime": "onnx",
             "delegate": "CPUExecutionProvider"} for i in range(n)])


def test_devices_table_sorts_filters_and_pages_in_the_database(db: Database) -> None:
    _fleet(db)
    with db.read() as conn:
        rows, total = views.devices_page(conn, views.DeviceQuery(per_page=25))
        assert total == 120 and [r["id"] for r in rows[:2]] == ["dev-000", "dev-001"] and len(rows) == 25
        rows, _ = views.devices_page(conn, views.DeviceQuery(sort="cpu", desc=True, per_page=200))
        cpus = [r["health"].get("cpu_percent") for r in rows]
        assert cpus[:-1] == sorted(cpus[:-1], reverse=True) and cpus[-1] is None  # no figure: last either way
        rows, total = views.devices_page(conn, views.DeviceQuery(group="lab", online="no", model="vad@1", page=1))
        assert total == 5 and all(r["groups"] == ["lab"] and not r["online"] for r in rows)
        assert [m["version"] for r in rows for m in r["models"]] == [1] * 5
        rows, total = views.devices_page(conn, views.DeviceQuery(q="%", per_page=25))  # LIKE wildcards are literal
        assert total == 0
        rows, total = views.devices_page(conn, views.DeviceQuery(q="-11", sort="last_seen", per_page=25, page=1))
        assert total == 10 and [r["id"] for r in rows] == [f"dev-{i:03d}" for i in range(119, 109, -1)]
        last, _ = views.devices_page(conn, views.DeviceQuery(page=5, per_page=25))
        assert [r["id"] for r in last][-1] == "dev-119" and len(last) == 20
    q = views.DeviceQuery.parse({"sort": "cpu; drop", "page": "-3", "per_page": "7", "online": "maybe"})
    assert (q.sort, q.page, q.per_page, q.online) == ("id", 1, 50, "")
    assert views.DeviceQuery(sort="cpu").sorted_by("cpu") == "sort=cpu&dir=desc"


def test_overview_counts(db: Database) -> None:
    _fleet(db, 30)
    now = time.time()
    with db.write() as conn:
        conn.execute(sa.insert(s.results), [{"device_id": "dev-001", "seq": q, "ts": now, "received_at": now - 120 + q,
                                             "stream": "cam", "payload": {}} for q in range(1, 101)])
        conn.execute(sa.insert(s.events), [{"device_id": "dev-002", "seq": 1, "ts": now, "received_at": now,
                                            "type": "deploy.failed", "payload": {"model": "vad", "version": 3,
                                                                                  "error": {"code": "x"}}}])
    with db.read() as conn:
        o = views.overview(conn, now)
    assert (o["devices"], o["online"], o["offline"]) == (30, 20, 10)
    assert o["results_last_minute"] == 41  # arrived in the last 60 s: seqs 60..100
    assert o["profiles"] == [("rpi5", 30)] and o["delegates"] == [("CPUExecutionProvider", 30)]
    assert [(v["version"], v["devices"]) for v in o["versions"]] == [(2, 15), (1, 15)]
    assert o["failures"][0]["device_id"] == "dev-002"


def test_latest_results_per_stream_and_signatures(db: Database) -> None:
    _fleet(db, 2)
    with db.write() as conn:
        conn.execute(sa.insert(s.results), [{"device_id": "dev-001", "seq": q, "ts": q, "received_at": q,
                                             "stream": "cam" if q % 2 else "mic", "payload": {"q": q}}
                                            for q in range(1, 21)])
    feed = live.LiveFeed(db, interval=0.0, look_gap=0.0)
    before = feed.digests("device", "dev-001")
    with db.read() as conn:
        latest = views.latest_results(conn, "dev-001", per_stream=3)
    assert {k: [r["seq"] for r in v] for k, v in latest.items()} == {"cam": [19, 17, 15], "mic": [20, 18, 16]}
    with db.write() as conn:
        conn.execute(sa.insert(s.results), [{"device_id": "dev-001", "seq": 21, "ts": 21, "received_at": 21,
                                             "stream": "mic", "payload": {}}])
    after = feed.digests("device", "dev-001")
    assert after["results"] != before["results"] and after["events"] == before["events"]


def test_rollout_states_come_from_install_events(db: Database) -> None:
    from cloud_sync.fleet.server.rollouts import Rollouts

    _fleet(db, 3)
    rollouts = Rollouts(db)
    dep = rollouts.create(model="vad", version=2, devices=["dev-000", "dev-001", "dev-002"], canary="1",
                          wave_size="2", created_by="t")
    feed = live.LiveFeed(db, interval=0.0, look_gap=0.0)
    before = feed.digests("rollout", dep["id"])
    now = time.time() + 1
    events = [("dev-000", 1, "deploy.downloading", 2, None), ("dev-000", 2, "deploy.committed", 2, None),
              ("dev-001", 1, "deploy.failed", 2, {"code": "test_vectors_failed", "message": "differs"}),
              ("dev-002", 1, "deploy.committed", 1, None)]  # another version: not this rollout's
    with db.write() as conn:
        conn.execute(sa.insert(s.events), [{"device_id": d, "seq": q, "ts": now + q, "received_at": now + q, "type": t,
                                            "payload": {"model": "vad", "version": v, "error": e}}
                                           for d, q, t, v, e in events])
    assert feed.digests("rollout", dep["id"]) != before
    dep = rollouts.get(dep["id"], with_devices=False)
    tracker = InstallTracker(overlap_s=5.0, rescan_s=3600)
    with db.read() as conn:
        view = views.rollout_view(dep, views.rollout_states(conn, dep, tracker.newest(conn, dep)))
    states = {d.device_id: (d.state, d.code) for w in view["wave_devices"] for d in w}
    assert states == {"dev-000": ("committed", None), "dev-001": ("failed", "test_vectors_failed"),
                      "dev-002": ("pending", None)}
    assert [len(w) for w in view["wave_devices"]] == [1, 2] and view["tally"] == {"committed": 1, "failed": 1,
                                                                                   "pending": 1}
    # the tracker reads only what arrived since its last look (with an overlap), and keeps the newest
    with db.write() as conn:
        conn.execute(sa.insert(s.events), [{"device_id": "dev-002", "seq": 9, "ts": now + 9, "received_at": now + 9,
                                            "type": "deploy.verified", "payload": {"model": "vad", "version": 2}}])
    with db.read() as conn:
        again = {st.device_id: st.state for st in views.rollout_states(conn, dep, tracker.newest(conn, dep))}
        assert again == {"dev-000": "committed", "dev-001": "failed", "dev-002": "verified"}
        assert [i.event_id for i in installs.read_installs(conn, dep, 5)] == [5]  # only what is new
        assert installs.first_id_since(conn, now + 5) == 5 and installs.first_id_since(conn, now + 60) is None
    # a batch stamped long before it committed (a busy database) is still seen: the read starts after the
    # highest id of the last look, not at a time
    with db.write() as conn:
        conn.execute(sa.insert(s.events), [{"device_id": "dev-002", "seq": 10, "ts": now + 10,
                                            "received_at": now - 3600, "type": "deploy.loaded",
                                            "payload": {"model": "vad", "version": 2}}])
    with db.read() as conn:
        assert tracker.newest(conn, {**dep, "created_at": now - 7200})["dev-002"].step == "loaded"
    assert views.shown_state("timeout", "downloading") == "timeout"  # the rollout gave up on it
    assert views.shown_state("succeeded", "health") == "committed"  # the final answer came before the event
    assert views.shown_state("sent", None) == "sent" and views.shown_state("sent", "verified") == "verified"
    # a shadow rollout: a device succeeds in shadowing; a promote then goes on to committed, a discard ends it
    assert views.shown_state("succeeded", "tested", "shadow") == "shadowing"
    assert views.shown_state("succeeded", None, "shadow") == "shadowing"
    assert views.shown_state("succeeded", "shadowing", "shadow") == "shadowing"
    assert views.shown_state("succeeded", "health", "shadow") == "health"
    assert views.shown_state("succeeded", "committed", "shadow") == "committed"
    assert views.shown_state("succeeded", "discarded", "shadow") == "discarded"
    assert views.shown_state("failed", "loaded", "shadow") == "failed"


def test_series_reads_thinned_samples(db: Database) -> None:
    _fleet(db, 1)
    now = time.time()
    with db.write() as conn:
        conn.execute(sa.insert(s.telemetry), [
            {"device_id": "dev-000", "seq": q, "ts": now - 3000 + q, "received_at": now, "payload": {
                "system": {"cpu_percent": float(q % 100), "memory": {"percent": 40.0}, "temperatures": {"cpu": 50}},
                "models": [{"name": "vad", "requests": q * 10}], "outbox": {"depth": q % 7}}} for q in range(1, 3001)])
    with db.read() as conn:
        out = series.series(conn, "dev-000", "1h", now)
        thin = series.read_samples(conn, "dev-000", now - 3600, now, max_rows=100)
    # 3000 samples over 50 min in 1500 slices of the hour: one per 2.4 s slice
    assert 1200 <= len(out["x"]) <= 1500 and set(out["metrics"]["temperature"]) == {50.0}
    assert out["x"] == sorted(out["x"]) and out["x"][-1] >= now - 3 and None not in out["metrics"]["cpu"]
    assert 80 <= len(thin) <= 100 and thin == sorted(thin, key=lambda r: r[0])  # 100 slices of the hour, 50 min of data
    assert {round(r, 6) for r in out["models"]["vad"]["rate"][1:]} == {10.0}
    assert not out["latency"]


def test_series_arithmetic() -> None:
    samples: list[Any] = [
        (0.0, {"cpu_percent": 10}, [{"name": "a", "requests": 0, "latency_ms": {"p50": 1.5, "p99": 4}}], {"depth": 0}),
        (10.0, {"cpu_percent": 20}, [{"name": "a", "requests": 50}], None),
        (20.0, {"cpu_percent": True}, [{"name": "a", "requests": 10}, {"name": "b", "requests": 5}], {"depth": 3}),
        (100.0, None, [{"name": "a", "requests": 30}], {"depth": 1}),  # after a silence: a break first
    ]
    out = series.build(samples)
    assert out["x"] == [0.0, 10.0, 20.0, 60.0, 100.0]
    assert out["metrics"]["cpu"] == [10.0, 20.0, None, None, None]
    assert out["metrics"]["outbox"] == [0.0, None, 3.0, None, 1.0]
    assert out["models"]["a"]["rate"] == [None, 5.0, None, None, None]  # a counter that drops restarted
    assert out["models"]["a"]["p50"] == [1.5, None, None, None, None]
    assert out["models"]["b"]["rate"] == [None, None, None, None, None] and len(out["models"]["b"]["p99"]) == 5


def test_live_stream_names_changed_parts_once(db: Database) -> None:
    _fleet(db, 1)
    feed = live.LiveFeed(db, interval=0.01, look_gap=0.0)
    seen = feed.digests("devices", "")

    async def run() -> list[str]:
        chunks: list[str] = []
        calls = 0

        async def disconnected() -> bool:
            nonlocal calls
            calls += 1
            if calls == 3:
                with db.write() as conn:
                    conn.execute(sa.update(s.devices).values(last_seen=time.time() + 5))
            return calls > 8

        async for chunk in feed.stream("devices", "", seen, disconnected):
            chunks.append(chunk)
        return chunks

    chunks = asyncio.run(asyncio.wait_for(run(), 10))
    assert chunks[0] == "retry: 1000\n\n" and [c.split("\n")[0] for c in chunks[1:]] == ["event: devices"]
    feed.closing.set()
    assert asyncio.run(asyncio.wait_for(_collect(feed.stream("devices", "", {}, _never)), 5)) == ["retry: 1000\n\n"]


async def _never() -> bool:
    return False


async def _collect(stream: Any) -> list[str]:
    return [chunk async for chunk in stream]


def test_catalogue_lists_signed_bundles_with_their_test_vectors(tmp_path: Path, samples: dict[str, Path]) -> None:
    from cloud_sync.fleet.publishing import PublishSettings
    from tests.deploy_env import DeployEnv

    assert Catalogue(None).listing().entries == []
    env = DeployEnv.create(tmp_path, samples)
    try:
        env.repo.publish(env.build("vad", 1))
        env.repo.publish(env.build("vad", 2, vectors=False))
        catalogue = Catalogue(PublishSettings(repo_dir=env.repo.dir, keys_dir=env.base / "keys"))
        listing = catalogue.listing()
        assert [(e.ref, e.runtime, e.test_vectors) for e in sorted(listing.entries, key=lambda e: e.version)] == [
            ("vad@1", "onnx", 1), ("vad@2", "onnx", 0)]
        assert listing.threshold == 1 and len(listing.signed_by) == 1 and listing.targets_version == 3
        assert catalogue.listing() is listing  # unchanged timestamp.json: not read again
        assert [name for name, _ in listing.by_name()] == ["vad"]
    finally:
        env.close()


def test_results_show_a_snapshot_only_when_it_is_an_image(console: Console) -> None:
    now = time.time()
    jpeg = "data:image/jpeg;base64,/9j/4AAQSkZJRg=="
    with console.db.write() as conn:
        conn.execute(sa.insert(s.devices), [{"id": "cam-1", "online": True, "first_seen": now, "last_seen": now}])
        conn.execute(sa.insert(s.results), [
            {"device_id": "cam-1", "seq": 1, "ts": now, "received_at": now, "stream": "door", "model": "faces@1",
             "payload": {"snapshot": jpeg, "detections": [{"score": 0.9}]}},
            {"device_id": "cam-1", "seq": 2, "ts": now, "received_at": now, "stream": "yard", "model": "faces@1",
             "payload": {"snapshot": "data:text/html;base64,PHNjcmlwdD4=", "detections": []}}])
    c = console.login("viewer")
    html = c.get("/ui/devices/cam-1/results").text
    assert f'src="{jpeg}"' in html and "data:text/html" not in html
    assert 'data-stream="door"' in html and 'detections=[{&#34;score&#34;:0.9}]' in html


def test_the_server_stops_promptly_with_live_views_open(tmp_path: Path, broker: Any) -> None:
    import os
    import signal
    import subprocess
    import sys
    import threading

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    database = Database(db)
    database.migrate()
    token = TokenStore(database).create("viewer", "v")[0]
    database.dispose()
    env = dict(os.environ, STATE_DIRECTORY=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "server", "--broker", broker.url, "--db", db,
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=(tmp_path / "server.log").open("w"), text=True, env=env)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        line = proc.stdout.readline()
        assert line.startswith("edge-fleet server: console at http://127.0.0.1:"), line
        base = line.split()[4].rstrip("/")
        client = httpx.Client(base_url=base, timeout=10)
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        assert client.post("/login", data={"csrf": csrf, "token": token}).status_code == 303
        opened = threading.Event()
        ended: list[str] = []

        def watch() -> None:
            with client.stream("GET", "/ui/live", params={"page": "devices"}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                opened.set()
                ended.extend(r.iter_text())

        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        assert opened.wait(10)
        proc.send_signal(signal.SIGTERM)
        # uvicorn waits for open responses without a limit: without the service ending its live
        # streams, the process would still be there at this deadline
        assert proc.wait(60) == 0
        reader.join(10)
        assert not reader.is_alive() and ended and ended[0].startswith("retry:")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_poke_makes_streams_look_at_once(db: Database) -> None:
    _fleet(db, 1)
    feed = live.LiveFeed(db, interval=30.0, look_gap=0.0)  # polling alone would take 30 s

    async def run() -> list[str]:
        stream = feed.stream("device", "dev-000", feed.digests("device", "dev-000"), _never)
        assert await stream.__anext__() == "retry: 1000\n\n"
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)  # the stream has looked once and waits
        with db.write() as conn:
            conn.execute(sa.insert(s.events), [{"device_id": "dev-000", "seq": 1, "ts": 1.0, "received_at": 1.0,
                                                "type": "x", "payload": {}}])
        feed.poke()  # what the ingestor does after each batch it stores
        first = await asyncio.wait_for(waiting, 5)
        await stream.aclose()
        return [first]

    assert asyncio.run(run()) == [f"event: events\ndata: {feed.digests('device', 'dev-000')['events']}\n\n"]
