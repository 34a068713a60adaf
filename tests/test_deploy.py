"""Deployments against a real agent daemon: signed bundles over loopback HTTP, real models, real mosquitto.

``CASES`` is the bad-input table (issue 3): each case makes the repository offer a bad version, deploys
it through the local API and checks that the record says why, that ``vad`` v1 keeps serving correct
results as the default version, and that a ``deploy.failed`` / ``deploy.rolled_back`` event with the
same code reached the broker. All cases share one daemon (plus a small second one for "disk full"),
so each case uses a fresh version number and leaves the repository valid for the next one.

Then: a swap under load (no failed request across deploy, CLI rollback, deploy), and the event
sequence, garbage collection and manual rollback of committed deployments.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile
from tuf.api.serialization.json import JSONSerializer

from agent.client import AgentClient
from agent.errors import ClientError
from cloud_sync.bundles.build import generate_test_vectors
from cloud_sync.errors import MAX_MESSAGE_CHARS
from cloud_sync.fleet.console import FleetClient
from cloud_sync.mqtt.settings import BrokerSettings
from cloud_sync.repo import RoleKeys
from tests import hostile_archives as hostile
from tests.conftest import Daemon, install, start_daemon, wait_for
from tests.deploy_env import DeployEnv, silero_inputs, silero_runner
from tests.mqtt_broker import Broker, make_broker
from tests.tiny_onnx import broken_vad

pytestmark = pytest.mark.timeout(120)

FINAL = ("committed", "rolled_back", "failed")
STEPS = ["started", "downloading", "verified", "staged", "loaded", "tested", "swapped", "health", "committed"]
MAX_MEMBER = 4 << 20
MAX_MEMBERS = 16
MAX_BUNDLE = 3 << 20


# -- helpers: API, events, comparisons ---------------------------------------------------------------


def deploy(client: AgentClient, version: int | None, name: str = "vad", timeout: float = 30) -> dict[str, Any]:
    """POST :deploy, then poll until this deployment's record is final and its task is done."""
    status, _, data = client.request(
        "POST",
        f"/v1/agent/models/{name}:deploy",
        orjson.dumps({"version": version}),
        {"Content-Type": "application/json"},
    )
    assert status == 202, data
    started = orjson.loads(data)
    deadline = time.monotonic() + timeout
    while True:
        status, _, data = client.request("GET", f"/v1/agent/deployments/{name}")
        record = orjson.loads(data)
        assert status == 200 and record["id"] == started["id"], record
        if record["state"] in FINAL and not record["running"]:
            return dict(record)
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment not final after {timeout}s: {record}")
        time.sleep(0.05)


def default_version(client: AgentClient, name: str = "vad") -> int:
    found = [m["version"] for m in client.status()["models"] if m["name"] == name and m.get("default")]
    assert len(found) == 1, client.status()["models"]
    return int(found[0])


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key]).reshape(value.shape), value, rtol=1e-5, atol=1e-6)


