"""Bundle manifest schema, archive building/extraction, ``build_bundle`` and the bundle CLI commands."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sync import errors
from cloud_sync.bundles import (
    Manifest,
    build_bundle,
    extract_bundle,
    generate_test_vectors,
    read_manifest,
    safe_extract,
    tensor_array,
)
from cloud_sync.fleet import bundles_cli
from cloud_sync.repo import Repository

BASE: dict[str, Any] = {"schema_version": 1, "name": "vad", "version": 3, "runtime": "onnx", "model": "model.onnx"}
VECTOR: dict[str, Any] = {
    "inputs": {"x": {"dtype": "float32", "shape": [1, 2], "data": [0.5, 1.5]}},
    "expected": {"y": {"dtype": "float32", "shape": [1], "data": [2.0]}},
    "rtol": 0.001, "atol": 0.0001,
}
FULL: dict[str, Any] = {
    **BASE,
    "files": ["labels.txt", "vectors/in.npy"],
    "labels": "labels.txt",
    "description": "voice activity",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}],
    "preprocess": {"type": "audio_frames", "sample_rate": 16000},
    "postprocess": {"type": "threshold", "value": 0.5},
    "test_vectors": [VECTOR, {"inputs": {"x": {"dtype": "float32", "shape": [1, 2], "file": "vectors/in.npy"}},
                              "expected": {"y": {"dtype": "float32", "shape": [1], "data": [1.0]}}}],
    "constraints": {"min_agent_version": "0.1.0", "runtimes": ["onnx"], "accelerators": ["cuda", "cpu"]},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """FULL with one field (dotted path, [i] for list items) replaced; ``...`` deletes it."""
    data = json.loads(json.dumps(FULL))
    node: Any = data
    parts = path.replace("[", ".").replace("]", "").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def test_full_manifest_round_trips() -> None:
    manifest = Manifest.from_dict(FULL)
    assert manifest.preprocess is not None and manifest.preprocess.model_dump()["sample_rate"] == 16000
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert [f for f, _ in manifest.referenced_files()] == [
        "model", "files[0]", "files[1]", "labels", "test_vectors[1].inputs.x.file"]


@pytest.mark.parametrize(("path", "value", "field", "reason"), [
    ("schema_version", 2, "schema_version", "unsupported schema version"),
    ("name", ..., "name", "required"),
    ("name", "Bad Name", "name", "a-z"),
    ("version", 0, "version", "must be > 0"),
    ("version", "one", "version", "integer"),
    ("runtime", "tensorrt", "runtime", "must be one of"),
    ("model", "model.tflite", "model", "needs a .onnx model file"),
    ("model", "../model.onnx", "model", "relative path"),
    ("files[1]", "/abs.npy", "files[1]", "relative path"),
    ("labels", "a/../../x", "labels", "relative path"),
    ("inputs[0].shape[1]", -2, "inputs[0].shape[1]", "must be >= -1"),
    ("inputs[0].dtype", "float128", "inputs[0].dtype", "must be one of"),
    ("outputs[0].name", "", "outputs[0].name", "must not be empty"),
    ("preprocess", [1, 2], "preprocess", "must be a JSON object"),
    ("postprocess.type", ..., "postprocess.type", "required"),
    ("test_vectors[0].atol", -1, "test_vectors[0].atol", "must be >= 0"),
    ("test_vectors[0].rtol", "x", "test_vectors[0].rtol", "number"),
    ("test_vectors[0].inputs.x.data", [1.0], "test_vectors[0].inputs.x", "needs 2"),
    ("test_vectors[0].inputs.x.data", ["a", "b"], "test_vectors[0].inputs.x", "must be a number"),
    ("test_vectors[0].inputs.x.dtype", "int64", "test_vectors[0].inputs.x.dtype", "does not match declared"),
    ("test_vectors[0].inputs.x.shape", [2, 1], "test_vectors[0].inputs.x.shape", "does not fit"),
    ("test_vectors[0].inputs", {}, "test_vectors[0].inputs", "must not be empty"),
    ("test_vectors[0].expected.z", {"dtype": "float32", "shape": [1], "data": [1]}, "test_vectors[0].expected.z",
     "unknown tensor"),
    ("test_vectors[1].inputs.x.file", "in.bin", "test_vectors[1].inputs.x.file", ".npy"),
    ("test_vectors[1].inputs.x.data", [1, 2], "test_vectors[1].inputs.x", "exactly one of"),
    ("constraints.min_agent_version", "latest", "constraints.min_agent_version", "dotted numeric"),
    ("constraints.runtimes", ["cuda"], "constraints.runtimes[0]", "must be one of"),
    ("bogus", 1, "bogus", "unknown field"),
    ("files", ["manifest.json"], "files", "reserved"),
])
def test_manifest_errors_name_the_field(path: str, value: Any, field: str, reason: str) -> None:
    with pytest.raises(errors.ManifestError) as info:
        Manifest.from_dict(_with(path, value))
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_manifest_malformed_and_not_object() -> None:
    with pytest.raises(errors.ManifestError, match="malformed JSON") as info:
        Manifest.from_json(b"{")
    assert info.value.field == "manifest.json" and info.value.code == "bad_manifest"
    with pytest.raises(errors.ManifestError, match="JSON object"):
        Manifest.from_json(b"[1]")


@pytest.mark.parametrize(("path", "value", "field", "reason"), [
    ("inputs[0].allow_nonfinite", True, "inputs[0].allow_nonfinite", "only outputs"),
    ("outputs[0].allow_nonfinite", "yes", "outputs[0].allow_nonfinite", "boolean"),
])
def test_allow_nonfinite_is_schema_checked(path: str, value: Any, field: str, reason: str) -> None:
    with pytest.raises(errors.ManifestError) as info:
        Manifest.from_dict(_with(path, value))
    assert (info.value.field, reason in info.value.reason) == (field, True), info.value
    int_output = _with("outputs", [{"name": "y", "dtype": "int8", "shape": [-1], "allow_nonfinite": True}])
    int_output["test_vectors"] = []
    with pytest.raises(errors.ManifestError, match="int8 output cannot be non-finite"):
        Manifest.from_dict(int_output)
    allowed = Manifest.from_dict(_with("outputs[0].allow_nonfinite", True))
    assert allowed.nonfinite_outputs() == {"y"} and Manifest.from_dict(FULL).nonfinite_outputs() == set()
    assert Manifest.from_json(allowed.to_json()) == allowed
    assert b"allow_nonfinite" not in Manifest.from_dict(FULL).to_json()  # unchanged bytes for bundles without it


@pytest.mark.parametrize("depth", [33, 990, 100_000])
def test_deeply_nested_manifest_is_bad_manifest(depth: int) -> None:
    # Issue 12 item 8: 100,000 levels was a RecursionError (an ``internal`` error) in json.loads.
    raw = json.dumps(BASE)[:-1].encode() + b', "preprocess": {"type": "t", "x": ' + b"[" * depth + b"]" * depth + b"}}"
    with pytest.raises(errors.ManifestError, match="nested deeper than 32 levels") as info:
        Manifest.from_json(raw)
    assert info.value.code == "bad_manifest"
    Manifest.from_json(json.dumps(BASE)[:-1].encode() + b', "preprocess": {"type": "t", "x": [[[[]]]]}}')


NPY_CASES = {
    # Issue 12 item 8: a wrong shape (reshape ValueError) and a pickled object array were ``internal``.
    "wrong shape": (lambda: _npy(np.zeros((3,), np.float32)), "holds shape [3], the manifest declares [1, 2]"),
    "pickled objects": (lambda: _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True),
                        "holds object values, not numbers (pickled objects are refused)"),
    "strings": (lambda: _npy(np.array([["a", "b"]])), "not numbers"),
    "truncated": (lambda: _npy(np.zeros((1, 2), np.float32))[:-3], "data bytes, its header needs 8"),
    "not npy": (lambda: b"PK\x03\x04 a zip", "not a readable .npy file"),
    "structured": (lambda: _npy(np.zeros((1, 2), dtype=[("a", "f4")])), "not numbers"),
}


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


@pytest.mark.parametrize("case", list(NPY_CASES), ids=list(NPY_CASES))
def test_bad_npy_test_vector_is_bad_manifest_at_extraction(case: str, tmp_path: Path) -> None:
    from cloud_sync.bundles import write_archive

    data, reason = NPY_CASES[case]
    sources = _sources(tmp_path)
    sources["vectors/in.npy"].write_bytes(data())
    bundle = write_archive(tmp_path / "x.bundle", Manifest.from_dict(FULL), sources)
    with pytest.raises(errors.ManifestError) as info:
        extract_bundle(bundle, tmp_path / "staging")
    assert info.value.field == "test_vectors[1].inputs.x.file" and reason in info.value.reason, info.value
    assert not (tmp_path / "staging").exists()
    # tensor_array, which the installer uses, refuses the same file the same way (never np.load's pickle)
    sources["vectors/in.npy"].rename(tmp_path / "in.npy")
    with pytest.raises(errors.ManifestError, match="test_vectors"):
        tensor_array({"dtype": "float32", "shape": [1, 2], "file": "in.npy"}, tmp_path,
                     field="test_vectors[1].inputs.x")


def test_inline_data_that_does_not_fit_its_dtype_is_bad_manifest() -> None:
    with pytest.raises(errors.ManifestError, match="does not fit int8") as info:
        tensor_array({"dtype": "int8", "shape": [1], "data": [1000]}, field="test_vectors[0].inputs.x")
    assert info.value.field == "test_vectors[0].inputs.x.data"


def test_error_messages_and_fields_are_capped() -> None:
    # Issue 12 item 7: a 64 MiB member name went whole into the record, the log line and the event.
    assert errors.cap_message("short") == "short"
    capped = errors.cap_message("x" * 10_000_000)
    assert len(capped) == errors.MAX_MESSAGE_CHARS and capped.endswith("... [cut: 10000000 characters in all]")
    err = errors.UnsafeArchiveError("r" * 5000, field="n" * 70_000)
    assert len(err.field or "") == errors.MAX_FIELD_CHARS and len(str(err)) <= errors.MAX_MESSAGE_CHARS
    assert len(err.to_dict()["message"]) <= errors.MAX_MESSAGE_CHARS
    assert len(str(errors.DownloadError("d" * 5000, url="u" * 5000))) <= errors.MAX_MESSAGE_CHARS


def test_missing_vector_input_named() -> None:
    data = _with("inputs", [*FULL["inputs"], {"name": "sr", "dtype": "int64", "shape": []}])
    with pytest.raises(errors.ManifestError, match=r"missing input.*sr") as info:
        Manifest.from_dict(data)
    assert info.value.field == "test_vectors[0].inputs"


def _sources(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "src" / "vectors").mkdir(parents=True, exist_ok=True)
    files = {"model.onnx": b"model", "labels.txt": b"speech\nsilence\n"}
    out = {}
    for name, data in files.items():
        (tmp_path / "src" / name).write_bytes(data)
        out[name] = tmp_path / "src" / name
    np.save(tmp_path / "src" / "vectors" / "in.npy", np.array([[1.0, 2.0]], np.float32))
    out["vectors/in.npy"] = tmp_path / "src" / "vectors" / "in.npy"
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_archive_build_is_deterministic_and_extracts(tmp_path: Path, compress: bool) -> None:
    from cloud_sync.bundles import write_archive

    manifest = Manifest.from_dict(FULL)
    a = write_archive(tmp_path / "a.bundle", manifest, _sources(tmp_path), compress=compress)
    b = write_archive(tmp_path / "b.bundle", manifest, _sources(tmp_path), compress=compress)
    assert a.read_bytes() == b.read_bytes()
    assert (a.read_bytes()[:2] == b"\x1f\x8b") is compress
    with tarfile.open(a) as tar:
        assert tar.getnames()[0] == "manifest.json"
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
    assert read_manifest(a) == manifest
    loaded = extract_bundle(a, tmp_path / "staging")
    assert loaded == manifest
    vec = loaded.test_vectors[1].inputs["x"].model_dump()
    np.testing.assert_array_equal(tensor_array(vec, tmp_path / "staging"), [[1.0, 2.0]])
    np.testing.assert_array_equal(tensor_array(VECTOR["inputs"]["x"]), [[0.5, 1.5]])


def test_archive_refuses_missing_source(tmp_path: Path) -> None:
    from cloud_sync.bundles import write_archive

    sources = _sources(tmp_path)
    del sources["labels.txt"]
    with pytest.raises(errors.ManifestError, match=r"labels\.txt") as info:
        write_archive(tmp_path / "x.bundle", Manifest.from_dict(FULL), sources)
    assert info.value.field == "files[0]"
    assert not (tmp_path / "x.bundle").exists()


def _tar_with(tmp_path: Path, *parts: bytes) -> Path:
    from tests import hostile_archives as hostile

    return hostile.write(tmp_path / "x.bundle", [*hostile.valid_members(), *parts, hostile.END], one_member=True)


def test_pax_header_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # Issue 12 item 5: a 512 MiB PAX header (0.5 MB compressed) was read whole: +1.5 GiB in the agent.
    import tracemalloc

    from tests import hostile_archives as hostile

    bomb = hostile.write(tmp_path / "bomb.bundle", [hostile.header("././@PaxHeader", 512 << 20, tarfile.XHDTYPE),
                                                    hostile.Repeat(b"a" * (1 << 20), 512), *hostile.valid_members(),
                                                    hostile.END], one_member=True)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(errors.UnsafeArchiveError, match="PAX extended header of 536870912 bytes is over the "
                                                            "65536 byte cap"):
            extract_bundle(bomb, tmp_path / "staging")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes traced"
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize(("parts", "reason"), [
    # Issue 12 item 5: a 300-character name passed the checks and failed as io_error (ENAMETOOLONG).
    (lambda h: [h.pax(h.pax_record("path", b"n" * 300)), h.member("p", b"x")],
     "name of 300 characters is over the 255 character cap"),
    (lambda h: [h.pax(h.pax_record("path", ("名" * 100).encode())), h.member("p", b"x")],
     "name of 300 UTF-8 bytes is over the 255 byte cap"),
    (lambda h: [h.longname(b"n" * 70_000), h.member("p", b"x")], "GNU long name of 70001 bytes is over the 65536"),
    (lambda h: [h.longname(b"n" * 10)] * 9 + [h.member("p", b"x")], "more than 8 extension headers in a row"),
    (lambda h: [h.pax(h.pax_record("GNU.sparse.major", b"1") + h.pax_record("GNU.sparse.minor", b"0")),
                h.member("s", b"1\n0\n1\n")], "sparse file refused"),
    (lambda h: [h.member("evil\x1b[2J", b"x")], "control character in the name"),
    (lambda h: [h.member("labels.txt/x", b"x")], "conflicts with an earlier file of the same name"),
])
def test_hostile_headers_and_names_are_unsafe_archive(tmp_path: Path, parts: Any, reason: str) -> None:
    from tests import hostile_archives as hostile

    with pytest.raises(errors.UnsafeArchiveError) as info:
        extract_bundle(_tar_with(tmp_path, *parts(hostile)), tmp_path / "staging")
    assert reason in str(info.value) and "\x1b" not in str(info.value), info.value
    assert not (tmp_path / "staging").exists()


def test_safe_extract_dest_must_not_exist(tmp_path: Path, samples: dict[str, Path]) -> None:
    bundle = build_bundle(samples["silero_vad"], tmp_path, name="vad", version=1)
    (tmp_path / "staging").mkdir()
    with pytest.raises(FileExistsError):
        safe_extract(bundle, tmp_path / "staging", max_member_bytes=1 << 30, max_total_bytes=1 << 30, max_members=9)
    names = safe_extract(bundle, tmp_path / "s2", max_member_bytes=1 << 30, max_total_bytes=1 << 30, max_members=9)
    assert names == ["manifest.json", "model.onnx"]
    with pytest.raises(errors.UnsafeArchiveError, match="member cap") as info:
        safe_extract(bundle, tmp_path / "s3", max_member_bytes=1000, max_total_bytes=1 << 30, max_members=9)
    assert info.value.field == "model.onnx" and not (tmp_path / "s3").exists()


def test_build_bundle_from_directory(tmp_path: Path, samples: dict[str, Path]) -> None:
    src = tmp_path / "model_dir"
    (src / "extra").mkdir(parents=True)
    (src / "silero_vad.onnx").write_bytes(samples["silero_vad"].read_bytes())
    (src / "labels.txt").write_text("speech\n")
    (src / "extra" / "notes.md").write_text("hi\n")
    (src / "manifest.json").write_text(json.dumps({"labels": "labels.txt", "description": "from dir",
                                                   "postprocess": {"type": "threshold", "value": 0.5}}))
    out = build_bundle(src, tmp_path / "out", name="vad", version=4,
                       manifest_extra={"constraints": {"min_agent_version": "0.1"}})
    assert out.name == "vad-4.bundle"
    manifest = read_manifest(out)
    assert manifest.runtime == "onnx" and manifest.model == "model.onnx"
    assert manifest.files == ["extra/notes.md", "labels.txt"]
    assert manifest.labels == "labels.txt" and manifest.description == "from dir"
    assert manifest.constraints.min_agent_version == "0.1"
    staged = tmp_path / "staged"
    extract_bundle(out, staged)
    assert (staged / "model.onnx").read_bytes() == samples["silero_vad"].read_bytes()


def test_build_bundle_errors(tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(errors.ManifestError, match="runtime") as info:
        build_bundle(tmp_path / "m.bin", tmp_path, name="m", version=1)
    assert info.value.field == "runtime"
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.ManifestError, match=r"no \.onnx"):
        build_bundle(tmp_path / "empty", tmp_path, name="m", version=1)
    with pytest.raises(FileNotFoundError):
        build_bundle(tmp_path / "missing.onnx", tmp_path, name="m", version=1)


def _silero_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((1, 576)).astype(np.float32) * 0.1,
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def test_generate_test_vectors_with_real_model(tmp_path: Path, samples: dict[str, Path]) -> None:
    from agent.runtimes import backend_for_file

    calls: list[Path] = []

    def runner(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(path)
        return backend_for_file(path).load(path, []).run(feeds)

    model = samples["silero_vad"]
    vectors = generate_test_vectors(model, _silero_feeds(), runner, atol=1e-4)
    assert calls == [model]
    assert set(vectors[0]["expected"]) == {"output", "stateN"}
    out = build_bundle(model, tmp_path, name="vad", version=1, test_vectors=vectors)
    manifest = extract_bundle(out, tmp_path / "staged")
    vector = manifest.test_vectors[0]
    session = backend_for_file(tmp_path / "staged" / "model.onnx").load(tmp_path / "staged" / "model.onnx", [])
    got = session.run({k: tensor_array(v.model_dump()) for k, v in vector.inputs.items()})
    for name, value in vector.expected.items():
        np.testing.assert_allclose(got[name], tensor_array(value.model_dump()), rtol=vector.rtol, atol=vector.atol)


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_keys_build_publish(tmp_path: Path, samples: dict[str, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    assert bundles_cli.main(["keys", "init", "--repo", str(repo), "--keys", str(keys),
                             "--num-keys", "root=3", "--threshold", "root=2", "--expires", "timestamp=2"]) == 0
    root = json.loads((repo / "metadata" / "1.root.json").read_text())["signed"]
    assert root["roles"]["root"]["threshold"] == 2 and len(root["roles"]["root"]["keyids"]) == 3
    assert root["consistent_snapshot"] is True
    pems = list(keys.rglob("*.pem"))
    assert len(pems) == 6 and all(p.stat().st_mode & 0o777 == 0o600 for p in pems)
    assert {p.name for p in (repo / "metadata").iterdir()} >= {
        "1.root.json", "root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"}

    np.save(tmp_path / "input.npy", _silero_feeds()["input"])
    np.save(tmp_path / "state.npy", _silero_feeds()["state"])
    np.save(tmp_path / "sr.npy", _silero_feeds()["sr"])
    (tmp_path / "labels.txt").write_text("speech\n")
    argv = ["bundle", "build", str(samples["silero_vad"]), "--name", "vad", "--version", "2", "--out", str(tmp_path),
            "--labels", str(tmp_path / "labels.txt"), "--test-input", f"input={tmp_path / 'input.npy'}",
            "--test-input", f"state={tmp_path / 'state.npy'}", "--test-input", f"sr={tmp_path / 'sr.npy'}"]
    assert bundles_cli.main(argv) == 0
    bundle = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = read_manifest(bundle)
    assert [s.name for s in manifest.inputs] == ["input", "state", "sr"]
    assert len(manifest.inputs[0].shape) == 2 and manifest.inputs[0].dtype == "float32"
    assert manifest.labels == "labels.txt"
    assert len(manifest.test_vectors) == 1

    assert bundles_cli.main(["publish", str(bundle), "--repo", str(repo), "--keys", str(keys)]) == 0
    assert "published vad/vad-2.bundle" in capsys.readouterr().out
    assert Repository(repo, keys).targets().signed.targets["vad/vad-2.bundle"].custom == {
        "name": "vad", "version": 2, "runtime": "onnx"}
    assert bundles_cli.main(["keys", "rotate", "--repo", str(repo), "--keys", str(keys), "--role", "root",
                             "--role", "timestamp"]) == 0
    assert (repo / "metadata" / "2.root.json").exists()


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["publish", "nope.bundle", "--repo", "{t}/repo", "--keys", "{t}/keys"], 1, "no repository"),
    (["keys", "init", "--repo", "{t}/repo", "--keys", "{t}/k", "--threshold", "root=2"], 2, "threshold"),
    (["keys", "init", "--repo", "{t}/repo", "--keys", "{t}/k", "--threshold", "boss=2"], 2, "unknown role"),
    (["keys", "init", "--repo", "{t}/repo", "--keys", "{t}/repo/keys"], 1, "inside the published"),
    (["bundle", "build", "{t}/x.bin", "--name", "x", "--version", "1", "--out", "{t}"], 1, "runtime"),
    (["bundle", "build", "{t}/x.bin", "--name", "x"], 2, "--version"),
    (["serve", "--repo", "{t}/nothing"], 2, "no metadata"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
                    message: str) -> None:
    (tmp_path / "x.bin").write_bytes(b"x")
    assert bundles_cli.main([a.replace("{t}", str(tmp_path)) for a in argv]) == code
    err = capsys.readouterr().err
    assert message in err
    if code == 1:
        assert len(err.strip().splitlines()) == 1


def test_cli_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keys", "init"], ["keys", "rotate"], ["bundle", "build"], ["publish"], ["serve"]):
        assert bundles_cli.main([*argv, "--help"]) == 0
        assert "Exit codes" in capsys.readouterr().out
