"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python API)
against a real ``edge-fleet server`` process, a real mosquitto, simulated devices (the fleet simulator,
in this process, and one ``edge-fleet simulate`` process for the Last Will) and one real agent
(``edge-agent run`` with a face-detection video stream).

Every wait is a Playwright expectation or ``wait_for_function`` with a deadline; nothing sleeps and
nothing asserts on timing. Screenshots of the overview, a device page, rollouts and the phone layout are
written to ``$EDGE_TEST_ARTIFACTS/fleet-console/`` (default ``<tmp>/edge-agent-artifacts/fleet-console``;
the run prints where). ``EDGE_TEST_NO_BROWSER=1`` skips this module on a machine without Chromium
(``scripts/test`` installs it).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cloud_sync.fleet.server.auth import TokenStore
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.simulator import FleetSimulator, SimulatorSettings
from cloud_sync.mqtt.settings import BrokerSettings
from cloud_sync.repo import ONLINE_ROLES, KeyStore, Repository
from tests.conftest import Daemon, install, start_daemon
from tests.deploy_env import silero_inputs
from tests.fleet_env import RawDevice, wait_for
from tests.media import make_video, photo_frames
from tests.mqtt_broker import Broker, make_broker

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

if os.environ.get("EDGE_TEST_NO_BROWSER") == "1":
    pytest.skip("EDGE_TEST_NO_BROWSER=1", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's chromium as root needs --no-sandbox; the rest keeps it off the (closed) network.
CHROMIUM_ARGS = [*(["--no-sandbox"] if os.geteuid() == 0 else []), "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LAB, FLAKY = 6, 3
SECONDS = 1000  # Playwright's timeouts are in ms


@dataclass
class World:
    base: str
    tokens: dict[str, str]
    broker: Broker
    work: Path
    server: subprocess.Popen[str]
    sims: list[FleetSimulator] = field(default_factory=list)
    agent: Daemon | None = None

    def api(self, method: str, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        return httpx.request(method, self.base + path, headers={"Authorization": f"Bearer {self.tokens[role]}"},
                             timeout=30, **kw)

    def online(self) -> set[str]:
        return {d["id"] for d in self.api("GET", "/api/devices?online=true&limit=1000").json()["items"]}


def _server(work: Path, broker: Broker) -> tuple[subprocess.Popen[str], str, dict[str, str]]:
    """``edge-fleet server`` with uploads on (a TUF repository whose root key stays here), and a token per role."""
    Repository.init(work / "repo", work / "keys")
    KeyStore(work / "keys").export(work / "online-keys", ONLINE_ROLES)
    state = work / "state"
    config = work / "fleet.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\ndb = "sqlite:///{state / "fleet.db"}"\n'
                      'listen = "127.0.0.1:0"\nlog_format = "json"\n[server.ingest]\nbatch_ms = 20\n'
                      f'[server.publish]\nrepo_dir = "{work / "repo"}"\nkeys_dir = "{work / "online-keys"}"\n'
                      f'work_dir = "{state / "uploads"}"\n')
    db = Database(f"sqlite:///{state / 'fleet.db'}")
    db.migrate()
    tokens = {role: TokenStore(db).create(role, f"{role}-1")[0] for role in ("viewer", "operator", "admin")}
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET_")} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "server", "--config", str(config),
                             "--broker", broker.url], stdout=subprocess.PIPE, stderr=(work / "server.log").open("w"),
                            text=True, env=env)
    assert proc.stdout is not None
    api_line, console_line = proc.stdout.readline(), proc.stdout.readline()
    assert console_line.startswith("edge-fleet server: console at http://127.0.0.1:"), (
        api_line, console_line, (work / "server.log").read_text())
    return proc, console_line.split()[4].rstrip("/"), tokens