class Events:
    """Device events (``edge/v1/devices/+/events``) seen by a fleet console on the real broker."""

    def __init__(self, broker: Broker) -> None:
        self.fleet = FleetClient(BrokerSettings(url=broker.url))
        self.fleet.connect()
        self.fleet.subscribe(["edge/v1/devices/+/events"])
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def close(self) -> None:
        self.fleet.close()

    def _drain(self, timeout: float) -> None:
        for msg in self.fleet.messages(timeout, quiet=0.05):
            body = msg.json()
            if isinstance(body, dict):
                self.seen.append((msg.topic.split("/")[-2], body))

    def of(self, device: str, version: int, model: str = "vad") -> list[dict[str, Any]]:
        self._drain(0.05)
        return [e for d, e in self.seen if d == device and e.get("model") == model and e.get("version") == version]

    def wait(self, device: str, version: int, kind: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.of(device, version) if e.get("type") == kind]
            if found:
                return found[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event for {device} vad@{version}; seen: {self.of(device, version)}")
            self._drain(min(left, 0.5))


@dataclass
class Device:
    daemon: Daemon
    device_id: str
    models: Path


def start_device(tmp: Path, env: DeployEnv, broker: Broker, device_id: str, extra: str = "", **updates: Any) -> Device:
    models = tmp / f"{device_id}-models"
    models.mkdir(parents=True, exist_ok=True)
    mqtt = f'[mqtt]\nurl = "{broker.url}"\nbackoff_min_s = 0.1\nbackoff_max_s = 0.5\n'
    updates.setdefault("health_window_s", 1.0)
    config = env.agent_config(tmp / f"{device_id}.toml", extra=mqtt + extra, **updates)
    daemon = start_daemon(
        tmp / device_id,
        "--config",
        str(config),
        "--models-dir",
        str(models),
        env={"EDGE_AGENT_AGENT__DEVICE_ID": device_id},
    )
    return Device(daemon, device_id, models)


class Load:
    """Client threads, each with its own connection, sending Silero requests until stopped."""

    def __init__(
        self,
        socket: Path,
        feeds: list[dict[str, np.ndarray]],
        expected: list[dict[str, np.ndarray]],
        *,
        check: bool = True,
        use_predict: bool = False,
    ) -> None:
        self.socket, self.feeds, self.expected, self.check = socket, feeds, expected, check
        self.use_predict = use_predict
        self.stop = threading.Event()
        self.ok = [0] * len(feeds)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(feeds))]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"

    def _run(self, i: int) -> None:
        with AgentClient(self.socket, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    if self.use_predict and i % 2:
                        out = client.predict("vad", {k: v.tolist() for k, v in self.feeds[i].items()})
                        got = {k: np.asarray(v, np.float32) for k, v in out.items()}
                    else:
                        got = client.infer("vad", self.feeds[i])
                    if self.check:
                        assert_close(got, self.expected[i])
                    self.ok[i] += 1
                except (ClientError, AssertionError) as exc:
                    self.failures.append(f"client {i}: {exc}")
                    if not self.check:
                        time.sleep(0.002)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS where Linux allows; return the RSS in KiB."""
    with contextlib.suppress(OSError):  # else the peak is the peak since start: growth is measured from there
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return max(_status_kib(pid, "VmRSS"), _status_kib(pid, "VmHWM"))


def peak_rss(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


# -- hostile repository content -------------------------------------------------------------------------


def answer(handler: Any, status: int, body: bytes) -> bool:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    return True


def endless(handler: Any) -> bool:
    """200 with no length and far more bytes than any signed length (the client must hang up)."""
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    try:
        for _ in range(256):  # 16 MiB at most
            handler.wfile.write(b"\xab" * 65536)
    except OSError:
        pass
    return True


def serve(env: DeployEnv, suffix: str, reply: Callable[[Any], bool]) -> None:
    """Answer requests whose path ends with ``suffix`` with ``reply(handler)``; others as usual."""
    env.set_hook(lambda h: h.path.endswith(suffix) and reply(h))


def target_file(env: DeployEnv, version: int) -> Path:
    return next((env.repo.targets_dir / "vad").glob(f"*.vad-{version}.bundle"))


def timestamp_signed_by(env: DeployEnv, signers: list[CryptoSigner], *, expires_in: timedelta | None = None) -> bytes:
    """The repository's timestamp, one version newer, signed by exactly ``signers``."""
    md = Metadata.from_file(str(env.repo.metadata_dir / "timestamp.json"))
    md.signed.version += 1
    if expires_in is not None:
        md.signed.expires = md.signed.expires.replace(microsecond=0) + expires_in
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(JSONSerializer())


def real_signers(env: DeployEnv, role: str) -> list[CryptoSigner]:
    return env.repo.keys.signers(role, env.repo.root().signed.roles[role].keyids)


def tarfile_bytes(gz: bytes) -> bytes:
    return gzip.decompress(gz)


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue())


def member(
    name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, data


def archive(
    version: int, *extra: tuple[tarfile.TarInfo, bytes | None], manifest: bytes | None = b"",
    model: bytes = b"onnx-bytes" * 10, **fields: Any
) -> bytes:
    """A bundle-shaped archive: manifest (valid unless given), a model.onnx, then ``extra`` members."""
    if manifest == b"":
        manifest = json.dumps(
            {"schema_version": 1, "name": "vad", "version": version, "runtime": "onnx", "model": "model.onnx", **fields}
        ).encode()
    members = [member("manifest.json", manifest)] if manifest is not None else []
    return tar_gz([*members, member("model.onnx", model), *extra])


def publish_raw(env: DeployEnv, version: int, data: bytes) -> None:
    """Sign arbitrary bytes as target vad/vad-N.bundle (what a compromised build host could publish)."""
    repo = env.repo
    with repo._locked():
        root = repo.root().signed
        targets = repo.targets()
        info = TargetFile.from_data(f"vad/vad-{version}.bundle", data, ["sha256"])
        stored = repo.targets_dir / "vad" / f"{info.hashes['sha256']}.vad-{version}.bundle"
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(data)
        targets.signed.targets[info.path] = info
        repo._bump("targets", targets, root, None)
        repo._write_snapshot_and_timestamp(
            root, targets.signed.version, None, repo.snapshot().signed.version + 1, repo.timestamp().signed.version + 1
        )


# -- the module's world: broker, repository, one agent serving vad v1 (plus a small one) -------------------


@dataclass
class World:
    base: Path
    env: DeployEnv
    main: Device
    small: Device
    events: Events
    samples: dict[str, Path]
    old_timestamp: bytes
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    versions: Iterator[int] = field(default_factory=lambda: itertools.count(2))


@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = make_broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path], mqtt_broker: Broker) -> Iterator[World]:
    base = tmp_path_factory.mktemp("deploy")
    env = DeployEnv.create(base / "env", samples, timestamp_keys=RoleKeys(2, 2))
    old_timestamp = (env.repo.metadata_dir / "timestamp.json").read_bytes()  # version 1, soon superseded
    events = Events(mqtt_broker)
    main = start_device(
        base,
        env,
        mqtt_broker,
        "dev-main",
        health_min_requests=5,
        max_member_bytes=MAX_MEMBER,
        max_members=MAX_MEMBERS,
        max_bundle_bytes=MAX_BUNDLE,
        download_rate_grace_s=5.0,  # long enough for a loaded machine's loopback, short for the drip test
    )
    # Disk full needs its own config; it serves vad v1 copied in place, no deployment needed.
    install(base / "dev-small-models", samples, "silero_vad", as_name="vad")
    small = start_device(base, env, mqtt_broker, "dev-small", min_free_bytes=1 << 60)
    try:
        env.publish_silero("vad", 1)
        record = deploy(main.daemon.client, 1)
        assert record["state"] == "committed", record
        feeds = silero_inputs(7)
        world = World(
            base, env, main, small, events, samples, old_timestamp, feeds, silero_runner(samples["silero_vad"], feeds)
        )
        yield world
    finally:
        events.close()
        for device in (main, small):
            device.daemon.stop()
        env.close()


