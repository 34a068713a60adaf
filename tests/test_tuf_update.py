"""Signed bundle delivery end to end: real TUF metadata, real HTTP on 127.0.0.1, the real Silero model.

One table (``CASES``) drives the bad-input cases: each sets up an attack or fault, runs the
device side, asserts the specific error and that nothing reached the destination.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from cloud_sync import errors
from cloud_sync.bundles import ExtractLimits, Manifest, build_bundle, extract_bundle
from cloud_sync.repo import RepoHTTPServer, RepoRequestHandler, Repository, RoleKeys, make_server
from cloud_sync.updater import BundleUpdater

pytestmark = pytest.mark.timeout(60)


# -- a fault-injecting repository server ---------------------------------------------------------

@dataclass
class Fault:
    """What to do to requests whose path ends with ``suffix`` (``times`` = how often; -1 = always)."""

    kind: str  # status | garbage | truncate | endless | stall | ignore_range | drip_body | drip_headers | slow
    suffix: str
    status: int = 500
    times: int = -1


class FaultyHandler(RepoRequestHandler):
    def _fault(self) -> Fault | None:
        server: Any = self.server
        with server.fault_lock:
            for fault in server.faults:
                if self.path.endswith(fault.suffix) and fault.times != 0:
                    fault.times -= 1 if fault.times > 0 else 0
                    return fault
        return None

    def _serve(self, *, body: bool) -> None:
        fault = self._fault()
        if fault is None:
            super()._serve(body=body)
            return
        self.server.record(self.command, self.path, self.headers.get("Range"))
        if fault.kind == "status":
            self._error_status(fault.status)
        elif fault.kind == "garbage":
            self._send(200, b"\x00not json at all{{{", {})
        elif fault.kind == "endless":
            # No length, close-delimited, and more bytes than any signed length.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            block = b"\xab" * 65536
            for _ in range(2000):  # bounded: ~130 MB at most, the client hangs up long before
                self.wfile.write(block)
        elif fault.kind == "truncate":
            self._current_fault = fault
            super()._serve(body=body)
        elif fault.kind == "stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"{")
            self.wfile.flush()
            time.sleep(1.5)  # longer than the client's read timeout
            self.close_connection = True
        elif fault.kind == "ignore_range":
            del self.headers["Range"]
            super()._serve(body=body)
        elif fault.kind in ("drip_body", "slow"):
            self._current_fault = fault  # the real headers, then send_body drips
            super()._serve(body=body)
        elif fault.kind == "drip_headers":
            self._drip(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 60_000 + b"\r\n\r\n", 1, 0.3)

    def _drip(self, data: bytes, step: int, pause: float) -> None:
        self.close_connection = True
        deadline = time.monotonic() + 20  # bounded: the client hangs up long before
        try:
            for i in range(0, len(data), step):
                if time.monotonic() > deadline:
                    return
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass  # the client gave up: what it must do

    def send_body(self, fh: BinaryIO, length: int) -> None:
        fault = getattr(self, "_current_fault", None)
        if fault is not None and fault.kind in ("drip_body", "slow"):
            # 2 bytes/s (every read succeeds: no read timeout fires) or, for "slow", 8 KiB/s: fast enough
            # for any minimum rate, too slow for a short deadline.
            step, pause = (1, 0.5) if fault.kind == "drip_body" else (1024, 0.125)
            self._drip(fh.read(length), step, pause)
            return
        if fault is not None:
            # Promise ``length`` bytes, deliver a third, drop the connection.
            self.wfile.write(fh.read(length // 3))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        super().send_body(fh, length)

    def _error_status(self, status: int) -> None:
        self._send(status, f"{status} injected\n".encode(), {})

    def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server_factory() -> Iterator[Callable[[Path], RepoHTTPServer]]:
    started: list[RepoHTTPServer] = []

    def start(root: Path) -> RepoHTTPServer:
        srv = make_server(root, "127.0.0.1", 0, FaultyHandler)
        srv.faults = []  # type: ignore[attr-defined]
        srv.fault_lock = threading.Lock()  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


# -- the world: a template repository built once, copied per test ---------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> Path:
    base = tmp_path_factory.mktemp("template")
    repo = Repository.init(base / "repo", base / "keys", roles={"timestamp": RoleKeys(2, 2)})
    bundle = build_bundle(samples["silero_vad"], base / "out", name="vad", version=1)
    repo.publish(bundle)
    return base


@dataclass
class World:
    base: Path
    repo: Repository
    server: RepoHTTPServer
    dest: Path
    progress: list[tuple[str, int, int | None]] = field(default_factory=list)

    def updater(self, **kw: Any) -> BundleUpdater:
        kw.setdefault("progress", lambda *a: self.progress.append(a))
        return BundleUpdater(self.base / "device" / "metadata", self.server.url,
                             trusted_root=self.repo.root_bytes(1), cache_dir=self.base / "device" / "cache", **kw)

    def fault(self, kind: str, suffix: str, **kw: Any) -> None:
        self.server.faults.append(Fault(kind, suffix, **kw))  # type: ignore[attr-defined]

    def meta(self, name: str) -> Path:
        return self.repo.metadata_dir / name

    def resign(self, name: str, signers: list[CryptoSigner], bump: bool = True) -> None:
        """Re-sign a metadata file with exactly ``signers`` (an attacker's or too few keys)."""
        md = Metadata.from_file(str(self.meta(name)))
        if bump:
            md.signed.version += 1
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        self.meta(name).write_bytes(md.to_bytes(JSONSerializer()))

    def signers(self, role: str) -> list[CryptoSigner]:
        return self.repo.keys.signers(role, self.repo.root().signed.roles[role].keyids)

    def target_file(self) -> Path:
        return next((self.repo.targets_dir / "vad").glob("*.vad-1.bundle"))

    def dest_files(self) -> list[Path]:
        return [p for p in self.dest.rglob("*") if p.is_file()] if self.dest.exists() else []


@pytest.fixture
def world(template: Path, tmp_path: Path, server_factory: Callable[[Path], RepoHTTPServer]) -> World:
    shutil.copytree(template, tmp_path / "w")
    base = tmp_path / "w"
    repo = Repository(base / "repo", base / "keys")
    return World(base, repo, server_factory(repo.dir), tmp_path / "dest")


# -- bad archives and manifests (published and downloaded through TUF, refused at staging) ---------

def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], *, compress: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue()) if compress else raw.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


