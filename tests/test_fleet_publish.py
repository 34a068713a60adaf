"""Model upload to signed bundle: real ONNX (Silero VAD) and TFLite (MediaPipe face detection,
okay_nabu) models published with online keys only and verified by the device's TUF updater
against the root; every bad upload answers its own code and leaves the repository byte-identical.
The HTTP endpoint runs on uvicorn over loopback, driven by `edge-fleet upload --server`."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sync import errors
from cloud_sync.bundles import extract_bundle, tensor_array
from cloud_sync.fleet import bundles_cli, cli
from cloud_sync.fleet.modelcheck import load_model
from cloud_sync.fleet.publishing import UploadLimits, publish_upload
from cloud_sync.repo import ONLINE_ROLES, Repository, make_server
from cloud_sync.updater import BundleUpdater

pytestmark = pytest.mark.timeout(120)


def silero_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"input": rng.uniform(-0.5, 0.5, (1, 576)).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def tree_hash(root: Path) -> str:
    """Every path, type, mode and byte under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest.update(f"{path.relative_to(root)}|{st.st_mode}|{st.st_size}\n".encode())
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A repository initialised offline (all keys), and the online keys exported for the service."""
    repo, offline, online = tmp_path / "repo", tmp_path / "offline-keys", tmp_path / "online-keys"
    Repository.init(repo, offline)
    assert bundles_cli.main(["keys", "export-online", "--repo", str(repo), "--keys", str(offline),
                             "--out", str(online)]) == 0
    return {"repo": repo, "offline": offline, "online": online}


@pytest.fixture
def repo(keys: dict[str, Path]) -> Repository:
    service = Repository(keys["repo"], keys["online"])
    assert not service.holds_root_key() and set(service.online_keys()) == set(ONLINE_ROLES)
    return service


@pytest.fixture
def served(keys: dict[str, Path]) -> Iterator[str]:
    server = make_server(keys["repo"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


def verify_on_device(tmp_path: Path, url: str, repo_dir: Path, name: str, version: int) -> Path:
    """The device's side: TUF from the pinned 1.root.json, download, safe extraction. Returns the bundle root."""
    device = tmp_path / f"device-{name}-{version}"
    updater = BundleUpdater(device / "tuf", url, trusted_root=repo_dir / "metadata" / "1.root.json",
                            cache_dir=device / "cache")
    updater.refresh()
    info = updater.find(name, version)
    assert info.version == version and info.custom["name"] == name
    bundle = updater.download(name, version, dest_dir=device / "incoming")
    staged = device / "staged"
    extract_bundle(bundle, staged)
    return staged


def check_vectors(staged: Path) -> None:
    """Each recorded test vector reproduces on the runtime (the device's deploy check)."""
    manifest = read_manifest_dir(staged)
    model = load_model(staged / manifest["model"])
    for vector in manifest["test_vectors"]:
        got = model.run({n: tensor_array(v, staged) for n, v in vector["inputs"].items()})
        for out, want in vector["expected"].items():
            np.testing.assert_allclose(got[out], tensor_array(want, staged), rtol=vector["rtol"], atol=vector["atol"])


def read_manifest_dir(staged: Path) -> dict[str, Any]:
    return json.loads((staged / "manifest.json").read_text())


# -- the good path -------------------------------------------------------------------------------


def test_onnx_upload_is_published_signed_and_verifies_on_a_device(tmp_path: Path, samples: dict[str, Path],
                                                                  repo: Repository, served: str) -> None:
    np.savez(tmp_path / "vector.npz", **silero_feeds())
    pre = '{"type": "audio_frames", "sample_rate": 16000, "frame": 512}'
    published = publish_upload(repo, samples["silero_vad"], "silero-vad", "3", pre=pre,
                               post={"type": "threshold", "value": 0.5}, test_input=tmp_path / "vector.npz",
                               filename="silero_vad.onnx", description="voice activity", work_dir=tmp_path / "work")
    assert published.target == "silero-vad/silero-vad-3.bundle" and published.runtime == "onnx"
    assert published.test_vectors == 1 and [i["name"] for i in published.inputs] == ["input", "state", "sr"]
    assert list((tmp_path / "work").iterdir()) == [], "the work directory is cleaned up"
    staged = verify_on_device(tmp_path, served, repo.dir, "silero-vad", 3)
    manifest = read_manifest_dir(staged)
    assert manifest["preprocess"] == {"type": "audio_frames", "sample_rate": 16000, "frame": 512}
    assert manifest["postprocess"] == {"type": "threshold", "value": 0.5}
    assert manifest["description"] == "voice activity" and manifest["model"] == "model.onnx"
    assert manifest["inputs"][1] == {"name": "state", "dtype": "float32", "shape": [2, -1, 128]}
    check_vectors(staged)
    # the signatures chain to the root the device was provisioned with, and the root key never left its home
    root = json.loads((repo.dir / "metadata" / "1.root.json").read_text())["signed"]
    assert not list(repo.keys.dir.glob("root/*.pem")) and root["roles"]["root"]["keyids"]