# -- the table -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    arrange: Callable[[World, int], None]  # publish version n and break something about it
    code: str
    match: str  # fragment of error.message
    state: str = "failed"
    device: str = "main"
    load: bool = False  # keep clients sending Silero requests while it runs
    load_fails: bool = True  # ... and some of their requests fail (not so for NaN answers)
    max_rss_growth_mib: float | None = None  # the agent's peak RSS may grow by at most this much


def publish(w: World, n: int, **kw: Any) -> None:
    w.env.publish_silero("vad", n, **kw)


def then_serve(
    suffix: str | Callable[[World, int], str], reply: Callable[[World, int], Callable[[Any], bool]]
) -> Callable[[World, int], None]:
    """Publish a good version n, then answer requests for ``suffix`` with ``reply``."""

    def arrange(w: World, n: int) -> None:
        publish(w, n)
        serve(w.env, suffix(w, n) if callable(suffix) else suffix, reply(w, n))

    return arrange


def _bytes(data: Callable[[World, int], bytes], status: int = 200) -> Callable[[World, int], Callable[[Any], bool]]:
    def reply(w: World, n: int) -> Callable[[Any], bool]:
        body = data(w, n)
        return lambda h: answer(h, status, body)

    return reply


def _target(_w: World, n: int) -> str:
    return f".vad-{n}.bundle"