def _agent(work: Path, samples: dict[str, Path], broker: Broker) -> Daemon:
    """A real agent: face detection on a looping video, results (at most 2/s) and telemetry (1/s) over MQTT."""
    frames, _ = photo_frames(samples["astronaut"], n=20, size=(320, 240), scales=(0.9, 0.9))
    video = make_video(work / "faces.avi", frames, fps=10)
    install(work / "models", samples, "face_detection")
    config = work / "agent.toml"
    config.write_text(f"""
[stream.cam]
model = "face_detection"
source = {{ type = "video", path = "{video}", loop = true, realtime = true }}
pre = {{ type = "image", resize = "letterbox", scale = 0.00784313725, offset = -1.0 }}
post = {{ type = "detection", format = "mediapipe_ssd", score_threshold = 0.6 }}
results = {{ mode = "every", max_per_s = 2 }}
""")
    env = {"EDGE_AGENT_MQTT__URL": broker.url, "EDGE_AGENT_AGENT__DEVICE_ID": "edge-real",
           "EDGE_AGENT_MQTT__GROUPS": '["edge"]', "EDGE_AGENT_MQTT__TELEMETRY_INTERVAL_S": "1",
           "EDGE_AGENT_MQTT__BACKOFF_MIN_S": "0.1", "EDGE_AGENT_MQTT__BACKOFF_MAX_S": "0.5"}
    return start_daemon(work / "agent", "--config", str(config), "--models-dir", str(work / "models"), env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> Iterator[World]:
    work = tmp_path_factory.mktemp("console")
    broker = make_broker(work / "mosquitto")
    broker.start()
    proc, base, tokens = _server(work, broker)
    w = World(base, tokens, broker, work, proc)
    try:
        links = BrokerSettings(url=broker.url, backoff_min_s=0.1, backoff_max_s=1.0)
        for options in ({"devices": LAB, "groups": ("lab",), "id_prefix": "lab", "install_time_s": 2.0, "seed": 7,
                         "results_per_s": 0.5, "telemetry_interval_s": 1.0, "profile": "sim-rpi5"},
                        {"devices": FLAKY, "groups": ("flaky",), "id_prefix": "flaky", "install_time_s": 0.3,
                         "failure_rate": 1.0, "seed": 3, "telemetry_interval_s": 2.0}):
            sim = FleetSimulator(SimulatorSettings(**options), links)  # type: ignore[arg-type]
            sim.start()
            w.sims.append(sim)
        w.agent = _agent(work, samples, broker)
        expected = {f"lab-{i:04d}" for i in range(LAB)} | {f"flaky-{i:04d}" for i in range(FLAKY)} | {"edge-real"}
        wait_for(lambda: expected <= w.online(), timeout=45, what="devices online in the fleet service")
        yield w
    finally:
        for sim in w.sims:
            sim.stop()
        if w.agent is not None:
            w.agent.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, (work / "server.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            broker.stop()


@pytest.fixture(scope="module")
def artifacts(request: pytest.FixtureRequest) -> Path:
    root = Path(os.environ.get("EDGE_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "edge-agent-artifacts")
    out = root / "fleet-console"
    out.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        request.addfinalizer(lambda: reporter.write_line(f"fleet console screenshots: {out}"))
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def login(browser: Browser, world: World) -> Iterator[Callable[..., Page]]:
    """``login(role, viewport=DESKTOP)``: a fresh browser context logged in through the form. At the end the test
    fails on any script error or CSP violation the pages reported (failed HTTP requests are the tests' business)."""
    opened: list[tuple[Any, list[str]]] = []

    def make(role: str, viewport: dict[str, int] = DESKTOP) -> Page:
        context = browser.new_context(viewport=viewport, base_url=world.base)
        context.set_default_timeout(15 * SECONDS)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                and "Failed to load resource" not in m.text else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        opened.append((context, errors))
        page.goto("/login")
        page.fill("#token", world.tokens[role])
        page.click("#login-form button")
        expect(page.locator("#role")).to_have_text(role)
        return page

    yield make
    problems = [e for context, errors in opened for e in errors]
    for context, _ in opened:
        context.close()
    assert not problems, problems


def test_login_and_a_wrong_token_is_refused(browser: Browser, world: World, login: Callable[..., Page],
                                            artifacts: Path) -> None:
    context = browser.new_context(viewport=DESKTOP, base_url=world.base)
    page = context.new_page()
    page.goto("/devices")
    expect(page).to_have_url(re.compile(r"/login\?next=/devices$"))
    page.fill("#token", "eft_" + "x" * 43)
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("invalid token")
    assert not [c for c in context.cookies() if c["name"] == "edge_fleet_session"]
    page.goto(f"/login#token={world.tokens['viewer']}")  # the demo's link: the fragment fills the field
    expect(page.locator("#token")).to_have_value(world.tokens["viewer"])
    assert "#token" not in page.url
    page.click("#login-form button")
    expect(page).to_have_url(world.base + "/devices")
    session = next(c for c in context.cookies() if c["name"] == "edge_fleet_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax" and session["path"] == "/"
    assert page.evaluate("document.cookie") == ""  # invisible to scripts
    page.click("header form button")  # log out
    expect(page).to_have_url(world.base + "/login")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    context.close()

    admin = login("admin")
    admin.goto("/")
    expect(admin.locator("#count-online")).to_have_text(str(LAB + FLAKY + 1))
    expect(admin.locator("#versions")).to_contain_text("face_detection")
    admin.screenshot(path=str(artifacts / "overview.png"), full_page=True)


def test_a_device_appears_live_and_goes_offline_after_its_last_will(world: World, login: Callable[..., Page]) -> None:
    page = login("viewer")
    page.goto("/devices?q=drifter")
    expect(page.locator("#devices-summary")).to_contain_text("0 devices")
    page.evaluate("window.notReloaded = true")
    proc = subprocess.Popen([sys.executable, "-m", "cloud_sync.fleet.cli", "simulate", "--broker", world.broker.url,
                             "--devices", "1", "--id-prefix", "drifter", "--telemetry-interval", "1",
                             "--status-interval", "0", "--backoff-min", "0.1", "--backoff-max", "1"],
                            stdout=subprocess.DEVNULL, stderr=(world.work / "drifter.log").open("w"))
    try:
        row = page.locator('tr[data-device="drifter-0000"]')
        expect(row).to_have_attribute("data-online", "yes", timeout=20 * SECONDS)
        proc.send_signal(signal.SIGKILL)  # no offline message of its own: the broker publishes its Last Will
        proc.wait(10)
        expect(row).to_have_attribute("data-online", "no", timeout=20 * SECONDS)
        expect(row.locator(".status")).to_have_text("offline")
        assert page.evaluate("window.notReloaded") is True  # the table updated in place
    finally:
        if proc.poll() is None:
            proc.kill()


def test_device_page_plots_real_telemetry_and_live_results(world: World, login: Callable[..., Page],
                                                           artifacts: Path) -> None:
    page = login("operator")
    page.goto("/devices/edge-real?range=15m")
    expect(page.locator("#inventory")).to_contain_text("face_detection")
    cpu_box = page.locator("#plot-cpu")
    page.wait_for_function("() => (edgeConsole.plots['plot-cpu']?.data[1] || []).filter(v => v !== null).length >= 3",
                           timeout=30 * SECONDS)
    x, cpu = page.evaluate("() => edgeConsole.plots['plot-cpu'].data")
    stored = world.api("GET", "/api/telemetry?device=edge-real&order=desc&limit=1000").json()["items"]
    by_ts = {round(row["ts"], 3): row["payload"]["system"]["cpu_percent"] for row in stored}
    points = [(t, v) for t, v in zip(x, cpu, strict=True) if v is not None]
    assert len(points) >= 3 and all(by_ts.get(round(t, 3), "missing") == v for t, v in points), (points, by_ts)
    assert int(cpu_box.get_attribute("data-points") or 0) >= 3
    memory = page.evaluate("() => edgeConsole.plots['plot-memory'].data[1]")
    assert any(isinstance(v, (int, float)) and 0 < v < 100 for v in memory)
    # face detection runs on every frame of the stream: its request rate, from the cumulative counter, is positive
    page.wait_for_function("() => (edgeConsole.plots['plot-requests']?.data[1] || []).some(v => v > 0)",
                           timeout=30 * SECONDS)
    # and its call latency per telemetry interval (the agent's latency_ms), p50 and p99 series
    page.wait_for_function("() => (edgeConsole.plots['plot-latency']?.data || []).slice(1)"
                           ".some(series => series.some(v => v > 0))", timeout=30 * SECONDS)
    latency = page.evaluate("() => edgeConsole.plots['plot-latency'].data")
    p50 = latency[1 + 2 * sorted(page.evaluate("() => Object.keys(edgeConsole.series.models)")).index("face_detection")]
    sent = {round(row["ts"], 3): (m["latency_ms"] or {}).get("p50")
            for row in world.api("GET", "/api/telemetry?device=edge-real&order=desc&limit=1000").json()["items"]
            for m in row["payload"]["models"] if m["name"] == "face_detection"}
    plotted = [(t, v) for t, v in zip(latency[0], p50, strict=True) if v is not None]
    assert plotted and all(sent.get(round(t, 3), "missing") == v for t, v in plotted), (plotted, sent)

    results = page.locator('#results .stream[data-stream="cam"] li')
    expect(results.first).to_be_visible(timeout=20 * SECONDS)
    first = int(results.first.get_attribute("data-seq") or 0)
    page.evaluate("window.notReloaded = true")
    page.wait_for_function("(seq) => Number(document.querySelector('#results li')?.dataset.seq) > seq", arg=first,
                           timeout=20 * SECONDS)
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("#results")).to_contain_text("face_detection@1")

    page.select_option("#command-name", "status")
    page.click("#command-form button")
    output = page.locator("#command-output")
    expect(output).to_have_attribute("data-state", "ok", timeout=30 * SECONDS)
    expect(output).to_contain_text('"profile"')
    expect(page.locator("#delegate-reason")).to_contain_text("status answered")  # the info part refreshed itself
    expect(page.locator("#recent-commands")).to_contain_text("status")
    page.screenshot(path=str(artifacts / "device.png"), full_page=True)


def _npz(feeds: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **feeds)
    return buf.getvalue()


def test_upload_an_onnx_model_and_a_non_model_shows_the_error(world: World, login: Callable[..., Page],
                                                              samples: dict[str, Path], artifacts: Path) -> None:
    page = login("admin")
    page.goto("/models")
    page.set_input_files("#up-file", files=[{"name": "notes.onnx", "mimeType": "application/octet-stream",
                                             "buffer": b"these are notes, not a model\n" * 40}])
    page.fill("#up-name", "notes")
    page.fill("#up-version", "1")
    page.click("#upload-button")
    expect(page.locator('[data-error-for="file"]')).to_contain_text("not_a_model", timeout=60 * SECONDS)
    expect(page.locator("#upload-form")).to_have_attribute("data-state", "error")

    page.set_input_files("#up-file", str(samples["silero_vad"]))
    page.fill("#up-name", "vad-console")
    page.fill("#up-version", "1")
    page.fill("#up-post", '{"type": "threshold", "value": 0.5}')
    page.set_input_files("#up-test", files=[{"name": "vector.npz", "mimeType": "application/octet-stream",
                                             "buffer": _npz(silero_inputs(1))}])
    page.click("#upload-button")
    expect(page.locator("#upload-published")).to_contain_text("Published vad-console@1", timeout=90 * SECONDS)
    expect(page.locator("#upload-published")).to_contain_text("1 test vector")
    expect(page.locator('[data-error-for="file"]')).to_be_empty()
    row = page.locator('tr[data-model="vad-console@1"]')
    expect(row.locator(".vectors")).to_contain_text("yes (1)")
    expect(row).to_contain_text("onnx")
    page.screenshot(path=str(artifacts / "models.png"), full_page=True)


def _wizard(page: Page, model: str, *, group: str | None = None, devices: str | None = None, canary: str = "1",
            wave_size: str = "", abort: str = "1", timeout: str = "60", shadow: dict[str, str] | None = None,
            fill_only: bool = False) -> str:
    page.goto(f"/deployments/new?model={model}")
    if shadow is not None:
        page.check("#dep-mode-shadow")
        for key, value in shadow.items():
            page.fill(f'input[name="{key}"]', value)
    if group is not None:
        page.check('input[name="target"][value="group"]')
        page.select_option("#dep-group", group)
    else:
        page.check('input[name="target"][value="devices"]')
        page.fill("#dep-devices", devices or "")
    page.fill("#dep-canary", canary)
    page.fill("#dep-wave", wave_size)
    page.fill("#dep-abort", abort)
    page.fill("#dep-timeout", timeout)
    page.click("#deploy-button")
    if fill_only:
        return ""
    expect(page).to_have_url(re.compile(r"/deployments/[0-9a-f]{32}$"))
    return page.url.rsplit("/", 1)[1]


_WATCH_STATES = """() => {
  window.seenStates = new Set();
  const note = () => document.querySelectorAll('tr[data-state]').forEach(r => seenStates.add(r.dataset.state));
  new MutationObserver(note).observe(document.getElementById('rollout'), {subtree: true, childList: true});
  note();
}"""


def test_deploy_in_waves_then_a_failing_rollout_stops_at_the_threshold(world: World, login: Callable[..., Page],
                                                                       samples: dict[str, Path],
                                                                       artifacts: Path) -> None:
    if not _published(world, "vad-console", 1):  # when run alone
        r = world.api("POST", "/api/models", files={"file": ("silero.onnx", samples["silero_vad"].read_bytes()),
                                                    "test_input": ("v.npz", _npz(silero_inputs(1)))},
                      data={"name": "vad-console", "version": "1"})
        assert r.status_code == 201, r.text
    page = login("operator")
    page.goto("/deployments/new?model=vad-console@1")
    assert page.locator('#catalogue-models option[value="vad-console@1"]').count() == 1
    _wizard(page, "vad-console@1", group="lab", canary="1", wave_size="50%")
    page.evaluate(_WATCH_STATES)
    expect(page.locator("#rollout-status")).to_have_text("succeeded", timeout=60 * SECONDS)
    rows = page.locator('tr[data-device^="lab-"]')
    expect(rows).to_have_count(LAB)
    for i in range(LAB):
        expect(rows.nth(i)).to_have_attribute("data-state", "committed")
    assert page.locator("section[data-wave]").count() == 3  # canary 1, then 50% of 6 twice
    seen = set(page.evaluate("() => [...seenStates]"))
    assert seen & {"downloading", "verified", "staged", "loaded", "tested", "swapped", "health"}, seen  # live steps
    page.screenshot(path=str(artifacts / "rollout-succeeded.png"), full_page=True)

    _wizard(page, "vad-console@1", group="flaky", canary="1", wave_size="1", abort="1")
    expect(page.locator("#rollout-status")).to_have_text("aborted", timeout=30 * SECONDS)
    expect(page.locator("#rollout-reason")).to_contain_text("wave 1: 1 of 1 devices failed (abort threshold 1)")
    failed = page.locator('tr[data-state="failed"]')
    expect(failed).to_have_count(1)
    expect(failed.locator(".error-code")).to_have_text(
        re.compile(r"^(download_failed|model_load_failed|test_vectors_failed)$"))
    expect(page.locator('tr[data-state="skipped"]')).to_have_count(FLAKY - 1)
    page.screenshot(path=str(artifacts / "rollout-aborted.png"), full_page=True)
    page.click("#resume-button")  # the failure is accepted; wave 2 fails too, and stops it again
    expect(page.locator("#rollout-reason")).to_contain_text("wave 2: 1 of 1 devices failed", timeout=30 * SECONDS)
    expect(page.locator("#rollout-status")).to_have_text("aborted")
    expect(page.locator('tr[data-state="failed"]')).to_have_count(2)


def test_a_shadow_rollout_from_the_wizard_then_promote(world: World, login: Callable[..., Page],
                                                       artifacts: Path) -> None:
    page = login("operator")
    _wizard(page, "silero-vad@2", group="lab", canary="2", shadow={"sample": "2"}, fill_only=True)
    expect(page.locator('[data-error-for="sample"]')).to_contain_text("less than or equal to 1")
    expect(page.locator("#dep-mode-shadow")).to_be_checked()  # the form comes back as it was sent
    expect(page.locator("#dep-sample")).to_have_value("2")
    dep_id = _wizard(page, "silero-vad@2", group="lab", canary="2", shadow={"sample": "0.5", "min_samples": "100"})
    expect(page.locator("#rollout-mode")).to_contain_text("sample 0.5, policy after 100 samples")
    expect(page.locator("#rollout-status")).to_have_text("succeeded", timeout=60 * SECONDS)
    rows = page.locator('tr[data-device^="lab-"]')
    expect(rows).to_have_count(LAB)
    for i in range(LAB):  # installed and tested, not swapped in: each runs beside version 1
        expect(rows.nth(i)).to_have_attribute("data-state", "shadowing")
    expect(page.locator("#rollout-mode")).to_contain_text("wait for a promote or discard")
    page.screenshot(path=str(artifacts / "rollout-shadowing.png"), full_page=True)
    assert world.api("GET", f"/api/deployments/{dep_id}").json()["mode"] == "shadow"

    device = login("viewer")  # the device page shows the shadow it reports, with its figures
    device.goto("/devices/lab-0000")
    expect(device.locator('#shadows tr[data-shadow="silero-vad@2"]')).to_be_visible(timeout=20 * SECONDS)
    expect(device.locator("#shadows")).to_contain_text("From the device's telemetry", timeout=20 * SECONDS)

    page.click("#promote-button")
    expect(page).to_have_url(re.compile(rf"/deployments/{dep_id}$"))
    expect(page.locator("#rollout-action")).to_contain_text("promote sent by operator-1")
    expect(page.locator("#promote-button, #discard-button")).to_have_count(0)
    for i in range(LAB):  # the devices' own steps: swapped, health, committed
        expect(rows.nth(i)).to_have_attribute("data-state", "committed", timeout=30 * SECONDS)
    expect(page.locator("#rollout-action")).to_contain_text(f"succeeded {LAB}", timeout=30 * SECONDS)
    page.screenshot(path=str(artifacts / "rollout-promoted.png"), full_page=True)
    device.reload()
    expect(device.locator("#inventory")).to_contain_text("silero-vad")
    expect(device.locator("#shadows")).to_have_count(0, timeout=20 * SECONDS)


def test_an_operator_aborts_a_running_rollout(world: World, login: Callable[..., Page]) -> None:
    ghost = RawDevice(world.broker.url, "ghost-1")  # online, but never answers a command
    try:
        ghost.publish("state", {"online": True, "groups": ["ghosts"], "models": []}, retain=True)
        wait_for(lambda: "ghost-1" in world.online(), what="ghost online")
        page = login("operator")
        _wizard(page, "vad-console@1", devices="ghost-1", timeout="600")
        expect(page.locator('tr[data-device="ghost-1"]')).to_have_attribute("data-state", "sent")
        page.click("#abort-button")
        expect(page.locator("#rollout-status")).to_have_text("aborted")
        expect(page.locator("#rollout-reason")).to_contain_text("aborted by operator-1 in the console")
        expect(page.locator("#resume-button")).to_be_visible()
    finally:
        ghost.publish("state", {"online": False}, retain=True)
        ghost.close()


def _published(world: World, name: str, version: int) -> bool:
    targets = Repository(world.work / "repo", world.work / "keys").targets().signed.targets
    return any(t.unrecognized_fields.get("custom", {}).get("name") == name
               and t.unrecognized_fields["custom"].get("version") == version for t in targets.values())


def test_a_viewer_sees_no_controls_and_the_api_refuses_them(world: World, login: Callable[..., Page]) -> None:
    operator = world.api("POST", "/api/deployments", role="operator",
                         json={"devices": ["edge-real"], "model": "nothing", "version": 9, "wave_timeout_s": 600})
    assert operator.status_code == 201, operator.text
    dep_id = operator.json()["id"]
    page = login("viewer")
    page.goto("/models")
    expect(page.locator("#catalogue")).to_be_visible()
    expect(page.locator("#upload-form")).to_have_count(0)
    page.goto("/deployments")
    expect(page.locator("#deployments-table")).to_be_visible()
    expect(page.locator("#new-deployment")).to_have_count(0)
    page.goto(f"/deployments/{dep_id}")
    expect(page.locator("#rollout-status")).to_be_visible()
    expect(page.locator("#abort-button, #resume-button")).to_have_count(0)
    page.goto("/devices/lab-0000")
    expect(page.locator("#inventory")).to_be_visible()
    expect(page.locator("#command-form, #deploy-device")).to_have_count(0)
    page.goto("/deployments/new")
    expect(page.locator("#error-message")).to_contain_text("needs the operator role")
    # the console refuses a viewer's requests even with the session's own CSRF token
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    headers = {"X-CSRF-Token": csrf or "", "Origin": world.base}
    for path, form in (("/deployments/new", {"model": "vad-console@1", "target": "group", "group": "lab"}),
                       (f"/deployments/{dep_id}/abort", {}), ("/devices/lab-0000/command", {"name": "ping"})):
        assert page.request.post(world.base + path, form=form, headers=headers).status == 403, path
    upload = page.request.post(world.base + "/ui/models", headers=headers,
                               multipart={"name": "x", "version": "1", "file": {"name": "m.onnx", "mimeType":
                                                                               "application/octet-stream",
                                                                               "buffer": b"x"}})
    assert upload.status == 403
    # and so does the API, for the viewer's token
    assert world.api("POST", "/api/deployments", role="viewer",
                     json={"group": "lab", "model": "vad-console", "version": 1}).status_code == 403
    assert world.api("POST", "/api/models", role="viewer", files={"file": ("m.onnx", b"x")},
                     data={"name": "x", "version": "1"}).status_code == 403
    assert world.api("POST", f"/api/deployments/{dep_id}/abort", role="viewer").status_code == 403
    # an operator may (409 only if the agent's refusal already finished the rollout)
    assert world.api("POST", f"/api/deployments/{dep_id}/abort", role="operator").status_code in (200, 409)


_WIDER_THAN_THE_SCREEN = """() => [...document.querySelectorAll('body *')]
  .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest('.table-wrap'))
  .slice(0, 5).map(e => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`)"""


def test_pages_fit_a_phone(world: World, login: Callable[..., Page], artifacts: Path) -> None:
    page = login("operator", viewport=PHONE)
    for path, name in (("/", "overview-phone"), ("/devices", "devices-phone"), ("/devices/edge-real", "device-phone")):
        page.goto(path)
        expect(page.locator("main h1")).to_be_visible()
        if path == "/devices":
            expect(page.locator("#devices-table")).to_contain_text("edge-real")
        # nothing wider than the screen: wide tables scroll inside their own box
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), (
            path, page.evaluate(_WIDER_THAN_THE_SCREEN))
        page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    page.set_viewport_size(DESKTOP)
    page.goto("/devices")
    expect(page.locator("#devices-table")).to_be_visible()
    page.screenshot(path=str(artifacts / "devices.png"), full_page=True)