def test_tflite_upload_with_a_large_test_input_stores_vectors_as_files(tmp_path: Path, samples: dict[str, Path],
                                                                       repo: Repository, served: str) -> None:
    image = np.random.default_rng(5).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    published = publish_upload(repo, samples["face_detection"], "faces", 1, test_input=tmp_path / "image.npy",
                               filename="face_detection_short_range.tflite")
    assert published.runtime == "tflite"
    assert sorted(published.files) == ["model.tflite", "test-expected-0.npy", "test-input-0.npy"]
    staged = verify_on_device(tmp_path, served, repo.dir, "faces", 1)
    vector = read_manifest_dir(staged)["test_vectors"][0]
    assert vector["inputs"]["input"] == {"dtype": "float32", "shape": [1, 128, 128, 3], "file": "test-input-0.npy"}
    assert vector["expected"]["regressors"]["file"] == "test-expected-0.npy"  # 14,336 values
    assert len(vector["expected"]["classificators"]["data"]) == 896  # small enough to stay inline
    check_vectors(staged)


def test_archive_upload_with_manifest_fields_labels_and_a_quantized_model(tmp_path: Path, samples: dict[str, Path],
                                                                          repo: Repository, served: str) -> None:
    archive = make_archive(tmp_path / "nabu.tar.gz", {
        "okay-nabu/okay_nabu.tflite": samples["okay_nabu"].read_bytes(),
        "okay-nabu/labels.txt": b"okay nabu\n",
        "okay-nabu/manifest.json": json.dumps({"name": "nabu", "labels": "labels.txt", "description": "wake word",
                                               "postprocess": {"type": "threshold", "value": 0.9},
                                               "constraints": {"min_agent_version": "0.1.0"}}).encode()})
    np.save(tmp_path / "features.npy", np.random.default_rng(1).uniform(0, 20, (1, 3, 40)).astype(np.float32))
    published = publish_upload(repo, archive, "nabu", 7, test_input=tmp_path / "features.npy", filename="nabu.tar.gz")
    assert published.files == ["model.tflite", "labels.txt"]
    staged = verify_on_device(tmp_path, served, repo.dir, "nabu", 7)
    manifest = read_manifest_dir(staged)
    assert manifest["labels"] == "labels.txt" and (staged / "labels.txt").read_text() == "okay nabu\n"
    assert manifest["constraints"]["min_agent_version"] == "0.1.0"
    assert manifest["inputs"][0]["dtype"] == "int8"
    vector_input = manifest["test_vectors"][0]["inputs"]["serving_default_input_audio:0"]
    assert vector_input["dtype"] == "int8", "float features are recorded quantized, as the model is given them"
    assert manifest["test_vectors"][0]["expected"]["StatefulPartitionedCall:0"]["dtype"] == "float32"
    check_vectors(staged)


def test_expected_values_of_a_quantized_output_may_be_dequantized_floats() -> None:
    from cloud_sync.bundles import Manifest

    base = {"schema_version": 1, "name": "q", "version": 1, "runtime": "tflite", "model": "model.tflite",
            "inputs": [{"name": "x", "dtype": "int8", "shape": [1]}], "outputs": [{"name": "y", "dtype": "uint8",
                                                                                  "shape": [1]}]}
    vector = {"inputs": {"x": {"dtype": "int8", "shape": [1], "data": [3]}},
              "expected": {"y": {"dtype": "float32", "shape": [1], "data": [0.25]}}}
    assert Manifest.from_dict({**base, "test_vectors": [vector]}).test_vectors[0].expected["y"].dtype == "float32"
    for bad in ({**vector, "expected": {"y": {"dtype": "float64", "shape": [1], "data": [0.25]}}},
                {**vector, "inputs": {"x": {"dtype": "float32", "shape": [1], "data": [0.3]}}}):
        with pytest.raises(errors.ManifestError, match="does not match declared"):
            Manifest.from_dict({**base, "test_vectors": [bad]})