def _flipped(w: World, n: int) -> bytes:
    data = bytearray(target_file(w.env, n).read_bytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _snapshot_name(w: World, _n: int) -> str:
    return f"/{w.env.repo.timestamp().signed.snapshot_meta.version}.snapshot.json"


def _older_snapshot(w: World, _n: int) -> bytes:
    version = w.env.repo.timestamp().signed.snapshot_meta.version
    return (w.env.repo.metadata_dir / f"{version - 1}.snapshot.json").read_bytes()


def _targets_name(w: World, _n: int) -> str:
    return f"/{w.env.repo.targets().signed.version}.targets.json"


def _older_targets(w: World, _n: int) -> bytes:
    version = w.env.repo.targets().signed.version
    return (w.env.repo.metadata_dir / f"{version - 1}.targets.json").read_bytes()


def _freeze(w: World, n: int) -> None:
    publish(w, n)
    w.env.repo.refresh(expiry={"timestamp": timedelta(seconds=-60)})  # the next case's publish re-signs


def _raw(make: Callable[[int], bytes]) -> Callable[[World, int], None]:
    return lambda w, n: publish_raw(w.env, n, make(n))


def _corrupt_model(w: World, n: int) -> None:
    garbage = w.base / "garbage" / "model.onnx"
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_bytes(b"this is not an ONNX protobuf, just bytes " * 100)
    publish(w, n, model=garbage, vectors=False)


def _over_bundle_cap(w: World, n: int) -> None:
    big = w.base / "big" / "weights.bin"
    big.parent.mkdir(exist_ok=True)
    big.write_bytes(np.random.default_rng(0).bytes(MAX_BUNDLE + 100_000))
    publish(w, n, files=(big,))


def _tflite_runner(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    for detail in interp.get_input_details():
        interp.set_tensor(detail["index"], feeds[detail["name"]])
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}


def _face_as_vad(w: World, n: int) -> None:
    """A v(n) that passes its own test vector but rejects every request the Silero clients send."""
    face = w.samples["face_detection"]
    image = np.round(np.random.default_rng(n).random((1, 128, 128, 3)), 2).astype(np.float32)
    vectors = generate_test_vectors(face, {"input": image}, _tflite_runner, rtol=1e-3, atol=1e-3)
    publish(w, n, model=face, vectors=False, manifest_extra={"test_vectors": vectors})


def _broken_model(w: World, n: int, kind: str) -> Path:
    return broken_vad(w.base / "broken" / f"{kind}-{n}" / "model.onnx", kind)


def _answers_nan(w: World, n: int) -> None:
    """Issue 12 item 9: a bundle without test vectors whose model answers NaN was committed."""
    publish(w, n, model=_broken_model(w, n, "nan"), vectors=False)


def _inf_passes_its_vector(w: World, n: int) -> None:
    """A test vector that checks only ``stateN``: ``output`` is infinite and no manifest field allows it."""
    model = _broken_model(w, n, "inf")
    vectors = generate_test_vectors(model, silero_inputs(n), silero_runner)
    del vectors[0]["expected"]["output"]
    publish(w, n, model=model, vectors=False, manifest_extra={"test_vectors": vectors})


def _raw_file(write_archive: Callable[[World, int, Path], Path]) -> Callable[[World, int], None]:
    def arrange(w: World, n: int) -> None:
        path = write_archive(w, n, w.base / "raw" / f"vad-{n}.bundle")
        publish_raw(w.env, n, path.read_bytes())

    return arrange


def _pax_bomb(w: World, n: int, path: Path) -> Path:
    """Issue 12 item 5: a 512 MiB PAX extended header, 0.5 MB as one gzip member (grew the agent by 1.5 GiB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = json.dumps({"schema_version": 1, "name": "vad", "version": n, "runtime": "onnx",
                           "model": "model.onnx"}).encode()
    return hostile.write(path, [hostile.header("././@PaxHeader", 512 << 20, tarfile.XHDTYPE),
                                hostile.Repeat(b"a" * (1 << 20), 512), hostile.member("manifest.json", manifest),
                                hostile.member("model.onnx", b"onnx-bytes"), hostile.END], one_member=True)


def _gnu_longname_bomb(w: World, n: int, path: Path) -> Path:
    """Issue 12 items 5 and 7: a 64 MiB GNU long name passed the path checks into a 64 MiB record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return hostile.write(path, [hostile.header("././@LongLink", 64 << 20, tarfile.GNUTYPE_LONGNAME),
                                hostile.Repeat(b"n" * (1 << 20), 64), hostile.member("evil", b"x"), hostile.END],
                         one_member=True)


def _silero_vector(input_file: str) -> dict[str, Any]:
    return {"inputs": {"input": {"dtype": "float32", "shape": [1, 576], "file": input_file},
                       "state": {"dtype": "float32", "shape": [2, 1, 128], "data": [0.0] * 256},
                       "sr": {"dtype": "int64", "shape": [], "data": [16000]}},
            "expected": {"output": {"dtype": "float32", "shape": [1, 1], "data": [0.0]}}}


def _silero_with_npy(data: bytes) -> Callable[[World, int], None]:
    """Issue 12 item 8: a loadable model whose test vector's .npy file is bad was an ``internal`` error."""

    def arrange(w: World, n: int) -> None:
        model = w.samples["silero_vad"].read_bytes()
        publish_raw(w.env, n, archive(n, member("x.npy", data), manifest=json.dumps({
            "schema_version": 1, "name": "vad", "version": n, "runtime": "onnx", "model": "model.onnx",
            "files": ["x.npy"], "test_vectors": [_silero_vector("x.npy")]}).encode(), model=model))

    return arrange


def _old_timestamp(w: World, _n: int) -> Callable[[Any], bool]:
    body = w.old_timestamp
    return lambda h: answer(h, 200, body)


CASES = [
    # -- TUF: the metadata is not what the pinned root allows
    Case(
        "wrong_signing_key",
        then_serve(
            "/timestamp.json",
            _bytes(
                lambda w, n: timestamp_signed_by(
                    w.env, [CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()]
                )
            ),
        ),
        "bad_signature",
        "0/2",
    ),
    Case(
        "threshold_not_met",
        then_serve(
            "/timestamp.json", _bytes(lambda w, n: timestamp_signed_by(w.env, real_signers(w.env, "timestamp")[:1]))
        ),
        "bad_signature",
        "1/2",
    ),
    Case("metadata_rollback", then_serve("/timestamp.json", _old_timestamp), "rollback", "must be >="),
    Case("freeze_expired_timestamp", _freeze, "expired", "timestamp.json is expired"),
    Case(
        "freeze_forged_fresh_signatures",
        then_serve(
            "/timestamp.json",
            _bytes(
                lambda w, n: timestamp_signed_by(
                    w.env, real_signers(w.env, "timestamp"), expires_in=-timedelta(days=30)
                )
            ),
        ),
        "expired",
        "expired",
    ),
    Case(
        "mix_and_match_snapshot",
        then_serve(_snapshot_name, _bytes(_older_snapshot)),
        "version_mismatch",
        "snapshot version",
    ),
    Case(
        "mix_and_match_targets",
        then_serve(_targets_name, _bytes(_older_targets)),
        "version_mismatch",
        "Expected targets",
    ),
    Case(
        "timestamp_garbage",
        then_serve("/timestamp.json", _bytes(lambda w, n: b"\x00not json{{")),
        "bad_metadata",
        "unparseable",
    ),
    Case(
        "timestamp_500", then_serve("/timestamp.json", _bytes(lambda w, n: b"oops", 500)), "download_failed", "HTTP 500"
    ),
    Case(
        "timestamp_404", then_serve("/timestamp.json", _bytes(lambda w, n: b"gone", 404)), "download_failed", "HTTP 404"
    ),
    # -- TUF: the target is not what the signed metadata says
    Case("target_hash_mismatch", then_serve(_target, _bytes(_flipped)), "integrity", "hashes mismatch"),
    Case(
        "target_length_mismatch",
        then_serve(_target, _bytes(lambda w, n: target_file(w.env, n).read_bytes()[:-100])),
        "integrity",
        "length mismatch",
    ),
    Case("target_endless_data", then_serve(_target, lambda w, n: endless), "integrity", "more than the signed length"),
    Case("target_404", then_serve(_target, _bytes(lambda w, n: b"not here", 404)), "download_failed", "HTTP 404"),
    Case("target_500", then_serve(_target, _bytes(lambda w, n: b"broken", 500)), "download_failed", "HTTP 500"),
    Case(
        "target_garbage",
        then_serve(_target, _bytes(lambda w, n: b"<html>maintenance</html>")),
        "integrity",
        "length mismatch",
    ),
    Case("bundle_over_device_cap", _over_bundle_cap, "bad_bundle", "byte bundle cap"),
    Case("version_not_published", lambda w, n: None, "not_found", "no bundle vad version"),
    # -- signed, but the archive is hostile (refused while staging)
    Case("archive_dotdot", _raw(lambda n: archive(n, member("../evil.txt", b"x"))), "unsafe_archive", "escapes"),
    Case(
        "archive_absolute_path",
        _raw(lambda n: archive(n, member("/etc/evil", b"x"))),
        "unsafe_archive",
        "absolute path",
    ),
    Case(
        "archive_symlink",
        _raw(lambda n: archive(n, member("link", None, tarfile.SYMTYPE, "/etc/passwd"))),
        "unsafe_archive",
        "symlink to '/etc/passwd' refused",
    ),
    Case(
        "archive_hardlink",
        _raw(lambda n: archive(n, member("hard", None, tarfile.LNKTYPE, "model.onnx"))),
        "unsafe_archive",
        "hardlink to 'model.onnx' refused",
    ),
    Case(
        "archive_device_file",
        _raw(lambda n: archive(n, member("sda", None, tarfile.BLKTYPE))),
        "unsafe_archive",
        "device",
    ),
    Case(
        "archive_member_over_cap",
        _raw(lambda n: archive(n, member("big.bin", b"\0" * (MAX_MEMBER + 1)))),
        "unsafe_archive",
        f"over the {MAX_MEMBER} byte member cap",
    ),
    Case(
        "archive_too_many_members",
        _raw(lambda n: archive(n, *[member(f"f{i}", b"x") for i in range(20)])),
        "unsafe_archive",
        f"more than {MAX_MEMBERS} members",
    ),
    Case("archive_not_a_tar", _raw(lambda n: gzip.compress(b"not a tar archive " * 100)), "unsafe_archive", "archive"),
    Case("archive_pax_header_512MiB", _raw_file(_pax_bomb), "unsafe_archive",
         "PAX extended header of 536870912 bytes is over the 65536 byte cap", max_rss_growth_mib=32),
    Case("archive_gnu_long_name_64MiB", _raw_file(_gnu_longname_bomb), "unsafe_archive",
         "GNU long name of 67108864 bytes is over the 65536 byte cap", max_rss_growth_mib=32),
    Case("archive_name_300_chars", _raw(lambda n: archive(n, member("n" * 300, b"x"))), "unsafe_archive",
         "name of 300 characters is over the 255 character cap"),
    Case("archive_link_target_60KiB", _raw(lambda n: archive(n, member("l", None, tarfile.SYMTYPE, "t" * 60_000))),
         "unsafe_archive", "characters in all]"),  # the message is capped, and says so
    Case("archive_header_chain", _raw(lambda n: b"".join([gzip.compress(b"".join(
        [hostile.longname(b"n" * 8)] * 5000)), gzip.compress(tarfile_bytes(archive(n)))])),
         "unsafe_archive", "more than 8 extension headers in a row"),
    Case("manifest_missing", _raw(lambda n: archive(n, manifest=None)), "bad_manifest", "missing"),
    Case("manifest_malformed", _raw(lambda n: archive(n, manifest=b"{not json")), "bad_manifest", "malformed JSON"),
    Case("manifest_names_missing_file", _raw(lambda n: archive(n, labels="labels.txt")), "bad_manifest", "labels.txt"),
    Case("manifest_other_version", _raw(lambda n: archive(n + 1000)), "bad_manifest", "the signed target is"),
    Case("manifest_nested_100000", _raw(lambda n: archive(n, manifest=b'{"schema_version": 1, "x": ' + b"[" * 100_000
                                                          + b"]" * 100_000 + b"}")),
         "bad_manifest", "nested deeper than 32 levels"),
    Case("npy_test_vector_wrong_shape", _silero_with_npy(hostile.npy(np.zeros((3,), np.float32))), "bad_manifest",
         "holds shape [3], the manifest declares [1, 576]"),
    Case("npy_test_vector_pickled_objects",
         _silero_with_npy(hostile.npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)), "bad_manifest",
         "pickled objects are refused"),
    # -- a valid bundle this device cannot or must not serve
    Case("model_file_corrupt", _corrupt_model, "model_load_failed", "cannot load"),
    Case(
        "accelerator_not_available",
        lambda w, n: publish(w, n, manifest_extra={"constraints": {"accelerators": ["edgetpu-usb"]}}),
        "runtime_unavailable",
        "edgetpu-usb",
    ),
    Case(
        "agent_too_old",
        lambda w, n: publish(w, n, manifest_extra={"constraints": {"min_agent_version": "99.0"}}),
        "incompatible",
        "needs agent 99.0",
    ),
    Case("test_vectors_fail", lambda w, n: publish(w, n, expected_scale=3.0), "test_vectors_failed", "output differs"),
    Case("health_regression", _face_as_vad, "health_regression", "error rate", state="rolled_back", load=True),
    Case("model_answers_nan", _answers_nan, "health_regression", "held NaN or infinity", state="rolled_back",
         load=True, load_fails=False),
    Case("test_vector_output_infinite", _inf_passes_its_vector, "test_vectors_failed", "output holds NaN or infinity"),
    Case("disk_full", publish, "disk_full", "bytes free", device="small"),
]


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_keeps_serving(case: Case, world: World) -> None:
    n = next(world.versions)
    device = world.small if case.device == "small" else world.main
    client = device.daemon.client
    try:
        case.arrange(world, n)
        pid = device.daemon.proc.pid
        rss_before = reset_peak_rss(pid)
        if case.load:
            with Load(device.daemon.socket, [world.feeds] * 2, [world.expected] * 2, check=False) as load:
                record = deploy(client, n)
            assert sum(load.ok) > 0, "the load saw no answers"
            assert bool(load.failures) == case.load_fails, load.failures[:3]
        else:
            record = deploy(client, n)
    finally:
        world.env.set_hook(None)

    # (a) the record says what went wrong, in a bounded message
    assert record["state"] == case.state, record
    assert record["version"] == n and record["previous"] == 1, record
    assert record["error"]["code"] == case.code, record["error"]
    assert case.match in record["error"]["message"], record["error"]
    assert len(record["error"]["message"]) <= MAX_MESSAGE_CHARS
    assert (device.daemon.socket.parent / "state" / "deployments" / "vad.json").stat().st_size < 64 * 1024
    if case.max_rss_growth_mib is not None:
        growth = (peak_rss(pid) - rss_before) / 1024
        print(f"{case.id}: the agent's peak RSS grew by {growth:.1f} MiB")  # shown with -rP
        assert growth < case.max_rss_growth_mib, f"peak RSS grew by {growth:.0f} MiB"
    # (b) v1 still serves, as the default, with correct results; nothing of version n is left to load
    assert default_version(client) == 1
    assert_close(client.infer("vad", world.feeds), world.expected)
    vad_dir = device.models / "vad"
    assert not (vad_dir / str(n)).exists()
    assert not list(vad_dir.glob(".staging-*"))
    assert len(list(vad_dir.glob(f".rejected-{n}-*"))) == (case.state == "rolled_back")
    if (vad_dir / ".active").exists():
        assert (vad_dir / ".active").read_text().strip() == "1"
    # (c) an event says why
    event = world.events.wait(device.device_id, n, f"deploy.{case.state}")
    assert event["error"]["code"] == case.code, event
    assert len(event["error"]["message"]) <= MAX_MESSAGE_CHARS
    assert event["previous"] == 1
    assert device.daemon.proc.poll() is None