MANIFEST = {"schema_version": 1, "name": "evil", "version": 1, "runtime": "onnx", "model": "model.onnx"}
GOOD_MANIFEST = json.dumps(MANIFEST).encode()
MODEL = b"onnx-bytes" * 10


def _archive(*extra: tuple[tarfile.TarInfo, bytes | None], manifest: bytes | None = GOOD_MANIFEST,
             model: bool = True) -> bytes:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    if manifest is not None:
        members.append(_file("manifest.json", manifest))
    if model:
        members.append(_file("model.onnx", MODEL))
    return _tar([*members, *extra])


LIMITS = ExtractLimits(max_member_bytes=4096, max_total_bytes=8192, max_members=8)


# -- the table ------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    setup: Callable[[World], None]
    error: type[Exception]
    match: str | None = None
    field: str | None = None
    stage: str = "download"  # download | extract
    archive: Callable[[], bytes] | None = None
    then: Callable[[World, BundleUpdater], None] | None = None
    updater_kw: dict[str, Any] = dataclasses.field(default_factory=dict)


def _refresh_first(w: World) -> None:
    w.updater().refresh()


def _wrong_key(w: World) -> None:
    attacker = CryptoSigner.generate_ed25519()
    w.resign("timestamp.json", [attacker, CryptoSigner.generate_ed25519()])


def _threshold(w: World) -> None:
    w.resign("timestamp.json", w.signers("timestamp")[:1])


def _rollback(w: World) -> None:
    old = w.meta("timestamp.json").read_bytes()
    w.repo.refresh()
    _refresh_first(w)  # the device now trusts the newer timestamp
    w.meta("timestamp.json").write_bytes(old)


def _snapshot_rollback(w: World) -> None:
    # A new snapshot that lists an *older* targets version than the device already has.
    _refresh_first(w)
    w.repo.refresh()
    snap_name = f"{w.repo.timestamp().signed.snapshot_meta.version}.snapshot.json"
    snap = Metadata.from_file(str(w.meta(snap_name)))
    snap.signed.meta["targets.json"].version = 1
    snap.sign(w.signers("snapshot")[0])
    w.meta(snap_name).write_bytes(snap.to_bytes(JSONSerializer()))