def test_publishing_twice_keeps_every_earlier_version(tmp_path: Path, samples: dict[str, Path], repo: Repository,
                                                      served: str) -> None:
    publish_upload(repo, samples["silero_vad"], "vad", 1, filename="m.onnx")
    publish_upload(repo, samples["silero_vad"], "vad", 2, filename="m.onnx")
    staged = verify_on_device(tmp_path, served, repo.dir, "vad", 1)
    assert read_manifest_dir(staged)["version"] == 1 and read_manifest_dir(staged)["test_vectors"] == []
    assert verify_on_device(tmp_path / "again", served, repo.dir, "vad", 2).is_dir()


# -- bad uploads: each its own code, and the repository byte-identical ------------------------------


def make_archive(path: Path, members: dict[str, bytes], *, extra: Callable[[tarfile.TarFile], None] | None = None,
                 mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return path


def special(kind: str, name: str, target: str = "") -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind  # type: ignore[assignment]
        info.linkname = target
        tar.addfile(info)
    return add


def declared_huge(tmp_path: Path, model: bytes) -> Path:
    """A tar whose second member's header claims 100 GB (the data never comes)."""
    path = tmp_path / "huge.tar"
    with path.open("wb") as fh:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(model)
        fh.write(info.tobuf(tarfile.PAX_FORMAT))
        fh.write(model + b"\0" * (-len(model) % 512))
        big = tarfile.TarInfo("weights.bin")
        big.size = 100 << 30
        fh.write(big.tobuf(tarfile.PAX_FORMAT))
        fh.write(b"\0" * 4096)
    return path


def bomb(tmp_path: Path) -> Path:
    """A gzip'd tar of 200 MB of zeros: a few hundred KB on the wire."""
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"zeros-{i}.bin")
            info.size = 100 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    return path


Case = tuple[Callable[[Path, dict[str, Path]], dict[str, Any]], str, str]


def upload(file: Path, **kw: Any) -> dict[str, Any]:
    return {"upload": file, **kw}