def drip(handler: Any) -> bool:
    """The target's real length, then one byte every 2 s: every read succeeds, no read timeout fires."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    handler.close_connection = True
    deadline = time.monotonic() + 30  # bounded: the agent hangs up long before
    try:
        while time.monotonic() < deadline:
            handler.wfile.write(b"\x1f")
            handler.wfile.flush()
            time.sleep(2)
    except OSError:
        pass
    return True


def test_slow_mirror_fails_the_deploy_and_frees_the_model(world: World) -> None:
    """Issue 12 item 6: a mirror dripping a byte every 2 s kept the deploy "downloading" and the model's
    deploy lock held (409 busy) indefinitely. Now the download fails (``download_failed``) once the average
    rate is under the minimum (grace 5 s here), and the next deploy of the model is accepted at once."""
    n = next(world.versions)
    client = world.main.daemon.client
    publish(world, n)
    serve(world.env, _target(world, n), drip)
    try:
        record = deploy(client, n, timeout=30)  # the mirror drips for 30 s: a deploy still waiting then is stuck
    finally:
        world.env.set_hook(None)
    assert (record["state"], record["error"]["code"]) == ("failed", "download_failed"), record
    assert "bytes/s on average" in record["error"]["message"]
    # The lock is free: the next deployment starts (202) and runs to its own end (this version is not published).
    record = deploy(client, n + 1000)
    assert (record["state"], record["error"]["code"]) == ("failed", "not_found"), record
    assert default_version(client) == 1


# -- swap under load ---------------------------------------------------------------------------------------


def test_swap_under_load_never_fails_a_request(tmp_path: Path, samples: dict[str, Path], mqtt_broker: Broker) -> None:
    env = DeployEnv.create(tmp_path / "env", samples)
    device = start_device(tmp_path, env, mqtt_broker, "dev-load", health_window_s=1.0, health_min_requests=5)
    try:
        client = device.daemon.client
        env.publish_silero("vad", 1)
        assert deploy(client, 1)["state"] == "committed"
        feeds = [silero_inputs(seed) for seed in range(4)]
        expected = [silero_runner(samples["silero_vad"], f) for f in feeds]
        with Load(device.daemon.socket, feeds, expected, use_predict=True) as load:
            wait_for(lambda: all(load.ok), 30, "every client answered")
            env.publish_silero("vad", 2)
            before = sum(load.ok)
            record = deploy(client, 2)
            assert record["state"] == "committed", record
            assert default_version(client) == 2
            during_deploy = sum(load.ok) - before

            before = sum(load.ok)
            out = subprocess.run(
                [sys.executable, "-m", "agent.cli", "rollback", "--socket", str(device.daemon.socket), "vad"],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            assert "now serving version 1" in out.stdout
            assert default_version(client) == 1
            wait_for(lambda: sum(load.ok) > before, 30, "answers after the rollback")
            during_rollback = sum(load.ok) - before

            env.publish_silero("vad", 3)
            before = sum(load.ok)
            assert deploy(client, 3)["state"] == "committed"
            assert default_version(client) == 3
            wait_for(lambda: sum(load.ok) > before, 30, "answers after the redeploy")
            during_redeploy = sum(load.ok) - before
        assert load.failures == [], load.failures[:5]
        assert all(count > 0 for count in load.ok), load.ok
        assert min(during_deploy, during_rollback, during_redeploy) > 0, (
            during_deploy,
            during_rollback,
            during_redeploy,
        )
        served = {m["version"]: m["requests"] for m in client.status()["models"] if m["name"] == "vad"}
        assert served.get(3, 0) > 0
    finally:
        device.daemon.stop()
        env.close()


class CpuHogs:
    """``n`` busy-looping processes: the CPU load of a stream starting on a small device."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def __enter__(self) -> CpuHogs:
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)