def _freeze(w: World) -> None:
    w.repo.refresh(expiry={"timestamp": timedelta(seconds=-60)})


def _mix_snapshot(w: World) -> None:
    # timestamp says snapshot vN; serve the older snapshot's (validly signed) content under that name.
    w.repo.refresh()
    version = w.repo.timestamp().signed.snapshot_meta.version
    shutil.copyfile(w.meta(f"{version - 1}.snapshot.json"), w.meta(f"{version}.snapshot.json"))


def _mix_targets(w: World) -> None:
    # snapshot says targets v2; serve targets v1 (valid signature) under the v2 name.
    shutil.copyfile(w.meta("1.targets.json"), w.meta("2.targets.json"))


def _corrupt_target(w: World) -> None:
    path = w.target_file()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _short_target(w: World) -> None:
    path = w.target_file()
    path.write_bytes(path.read_bytes()[:-100])


def _resume_completes(w: World, updater: BundleUpdater) -> None:
    partials = list((w.base / "device" / "cache" / "partial").glob("*.part"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert 0 < kept < w.target_file().stat().st_size
    path = updater.download("vad", 1, dest_dir=w.dest)
    _method, url, range_header = w.server.requests[-1]
    assert url.endswith(".vad-1.bundle") and range_header == f"bytes={kept}-"
    assert path.read_bytes() == w.target_file().read_bytes()
    assert not partials[0].exists()


def _range_ignored_completes(w: World, updater: BundleUpdater) -> None:
    w.fault("ignore_range", ".vad-1.bundle")
    path = updater.download("vad", 1, dest_dir=w.dest)
    assert path.read_bytes() == w.target_file().read_bytes()
    assert any(r[2] for r in w.server.requests)  # it asked, the server answered 200, it started over


def _nothing(w: World) -> None:
    pass


CASES = [
    Case("wrong_signing_key", _wrong_key, errors.SignatureError, "0/2"),
    Case("threshold_not_met", _threshold, errors.SignatureError, "1/2"),
    Case("rollback_timestamp", _rollback, errors.RollbackError, "must be >="),
    Case("rollback_targets_in_snapshot", _snapshot_rollback, errors.RollbackError, "targets.json"),
    Case("freeze_expired_timestamp", _freeze, errors.ExpiredError, "timestamp.json is expired"),
    Case("mix_and_match_snapshot", _mix_snapshot, errors.VersionMismatchError, "snapshot version"),
    Case("mix_and_match_targets", _mix_targets, errors.VersionMismatchError, "Expected targets v2, got v1"),
    Case("target_hash_mismatch", _corrupt_target, errors.IntegrityError, "hash", field="hashes"),
    Case("target_length_mismatch", _short_target, errors.IntegrityError, "length", field="length"),
    Case("endless_target", lambda w: w.fault("endless", ".vad-1.bundle"), errors.IntegrityError,
         "more than the signed length", field="length"),
    Case("endless_timestamp", lambda w: w.fault("endless", "timestamp.json"), errors.IntegrityError,
         "more than", field="length"),
    Case("truncated_then_resume", lambda w: w.fault("truncate", ".vad-1.bundle", times=1), errors.DownloadError,
         "interrupted", then=_resume_completes),
    Case("truncated_then_range_ignored", lambda w: w.fault("truncate", ".vad-1.bundle", times=1),
         errors.DownloadError, "interrupted", then=_range_ignored_completes),
    Case("target_404", lambda w: w.target_file().unlink(), errors.DownloadError, "HTTP 404"),
    Case("timestamp_404", lambda w: w.meta("timestamp.json").unlink(), errors.DownloadError, "HTTP 404"),
    Case("timestamp_500", lambda w: w.fault("status", "timestamp.json", status=500), errors.DownloadError,
         "HTTP 500"),
    Case("target_500", lambda w: w.fault("status", ".vad-1.bundle", status=500), errors.DownloadError, "HTTP 500"),
    Case("garbage_timestamp", lambda w: w.fault("garbage", "timestamp.json"), errors.MetadataFormatError,
         "unparseable"),
    Case("garbage_targets", lambda w: w.fault("garbage", "2.targets.json"), errors.MetadataFormatError,
         "unparseable"),
    Case("bundle_over_device_cap", _nothing, errors.BundleError, "over the 1000 byte bundle cap", field="length",
         updater_kw={"max_bundle_bytes": 1000}),
    Case("server_stalls_timeout", lambda w: w.fault("stall", "timestamp.json"), errors.DownloadError, "timed out",
         updater_kw={"timeout": 0.3}),
    # Archive and manifest cases: TUF verifies them (the fleet signed them); staging refuses them.
    Case("archive_dotdot", _nothing, errors.UnsafeArchiveError, "escapes", field="../evil.txt", stage="extract",
         archive=lambda: _archive(_file("../evil.txt", b"x"))),
    Case("archive_nested_dotdot", _nothing, errors.UnsafeArchiveError, "escapes", field="a/../../evil",
         stage="extract", archive=lambda: _archive(_file("a/../../evil", b"x"))),
    Case("archive_absolute", _nothing, errors.UnsafeArchiveError, "absolute", field="/etc/evil", stage="extract",
         archive=lambda: _archive(_file("/etc/evil", b"x"))),
    Case("archive_symlink", _nothing, errors.UnsafeArchiveError, "symlink", field="link", stage="extract",
         archive=lambda: _archive(_special("link", tarfile.SYMTYPE, "/etc/passwd"))),
    Case("archive_hardlink", _nothing, errors.UnsafeArchiveError, "hardlink", field="hard", stage="extract",
         archive=lambda: _archive(_special("hard", tarfile.LNKTYPE, "model.onnx"))),
    Case("archive_char_device", _nothing, errors.UnsafeArchiveError, "device", field="dev", stage="extract",
         archive=lambda: _archive(_special("dev", tarfile.CHRTYPE))),
    Case("archive_fifo", _nothing, errors.UnsafeArchiveError, "fifo", field="pipe", stage="extract",
         archive=lambda: _archive(_special("pipe", tarfile.FIFOTYPE))),
    Case("archive_member_over_cap", _nothing, errors.UnsafeArchiveError, "member cap", field="big.bin",
         stage="extract", archive=lambda: _archive(_file("big.bin", b"\0" * 5000))),
    Case("archive_too_many_members", _nothing, errors.UnsafeArchiveError, "more than 8 members", field="f6",
         stage="extract", archive=lambda: _archive(*[_file(f"f{i}", b"x") for i in range(8)])),
    Case("archive_total_over_cap", _nothing, errors.UnsafeArchiveError, "total size", field="c.bin",
         stage="extract", archive=lambda: _archive(*[_file(f"{n}.bin", b"\0" * 3000) for n in "abc"])),
    Case("archive_not_a_tar", _nothing, errors.UnsafeArchiveError, "archive", stage="extract",
         archive=lambda: gzip.compress(b"this is not a tar archive" * 40)),
    Case("manifest_missing", _nothing, errors.ManifestError, "missing", field="manifest.json", stage="extract",
         archive=lambda: _archive(manifest=None)),
    Case("manifest_malformed_json", _nothing, errors.ManifestError, "malformed JSON", field="manifest.json",
         stage="extract", archive=lambda: _archive(manifest=b"{not json")),
    Case("manifest_schema_violation", _nothing, errors.ManifestError, "must be > 0", field="version",
         stage="extract", archive=lambda: _archive(manifest=json.dumps({**MANIFEST, "version": 0}).encode())),
    Case("manifest_names_missing_file", _nothing, errors.ManifestError, "labels.txt", field="labels",
         stage="extract",
         archive=lambda: _archive(manifest=json.dumps({**MANIFEST, "labels": "labels.txt"}).encode())),
    Case("manifest_model_missing", _nothing, errors.ManifestError, "model.onnx", field="model", stage="extract",
         archive=lambda: _archive(model=False)),
]


def _publish_raw(w: World, data: bytes) -> None:
    """Add an arbitrary archive as target evil/evil-1.bundle (what a compromised build host could sign)."""
    from tuf.api.metadata import TargetFile

    with w.repo._locked():
        root = w.repo.root().signed
        targets = w.repo.targets()
        info = TargetFile.from_data("evil/evil-1.bundle", data, ["sha256"])
        stored = w.repo.targets_dir / "evil" / f"{info.hashes['sha256']}.evil-1.bundle"
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(data)
        targets.signed.targets[info.path] = info
        w.repo._bump("targets", targets, root, None)
        w.repo._write_snapshot_and_timestamp(root, targets.signed.version, None,
                                             w.repo.snapshot().signed.version + 1,
                                             w.repo.timestamp().signed.version + 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World) -> None:
    if case.stage == "extract":
        assert case.archive is not None
        _publish_raw(world, case.archive())
        downloaded = world.updater().download("evil", 1, dest_dir=world.base / "downloads")
        staging = world.dest / "staging"
        with pytest.raises(case.error, match=case.match) as info:
            extract_bundle(downloaded, staging, LIMITS)
        assert not staging.exists()
    else:
        case.setup(world)
        updater = world.updater(**case.updater_kw)
        with pytest.raises(case.error, match=case.match) as info:
            updater.download("vad", 1, dest_dir=world.dest)
    assert world.dest_files() == []
    if case.field is not None:
        assert getattr(info.value, "field", None) == case.field
    assert info.value.code  # every error carries a response code
    if case.then is not None:
        case.then(world, world.updater())


SLOW = {"deadline": 3.0, "min_rate": 1024, "rate_grace": 1.0}


@pytest.mark.parametrize(("fault", "suffix", "match"), [
    ("drip_body", ".vad-1.bundle", "bytes/s on average"),  # issue 12 item 6: kept "downloading" forever
    ("drip_body", "timestamp.json", "bytes/s on average"),
    ("drip_headers", ".vad-1.bundle", "bytes/s on average"),  # the headers never end: no body byte at all
    ("slow", ".vad-1.bundle", "3 s deadline"),  # over the minimum rate, but not done in time
])
def test_slow_retrieval_fails_in_bounded_time(world: World, fault: str, suffix: str, match: str) -> None:
    updater = world.updater(**SLOW)
    if suffix != "timestamp.json":
        updater.refresh()
    world.fault(fault, suffix)
    started = time.monotonic()
    with pytest.raises(errors.DownloadError, match=match) as info:
        updater.download("vad", 1, dest_dir=world.dest)
    took = time.monotonic() - started
    assert took < SLOW["deadline"] + 12, took  # the mirror drips for 20 s: a stuck download outlasts this
    assert info.value.code == "download_failed" and "slow retrieval" not in str(info.value).lower()
    assert world.dest_files() == []
    deadline = time.monotonic() + 2
    while any(t.name == "fetch-watch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "fetch-watch" for t in threading.enumerate())


def test_slow_retrieval_keeps_the_partial_and_the_next_attempt_resumes(world: World) -> None:
    updater = world.updater(**SLOW)
    updater.refresh()
    world.fault("truncate", ".vad-1.bundle", times=1)  # a third arrives, then the connection drops
    with pytest.raises(errors.DownloadError):
        updater.download("vad", 1, dest_dir=world.dest)
    world.fault("drip_body", ".vad-1.bundle", times=1)  # the retry meets a slow mirror: the partial stays
    with pytest.raises(errors.DownloadError, match="bytes/s"):
        updater.download("vad", 1, dest_dir=world.dest)
    partials = list((world.base / "device" / "cache" / "partial").glob("*.part"))
    assert len(partials) == 1 and partials[0].stat().st_size > 0
    path = updater.download("vad", 1, dest_dir=world.dest)
    assert path.read_bytes() == world.target_file().read_bytes()


@pytest.mark.parametrize(("elapsed", "received", "want"), [
    (0.5, 0, None),  # within the grace period nothing is judged
    (5.0, 10 * 1024 * 5, None),  # 10 KiB/s: over the minimum
    (5.0, 1024 * 5 - 1, "bytes/s on average over 5.0 s is under the 1024 bytes/s minimum"),
    (5.0, 2, "0 bytes/s on average"),  # the drip: 1 byte every 2 s
    (61.0, 10 << 20, "not complete after the 60 s deadline (10485760 bytes received)"),
])
def test_slow_retrieval_verdict(elapsed: float, received: int, want: str | None) -> None:
    from cloud_sync.updater.fetcher import _Watch

    watch = _Watch(deadline_s=60, min_rate=1024, grace_s=1.0)
    try:
        watch.received = received
        got = watch.verdict(watch.started + elapsed)
    finally:
        watch.close()
    assert (got is None) if want is None else (got is not None and want in got), got


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 25


# -- positive paths ------------------------------------------------------------------------------

def test_publish_download_verify_extract(world: World, samples: dict[str, Path]) -> None:
    updater = world.updater()
    info = updater.find("vad")
    assert (info.name, info.version, info.runtime) == ("vad", 1, "onnx")
    path = updater.download("vad", dest_dir=world.dest)
    assert path == world.dest / "vad-1.bundle"
    assert world.progress and world.progress[-1][1] == info.length == path.stat().st_size
    manifest = extract_bundle(path, world.base / "staging")
    assert isinstance(manifest, Manifest) and manifest.model == "model.onnx"
    assert (world.base / "staging" / "model.onnx").read_bytes() == samples["silero_vad"].read_bytes()
    with pytest.raises(errors.TargetNotFoundError):
        updater.find("vad", 7)


def test_latest_version_and_republish(world: World, samples: dict[str, Path]) -> None:
    bundle2 = build_bundle(samples["silero_vad"], world.base / "out", name="vad", version=2)
    world.repo.publish(bundle2)
    assert world.repo.publish(bundle2).path == "vad/vad-2.bundle"  # same bytes: no-op
    other = build_bundle(samples["silero_vad"], world.base / "other", name="vad", version=2,
                         manifest_extra={"description": "different bytes"})
    with pytest.raises(errors.RepositoryError, match="already published"):
        world.repo.publish(other)
    assert world.updater().find("vad").version == 2


def test_key_rotation_followed_by_device(world: World, samples: dict[str, Path]) -> None:
    world.updater().refresh()
    version = world.repo.rotate(roles={"root": RoleKeys(2, 2), "timestamp": None, "targets": None})
    assert version == 2
    world.repo.publish(build_bundle(samples["silero_vad"], world.base / "out", name="vad", version=2))
    # The device still holds only the root it was provisioned with (v1).
    path = world.updater().download("vad", 2, dest_dir=world.dest)
    assert path.exists()
    assert (world.base / "device" / "metadata" / "root_history" / "2.root.json").exists()
    assert list((world.repo.keys.dir / "retired" / "root").glob("*.pem"))
    # Old timestamp keys no longer count: a timestamp signed with them is refused.
    retired = world.repo.keys.dir / "retired" / "timestamp"
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    old = [CryptoSigner(load_pem_private_key(p.read_bytes(), None)) for p in retired.glob("*.pem")]
    world.resign("timestamp.json", old)
    with pytest.raises(errors.SignatureError):
        world.updater().refresh()


def test_bandwidth_limit_slows_download(world: World) -> None:
    length = world.updater().find("vad").length
    world.updater().download("vad", dest_dir=world.base / "fast")
    rate = 8 * 1024 * 1024
    start = time.monotonic()
    world.updater(bandwidth=rate).download("vad", dest_dir=world.base / "slow")
    slow = time.monotonic() - start
    assert slow >= 0.9 * length / rate  # never faster than the limit (an unthrottled download may be slow too)


def test_dev_server_ranges(world: World) -> None:
    import urllib3

    http = urllib3.PoolManager()
    url = f"{world.server.url}/metadata/1.root.json"
    body = (world.repo.metadata_dir / "1.root.json").read_bytes()
    r = http.request("GET", url, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and r.data == body[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(body)}"
    r = http.request("GET", url, headers={"Range": "bytes=-5"})
    assert r.status == 206 and r.data == body[-5:]
    r = http.request("GET", url, headers={"Range": f"bytes={len(body)}-"})
    assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(body)}"
    r = http.request("GET", url, headers={"Range": "bytes=9-3"})
    assert r.status == 416
    assert http.request("GET", f"{world.server.url}/.lock").status == 404
    assert http.request("GET", f"{world.server.url}/metadata/../../keys").status == 404
    assert http.request("GET", url).data == body