BAD: dict[str, Case] = {
    "random bytes": (lambda t, s: upload(write(t / "m.onnx", os.urandom(50_000))), "not_a_model", "cannot load"),
    "text named .onnx": (lambda t, s: upload(write(t / "m.onnx", b"hello, I am not a model\n" * 100)),
                         "not_a_model", "onnx cannot load"),
    "random bytes named .tflite": (lambda t, s: upload(write(t / "m.tflite", os.urandom(50_000))), "not_a_model",
                                   "tflite cannot load"),
    "truncated onnx": (lambda t, s: upload(write(t / "m.onnx", s["silero_vad"].read_bytes()[:100_000])),
                       "not_a_model", "cannot load"),
    "truncated tflite": (lambda t, s: upload(write(t / "m.tflite", s["face_detection"].read_bytes()[:50_000])),
                         "not_a_model", ""),
    "empty file": (lambda t, s: upload(write(t / "m.onnx", b"")), "not_a_model", ""),
    "archive bomb": (lambda t, s: upload(bomb(t)), "unsafe_archive", "cap"),
    "declared huge member": (lambda t, s: upload(declared_huge(t, s["silero_vad"].read_bytes()),
                                                 limits=UploadLimits(max_member_bytes=64 << 20)),
                             "unsafe_archive", "member cap"),
    "traversal": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"../evil.onnx": b"x"})), "unsafe_archive",
                  "escapes"),
    "nested traversal": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"m/../../x": b"x"})), "unsafe_archive",
                         "escapes"),
    "absolute path": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"/etc/cron.d/x": b"x"})), "unsafe_archive",
                      "absolute"),
    "symlink member": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"model.onnx": b"x"},
                                                        extra=special(tarfile.SYMTYPE, "labels.txt", "/etc/passwd"))),
                       "unsafe_archive", "symlink"),
    "hardlink member": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"model.onnx": b"x"},
                                                         extra=special(tarfile.LNKTYPE, "l.txt", "model.onnx"))),
                        "unsafe_archive", "hardlink"),
    "device member": (lambda t, s: upload(make_archive(t / "a.tar.gz", {}, extra=special(tarfile.CHRTYPE, "null"))),
                      "unsafe_archive", "device"),
    "too many members": (lambda t, s: upload(make_archive(t / "a.tar.gz", {f"f{i}.txt": b"x" for i in range(70)})),
                         "unsafe_archive", "more than 64 members"),
    "truncated archive": (lambda t, s: upload(write(t / "a.tar.gz", make_archive(
        t / "whole.tar.gz", {"model.onnx": s["silero_vad"].read_bytes()}).read_bytes()[:200_000])),
        "unsafe_archive", ""),
    "archive without a model": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"readme.txt": b"hi"})),
                                "not_a_model", "no .onnx or .tflite"),
    "archive with two models": (lambda t, s: upload(make_archive(t / "a.tar.gz", {
        "a.onnx": s["silero_vad"].read_bytes(), "b.onnx": s["silero_vad"].read_bytes()})), "not_a_model",
        "2 (a.onnx, b.onnx)"),
    "archive with a bad model": (lambda t, s: upload(make_archive(t / "a.tar.gz", {"m.onnx": b"nope"})),
                                 "not_a_model", "cannot load"),
    "manifest not JSON": (lambda t, s: upload(make_archive(t / "a.tar.gz", {
        "m.onnx": s["silero_vad"].read_bytes(), "manifest.json": b"{nope"})), "bad_manifest", "malformed JSON"),
    "manifest unknown field": (lambda t, s: upload(make_archive(t / "a.tar.gz", {
        "m.onnx": s["silero_vad"].read_bytes(), "manifest.json": b'{"colour": "red"}'})), "bad_manifest",
        "unknown field"),
    "manifest names a missing file": (lambda t, s: upload(make_archive(t / "a.tar.gz", {
        "m.onnx": s["silero_vad"].read_bytes(), "manifest.json": b'{"labels": "labels.txt"}'})), "bad_manifest",
        "not in the bundle"),
    "manifest bad constraint": (lambda t, s: upload(make_archive(t / "a.tar.gz", {
        "m.onnx": s["silero_vad"].read_bytes(),
        "manifest.json": b'{"constraints": {"min_agent_version": "latest"}}'})), "bad_manifest", "dotted"),
    "upload over the cap": (lambda t, s: upload(s["silero_vad"], limits=UploadLimits(max_upload_bytes=100_000)),
                            "too_large", "more than 100000 bytes"),
    "bad name": (lambda t, s: upload(s["silero_vad"], name="Bad Name"), "bad_name", "a-z"),
    "empty name": (lambda t, s: upload(s["silero_vad"], name=""), "bad_name", ""),
    "path as name": (lambda t, s: upload(s["silero_vad"], name="../etc"), "bad_name", ""),
    "long name": (lambda t, s: upload(s["silero_vad"], name="a" * 65), "bad_name", ""),
    "version zero": (lambda t, s: upload(s["silero_vad"], version="0"), "bad_version", ""),
    "negative version": (lambda t, s: upload(s["silero_vad"], version="-1"), "bad_version", ""),
    "dotted version": (lambda t, s: upload(s["silero_vad"], version="1.5"), "bad_version", ""),
    "word version": (lambda t, s: upload(s["silero_vad"], version="latest"), "bad_version", ""),
    "huge version": (lambda t, s: upload(s["silero_vad"], version="99999999999"), "bad_version", ""),
    "pre not JSON": (lambda t, s: upload(s["silero_vad"], pre="{type: image"), "bad_processing", "malformed JSON"),
    "pre a list": (lambda t, s: upload(s["silero_vad"], pre="[1, 2]"), "bad_processing", "JSON object"),
    "post without type": (lambda t, s: upload(s["silero_vad"], post='{"value": 0.5}'), "bad_processing", "type"),
    "post empty type": (lambda t, s: upload(s["silero_vad"], post='{"type": ""}'), "bad_processing", "type"),
    "test input not numpy": (lambda t, s: upload(s["silero_vad"], test_input=write(t / "x.npy", b"hello")),
                             "bad_test_input", "not a .npy or .npz"),
    "test input for a multi-input model": (lambda t, s: upload(s["silero_vad"], test_input=npy(
        t / "x.npy", np.zeros((1, 576), np.float32))), "bad_test_input", "3 inputs"),
    "test input wrong shape": (lambda t, s: upload(s["face_detection"], filename="f.tflite", test_input=npy(
        t / "x.npy", np.zeros((1, 64, 64, 3), np.float32))), "bad_test_input", "does not fit"),
    "test input wrong dtype": (lambda t, s: upload(s["face_detection"], filename="f.tflite", test_input=npy(
        t / "x.npy", np.zeros((1, 128, 128, 3), np.float64))), "bad_test_input", "dtype"),
    "test input pickled objects": (lambda t, s: upload(s["silero_vad"], test_input=pickled(t / "x.npy")),
                                   "bad_test_input", "unreadable"),
    "test input unknown name": (lambda t, s: upload(s["silero_vad"], test_input=npz(
        t / "x.npz", {**silero_feeds(), "extra": np.zeros(1)})), "bad_test_input", "unknown input 'extra'"),
    "test input zip bomb": (lambda t, s: upload(s["silero_vad"], test_input=npz(
        t / "x.npz", {"input": np.zeros((8 << 20,), np.float64)}, compressed=True),
        limits=UploadLimits(max_test_input_bytes=1 << 20)), "too_large", ""),
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def npz(path: Path, arrays: dict[str, np.ndarray], *, compressed: bool = False) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def pickled(path: Path) -> Path:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_upload_answers_its_code_and_publishes_nothing(case: str, tmp_path: Path, samples: dict[str, Path],
                                                           repo: Repository) -> None:
    make, code, message = BAD[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    kw = make(inputs, samples)
    file = kw.pop("upload")
    kw.setdefault("filename", file.name)
    before = tree_hash(repo.dir)
    (tmp_path / "work").mkdir()
    with pytest.raises(errors.UploadError) as info:
        publish_upload(repo, file, kw.pop("name", "model"), kw.pop("version", "1"), work_dir=tmp_path / "work", **kw)
    assert info.value.code == code, str(info.value)
    assert message in str(info.value)
    assert tree_hash(repo.dir) == before, "the repository is byte-identical"
    assert list((tmp_path / "work").iterdir()) == []


def test_version_collision_and_same_bytes_again(tmp_path: Path, samples: dict[str, Path], repo: Repository) -> None:
    publish_upload(repo, samples["silero_vad"], "vad", 4, filename="vad.onnx")
    before = tree_hash(repo.dir)
    for model in (samples["silero_vad"], samples["face_detection"]):  # identical bytes or not: immutable
        with pytest.raises(errors.VersionExistsError) as info:
            publish_upload(repo, model, "vad", 4, filename=model.name)
        assert info.value.code == "version_exists" and info.value.status == 409 and info.value.field == "version"
        assert isinstance(info.value, errors.RepositoryError)
    assert tree_hash(repo.dir) == before


def test_a_missing_online_key_fails_before_anything_is_written(tmp_path: Path, samples: dict[str, Path],
                                                              keys: dict[str, Path]) -> None:
    for role in ONLINE_ROLES:
        partial = tmp_path / f"without-{role}"
        Repository(keys["repo"], keys["offline"]).keys.export(partial, tuple(r for r in ONLINE_ROLES if r != role))
        before = tree_hash(keys["repo"])
        with pytest.raises(errors.RepositoryError, match=f"{role}: 0 of the 1 keys"):
            publish_upload(Repository(keys["repo"], partial), samples["silero_vad"], "vad", 1, filename="m.onnx")
        assert tree_hash(keys["repo"]) == before, f"signing without {role} left the repository as it was"


def test_publish_settings_check(tmp_path: Path, keys: dict[str, Path]) -> None:
    from cloud_sync.fleet.publishing import PublishSettings

    online = PublishSettings(repo_dir=keys["repo"], keys_dir=keys["online"]).check()
    assert online == {"online_keys": {"targets": 1, "snapshot": 1, "timestamp": 1}, "root_key_present": False}
    assert PublishSettings(repo_dir=keys["repo"], keys_dir=keys["offline"]).check()["root_key_present"] is True
    with pytest.raises(errors.RepositoryError, match="targets: 0 of the 1 keys"):
        PublishSettings(repo_dir=keys["repo"], keys_dir=tmp_path / "empty").check()
    with pytest.raises(errors.RepositoryError, match="no repository"):
        PublishSettings(repo_dir=tmp_path / "nothing", keys_dir=keys["online"]).check()


def test_keys_export_online(tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    online = keys["online"]
    assert sorted(p.name for p in online.iterdir()) == ["snapshot", "targets", "timestamp"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in online.rglob("*.pem"))
    assert online.stat().st_mode & 0o777 == 0o700
    again = ["keys", "export-online", "--repo", str(keys["repo"]), "--keys", str(keys["offline"]), "--out",
             str(online)]
    assert bundles_cli.main(again) == 1
    assert "already holds keys" in capsys.readouterr().err
    # the online keys cannot rotate the root: that stays an offline operation
    assert bundles_cli.main(["keys", "rotate", "--repo", str(keys["repo"]), "--keys", str(online)]) == 1
    assert "old root keys" in capsys.readouterr().err


# -- the CLI (local mode) and the HTTP endpoint ----------------------------------------------------------


def test_cli_upload_local_mode(tmp_path: Path, samples: dict[str, Path], keys: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "v.npz", **silero_feeds())
    (tmp_path / "pre.json").write_text('{"type": "audio_frames", "sample_rate": 16000}')
    argv = ["upload", str(samples["silero_vad"]), "--name", "vad", "--version", "9", "--pre", "@" + str(
        tmp_path / "pre.json"), "--test-input", str(tmp_path / "v.npz"), "--repo", str(keys["repo"]), "--keys",
        str(keys["online"]), "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "vad/vad-9.bundle" and result["test_vectors"] == 1
    assert cli.main(argv) == 1
    assert "version_exists: version: vad version 9 is already published" in capsys.readouterr().err
    assert cli.main(["upload", str(samples["silero_vad"]), "--name", "vad", "--version", "10"]) == 2
    assert "--server" in capsys.readouterr().err
    assert cli.main(["upload", str(tmp_path / "nope.onnx"), "--name", "v", "--version", "1", "--repo", "r",
                     "--keys", "k"]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(tmp_path: Path, keys: dict[str, Path]) -> Iterator[str]:
    """The upload router in a FastAPI app on uvicorn over loopback; the token 'admin-token' is the admin."""
    import uvicorn
    from fastapi import FastAPI, Header, HTTPException

    from cloud_sync.fleet.publishing import PublishSettings
    from cloud_sync.fleet.upload_api import models_router

    def admin(authorization: str = Header(default="")) -> str:
        if authorization != "Bearer admin-token":
            raise HTTPException(401 if authorization != "Bearer viewer-token" else 403, "no")
        return "admin"

    settings = PublishSettings(repo_dir=keys["repo"], keys_dir=keys["online"], work_dir=tmp_path / "api-work",
                               limits=UploadLimits(max_upload_bytes=4 << 20, max_test_input_bytes=1 << 20))
    app = FastAPI()
    app.include_router(models_router(settings, admin))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_http_upload_publishes_and_maps_every_error(tmp_path: Path, samples: dict[str, Path], keys: dict[str, Path],
                                                    api: str, served: str, capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    np.savez(tmp_path / "v.npz", **silero_feeds())
    base = ["upload", "--server", api, "--token", "admin-token"]
    assert cli.main([*base[:1], str(samples["silero_vad"]), *base[1:], "--name", "vad", "--version", "1",
                     "--test-input", str(tmp_path / "v.npz"), "--post", '{"type": "threshold", "value": 0.5}']) == 0
    assert "published vad@1 (onnx) as vad/vad-1.bundle" in capsys.readouterr().out
    staged = verify_on_device(tmp_path, served, keys["repo"], "vad", 1)
    check_vectors(staged)
    assert read_manifest_dir(staged)["postprocess"] == {"type": "threshold", "value": 0.5}
    assert list((tmp_path / "api-work").iterdir()) == []

    before = tree_hash(keys["repo"])
    assert cli.main([*base[:1], str(samples["silero_vad"]), *base[1:], "--name", "vad", "--version", "1"]) == 1
    err = capsys.readouterr().err
    assert "version_exists" in err and "HTTP 409" in err
    url = api + "/api/models"
    auth = {"Authorization": "Bearer admin-token"}
    model = samples["silero_vad"].read_bytes()

    def post(data: dict[str, str], files: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(url, data=data, files=files, headers=auth if headers is None else headers, timeout=60)

    cases = [
        (post({"name": "vad", "version": "2"}, {"file": ("m.onnx", model)}, {}), 401, None),
        (post({"name": "vad", "version": "2"}, {"file": ("m.onnx", model)}, {"Authorization": "Bearer viewer-token"}),
         403, None),
        (post({"name": "vad", "version": "2"}, {"file": ("m.onnx", b"not a model")}), 422, "not_a_model"),
        (post({"name": "Bad!", "version": "2"}, {"file": ("m.onnx", model)}), 422, "bad_name"),
        (post({"name": "vad", "version": "x"}, {"file": ("m.onnx", model)}), 422, "bad_version"),
        (post({"name": "vad", "version": "2", "pre": "{"}, {"file": ("m.onnx", model)}), 422, "bad_processing"),
        (post({"name": "vad", "version": "2"}, {"file": ("m.onnx", os.urandom(5 << 20))}), 413, "too_large"),
        (post({"name": "vad", "version": "2"}, {"file": ("m.onnx", model), "test_input": ("t.npy", b"xx")}), 422,
         "bad_test_input"),
        (post({"name": "vad", "version": "2"}, {"file": ("a.tar.gz", make_archive(
            tmp_path / "t.tar.gz", {"../x.onnx": b"x"}).read_bytes())}), 422, "unsafe_archive"),
        (post({"version": "2"}, {"file": ("m.onnx", model)}), 400, "bad_request"),
        (post({"name": "vad", "version": "2", "colour": "red"}, {"file": ("m.onnx", model)}), 400, "bad_request"),
        (httpx.post(url, json={"name": "vad"}, headers=auth), 415, "unsupported_media_type"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (code, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code, response.text
    # a declared body over the caps is refused before a byte of it is read
    conn = http.client.HTTPConnection("127.0.0.1", int(api.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/api/models")
    for key, value in {**auth, "Content-Type": "multipart/form-data; boundary=b",
                       "Content-Length": str(50 << 20)}.items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "too_large"
    conn.close()
    assert tree_hash(keys["repo"]) == before
    assert list((tmp_path / "api-work").iterdir()) == []


def test_uploaded_bundles_install_on_a_real_agent(tmp_path: Path, samples: dict[str, Path], repo: Repository,
                                                  served: str) -> None:
    """The device's own install path (TUF, extraction, load, test vectors, swap, health) commits what an
    upload published: the recorded vectors reproduce on the agent's runtimes, quantized model included."""
    import orjson

    from tests.conftest import start_daemon

    archive = make_archive(tmp_path / "nabu.tar.gz", {"okay_nabu.tflite": samples["okay_nabu"].read_bytes()})
    np.save(tmp_path / "features.npy", np.random.default_rng(2).uniform(0, 20, (1, 3, 40)).astype(np.float32))
    publish_upload(repo, archive, "nabu", 1, test_input=tmp_path / "features.npy")
    np.save(tmp_path / "image.npy", np.random.default_rng(4).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32))
    publish_upload(repo, samples["face_detection"], "faces", 1, test_input=tmp_path / "image.npy",
                   filename="faces.tflite")
    np.savez(tmp_path / "vad.npz", **silero_feeds())
    publish_upload(repo, samples["silero_vad"], "vad", 1, test_input=tmp_path / "vad.npz", filename="vad.onnx")
    config = tmp_path / "agent.toml"
    config.write_text(f'[updates]\nrepo_url = "{served}"\ntrusted_root = "{repo.dir / "metadata" / "1.root.json"}"\n'
                      "health_window_s = 0.3\n")
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(tmp_path / "models"))
    try:
        for name in ("nabu", "faces", "vad"):
            status, _, data = daemon.client.request("POST", f"/v1/agent/models/{name}:deploy", b"{}",
                                                    {"Content-Type": "application/json"})
            assert status == 202, data
            deadline = time.monotonic() + 60
            while True:
                record = orjson.loads(daemon.client.request("GET", f"/v1/agent/deployments/{name}")[2])
                if record["state"] in ("committed", "rolled_back", "failed") and not record["running"]:
                    break
                assert time.monotonic() < deadline, record
                time.sleep(0.05)
            assert record["state"] == "committed", record
            assert "tested" in [state for state, _ in record["history"]]
    finally:
        daemon.stop()