def test_load_spike_during_the_health_window_is_no_regression(
    tmp_path: Path, samples: dict[str, Path], mqtt_broker: Broker
) -> None:
    """Issue 12 item 10: v1's history is from one client on a quiet CPU; v2's window runs with 4 clients and
    the CPU busy (a stream starting during the deploy). Judged on request latency (queue and thread
    wake-ups included) against v1's history, the same model was rolled back as a latency regression;
    judged on its runtime calls, with an absolute floor, it is committed."""
    env = DeployEnv.create(tmp_path / "env", samples)
    # Every request through the worker thread (as with batching or an accelerator): the queue is in the latency.
    device = start_device(tmp_path, env, mqtt_broker, "dev-spike", extra="[model.vad]\ninline_max_us = 0\n",
                          health_window_s=3.0, health_min_requests=5)
    try:
        client = device.daemon.client
        env.publish_silero("vad", 1)
        assert deploy(client, 1)["state"] == "committed"
        feeds = silero_inputs(1)
        expected = silero_runner(samples["silero_vad"], feeds)
        with Load(device.daemon.socket, [feeds], [expected]) as quiet:
            wait_for(lambda: quiet.ok[0] > 20 or quiet.failures, 60, "20 answers")
        assert quiet.failures == [] and quiet.ok[0] > 20, (quiet.ok, quiet.failures[:3])
        env.publish_silero("vad", 2)
        with CpuHogs(4), Load(device.daemon.socket, [feeds] * 8, [expected] * 8) as busy:
            record = deploy(client, 2, timeout=60)
        assert record["state"] == "committed", record["error"]
        assert busy.failures == [], busy.failures[:3]
        assert default_version(client) == 2
    finally:
        device.daemon.stop()
        env.close()


SILERO_SPECS = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 576]},
               {"name": "state", "dtype": "float32", "shape": [2, -1, 128]},
               {"name": "sr", "dtype": "int64", "shape": []}],
    "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 1], "allow_nonfinite": True},
                {"name": "stateN", "dtype": "float32", "shape": [2, -1, 128]}],
}


def test_nonfinite_outputs_the_manifest_allows_and_required_test_vectors(
    tmp_path: Path, samples: dict[str, Path], mqtt_broker: Broker
) -> None:
    """Issue 12 item 9, the other side: NaN in an output the manifest marks ``allow_nonfinite`` is a valid
    answer (committed under load); and with ``require_test_vectors`` a bundle without vectors is refused."""
    env = DeployEnv.create(tmp_path / "env", samples)
    device = start_device(tmp_path, env, mqtt_broker, "dev-nonfinite", require_test_vectors=True,
                          health_window_s=1.0, health_min_requests=5)
    try:
        client = device.daemon.client
        env.publish_silero("vad", 1)
        assert deploy(client, 1)["state"] == "committed"

        model = broken_vad(tmp_path / "nan" / "model.onnx", "nan")
        vectors = generate_test_vectors(model, silero_inputs(2), silero_runner)
        del vectors[0]["expected"]["output"]  # NaN has no JSON spelling; stateN is checked
        env.publish(env.build("vad", 2, model=model, vectors=False,
                              manifest_extra={**SILERO_SPECS, "test_vectors": vectors}))
        feeds = silero_inputs(5)
        with Load(device.daemon.socket, [feeds] * 2, [{}] * 2, check=False) as load:
            record = deploy(client, 2)
        assert record["state"] == "committed", record["error"]
        assert sum(load.ok) > 0 and load.failures == [], load.failures[:3]
        assert np.isnan(client.infer("vad", feeds)["output"]).all()

        env.publish_silero("vad", 3, vectors=False)
        record = deploy(client, 3)
        assert (record["state"], record["error"]["code"]) == ("failed", "test_vectors_failed"), record
        assert "require_test_vectors" in record["error"]["message"]
        assert default_version(client) == 2
    finally:
        device.daemon.stop()
        env.close()


# -- committed deployments: events, garbage collection, manual rollback -----------------------------------------


def test_commit_events_gc_and_manual_rollback(tmp_path: Path, samples: dict[str, Path], mqtt_broker: Broker) -> None:
    env = DeployEnv.create(tmp_path / "env", samples)
    events = Events(mqtt_broker)
    device = start_device(tmp_path, env, mqtt_broker, "dev-gc", health_window_s=0.2, keep_versions=2)
    client = device.daemon.client
    vad_dir = device.models / "vad"
    feeds = silero_inputs(3)
    expected = silero_runner(samples["silero_vad"], feeds)
    try:
        env.publish_silero("vad", 1)
        record = deploy(client, 1)
        assert record["state"] == "committed" and record["error"] is None, record
        assert [state for state, _ts in record["history"]] == STEPS
        events.wait("dev-gc", 1, "deploy.committed")
        assert [e["type"] for e in events.of("dev-gc", 1)] == [f"deploy.{s}" for s in STEPS]
        assert all(e["previous"] is None and "error" not in e for e in events.of("dev-gc", 1))

        # Nothing older to go back to: 409, and the code says so.
        status, _, data = client.request("POST", "/v1/agent/models/vad:rollback", b"")
        body = orjson.loads(data)
        assert status == 409, body
        assert body.get("code") == "no_previous" and "no version older than 1" in body["error"], body
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "rollback", "--socket", str(device.daemon.socket), "vad"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0 and "409" in out.stderr, out
        assert default_version(client) == 1

        for version in (2, 3):
            env.publish_silero("vad", version)
            record = deploy(client, version)
            assert record["state"] == "committed" and record["previous"] == version - 1, record
        events.wait("dev-gc", 3, "deploy.committed")
        assert [e["type"] for e in events.of("dev-gc", 3)] == [f"deploy.{s}" for s in STEPS]
        assert all(e["previous"] == 2 for e in events.of("dev-gc", 3))
        # keep_versions = 2: version 1 is gone from disk and from memory
        assert sorted(p.name for p in vad_dir.iterdir() if p.name.isdigit()) == ["2", "3"]
        assert sorted(m["version"] for m in client.status()["models"] if m["name"] == "vad") == [2, 3]

        # Manual rollback: 2 serves again, 3 is set aside and not loaded.
        status, _, data = client.request("POST", "/v1/agent/models/vad:rollback", b"")
        assert status == 200 and orjson.loads(data) == {"model": "vad", "from": 3, "to": 2}
        assert default_version(client) == 2
        assert_close(client.infer("vad", feeds), expected)
        assert not (vad_dir / "3").exists()
        assert [p.name.split("-")[1] for p in vad_dir.glob(".rejected-*")] == ["3"]
        assert (vad_dir / ".active").read_text().strip() == "2"
        assert sorted(m["version"] for m in client.status()["models"] if m["name"] == "vad") == [2]
        event = events.wait("dev-gc", 3, "deploy.rolled_back")
        assert event["previous"] == 2 and event["error"]["code"] == "manual"

        # A restart keeps serving the version rolled back to.
        device.daemon.stop()
        device.daemon = start_daemon(
            tmp_path / "dev-gc",
            "--config",
            str(tmp_path / "dev-gc.toml"),
            "--models-dir",
            str(device.models),
            env={"EDGE_AGENT_AGENT__DEVICE_ID": "dev-gc"},
        )
        assert default_version(device.daemon.client) == 2
        assert_close(device.daemon.client.infer("vad", feeds), expected)
    finally:
        device.daemon.stop()
        events.close()
        env.close()
