"""The local predict API of a real daemon process on a real Unix socket, with real models.

Predictions through the socket must equal direct runtime calls on the same input.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from agent.client import AgentClient
from agent.errors import ClientError
from tests.conftest import Daemon, install, wait_for


def silero_feeds(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(576, dtype=np.float32) / 16000
    x = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal((batch, 576))).astype(np.float32)
    state = (0.1 * rng.standard_normal((2, batch, 128))).astype(np.float32)
    return {"input": x, "state": state, "sr": np.array(16000, np.int64)}


def face_input(photo: Path) -> np.ndarray:
    img = Image.open(photo).convert("RGB").resize((128, 128))
    return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


@pytest.fixture(scope="module")
def direct(samples):
    silero = ort.InferenceSession(str(samples["silero_vad"]), providers=["CPUExecutionProvider"])
    face = Interpreter(model_path=str(samples["face_detection"]))
    face.allocate_tensors()
    nabu = Interpreter(model_path=str(samples["okay_nabu"]))
    nabu.allocate_tensors()
    return {"silero_vad": silero, "face_detection": face, "okay_nabu": nabu}


def run_tflite(interp: Interpreter, value: np.ndarray) -> dict[str, np.ndarray]:
    interp.set_tensor(interp.get_input_details()[0]["index"], value)
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()}


@pytest.fixture(scope="module")
def agent(tmp_path_factory, samples) -> Daemon:
    from tests.conftest import start_daemon

    work = tmp_path_factory.mktemp("api")
    models = work / "models"
    for name in ("silero_vad", "face_detection", "okay_nabu"):
        install(models, samples, name)
    install(models, samples, "silero_vad", version=2)
    (models / "broken" / "1").mkdir(parents=True)
    (models / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    config = work / "agent.toml"
    config.write_text("[api]\nmax_body_bytes = 2000000\n[model.silero_vad]\nversions = \"all\"\n"
                      "inline_max_us = 100000\n"  # quick even on a loaded machine
                      "[model.silero_vad.batching]\nenabled = true\nmax_queue_delay_us = 2000\n")
    daemon = start_daemon(work, "--config", str(config), "--models-dir", str(models))
    yield daemon
    assert daemon.stop() == 0
    assert not daemon.socket.exists(), "socket must be removed at stop"


def curl(sock: Path, path: str, *args: str, data: str | None = None) -> tuple[int, str]:
    extra = ["--data-binary", "@-"] if data is not None else []
    out = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "-w", "\n%{http_code}", *args, *extra,
                          f"http://localhost{path}"], input=data, capture_output=True, text=True, timeout=30,
                         check=True)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


# -- predictions equal direct runtime calls -------------------------------------------------------
def test_v2_binary_equals_direct_onnx(agent, direct):
    feeds = silero_feeds(batch=3, seed=1)
    got = agent.client.infer("silero_vad", feeds)
    want = dict(zip(["output", "stateN"], direct["silero_vad"].run(None, feeds), strict=True))
    assert set(got) == {"output", "stateN"}
    np.testing.assert_allclose(got["output"], want["output"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["stateN"], want["stateN"], rtol=1e-5, atol=1e-6)


def test_client_reuses_request_heads_only_for_the_same_signature(agent, direct):
    """The client caches the HTTP head and JSON header per input signature: changing shapes
    between calls on one connection must still send the right lengths and get the right rows."""
    with AgentClient(agent.socket) as client:
        for batch, seed in ((1, 11), (3, 12), (1, 13), (2, 14), (3, 15)):
            feeds = silero_feeds(batch=batch, seed=seed)
            got = client.infer("silero_vad", feeds, version=1)
            want = direct["silero_vad"].run(None, feeds)
            assert got["output"].shape == (batch, 1)
            np.testing.assert_allclose(got["output"], want[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["stateN"], want[1], rtol=1e-5, atol=1e-6)
        with pytest.raises(ClientError, match="expected dtype float32"):
            client.infer("silero_vad", {**silero_feeds(), "input": silero_feeds()["input"].astype(np.float64)})
        assert client.infer("silero_vad", silero_feeds(seed=16), outputs=["output"]).keys() == {"output"}


def test_v2_json_equals_direct_tflite(agent, direct, samples):
    x = face_input(samples["astronaut"])
    got = agent.client.infer("face_detection", {"input": x}, binary=False)
    want = run_tflite(direct["face_detection"], x)
    np.testing.assert_allclose(got["classificators"], want["classificators"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["regressors"], want["regressors"], rtol=1e-5, atol=1e-4)
    # the astronaut photo has a face: at least one anchor is confident
    assert got["classificators"].max() > 0.0  # sigmoid(score) > 0.5: a confident anchor


def test_v1_columnar_and_rows_equal_direct(agent, direct, samples):
    x = face_input(samples["coffee"])
    want = run_tflite(direct["face_detection"], x)
    cols = agent.client.predict("face_detection", x.tolist())
    np.testing.assert_allclose(np.asarray(cols["classificators"]), want["classificators"], rtol=1e-5, atol=1e-5)
    rows = agent.client.predict("face_detection", x.tolist(), rows=True)
    assert len(rows) == 1
    np.testing.assert_allclose(np.asarray(rows[0]["regressors"]), want["regressors"][0], rtol=1e-5, atol=1e-4)


def test_v1_columnar_multi_input(agent, direct):
    feeds = silero_feeds(batch=2, seed=2)
    out = agent.client.predict("silero_vad", {k: v.tolist() for k, v in feeds.items()})
    want = direct["silero_vad"].run(None, feeds)
    np.testing.assert_allclose(np.asarray(out["output"], np.float32), want[0], rtol=1e-5, atol=1e-6)


def test_quantized_model_float_and_raw(agent, direct):
    interp = direct["okay_nabu"]
    (d_in,), (d_out,) = interp.get_input_details(), interp.get_output_details()
    scale, zp = d_in["quantization"]
    features = np.linspace(0, 20, 120, dtype=np.float32).reshape(1, 3, 40)
    q = np.clip(np.round(features / scale) + zp, -128, 127).astype(np.int8)
    raw_want = run_tflite(interp, q)[d_out["name"]]
    o_scale, o_zp = d_out["quantization"]
    name_in, name_out = d_in["name"], d_out["name"]
    got = agent.client.infer("okay_nabu", {name_in: features})
    assert got[name_out].dtype == np.float32
    np.testing.assert_allclose(got[name_out], (raw_want.astype(np.float32) - o_zp) * o_scale, rtol=1e-6)
    raw = agent.client.infer("okay_nabu", {name_in: q}, raw_output=True)
    assert raw[name_out].dtype == np.uint8
    np.testing.assert_array_equal(raw[name_out], raw_want)


def test_tritonclient_over_tcp(daemon_factory, models_dir):
    import socket as socketlib

    import tritonclient.http as httpclient

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = daemon_factory("--models-dir", str(models_dir), "--tcp", f"127.0.0.1:{port}")
    # TCP is bound just after the Unix socket that the start-up wait polls.
    def listening() -> bool:
        with socketlib.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 30, "the TCP listener")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("silero_vad")
    meta = client.get_model_metadata("silero_vad")
    assert [i["name"] for i in meta["inputs"]] == ["input", "state", "sr"]
    feeds = silero_feeds(batch=2, seed=5)
    inputs = []
    for name, value in feeds.items():
        item = httpclient.InferInput(name, list(value.shape), {"float32": "FP32", "int64": "INT64"}[value.dtype.name])
        item.set_data_from_numpy(value, binary_data=True)
        inputs.append(item)
    result = client.infer("silero_vad", inputs, outputs=[httpclient.InferRequestedOutput("output", binary_data=True)])
    want = ort.InferenceSession(str(daemon_factory and models_dir / "silero_vad/1/model.onnx"),
                                providers=["CPUExecutionProvider"]).run(["output"], feeds)[0]
    np.testing.assert_allclose(result.as_numpy("output"), want, rtol=1e-5, atol=1e-6)
    stats = client.get_inference_statistics("silero_vad")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("silero_vad", "1")]
    assert stats[0]["inference_stats"]["success"]["count"] == 1 and stats[0]["execution_count"] == 1
    client.close()
    assert daemon.stop() == 0


# -- versions, metadata, status --------------------------------------------------------------
def test_versions_and_default(agent):
    meta = agent.client.model_metadata("silero_vad")
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert agent.client.model_metadata("silero_vad", 1)["name"] == "silero_vad"
    code, body = curl(agent.socket, "/v1/models/silero_vad")
    states = json.loads(body)["model_version_status"]
    assert code == 200 and [s["version"] for s in states] == ["2", "1"]
    assert all(s["state"] == "AVAILABLE" for s in states)
    status = agent.client.status()
    defaults = {(m["name"], m["version"]): m.get("default") for m in status["models"]}
    assert defaults[("silero_vad", 2)] is True and defaults[("silero_vad", 1)] is False


def test_v1_metadata_and_v2_ready(agent):
    code, body = curl(agent.socket, "/v1/models/okay_nabu/metadata")
    sig = json.loads(body)["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert code == 200 and next(iter(sig["inputs"].values()))["dtype"] == "DT_INT8"
    assert curl(agent.socket, "/v2/health/live")[0] == 200
    assert curl(agent.socket, "/v2/health/ready")[0] == 200
    code, body = curl(agent.socket, "/v2/models/face_detection/versions/1/ready")
    assert code == 200 and json.loads(body)["ready"] is True


def test_broken_model_reported_others_serve(agent):
    status = agent.client.status()
    broken = next(m for m in status["models"] if m["name"] == "broken")
    assert broken["state"] == "FAILED"
    assert "broken/1/model.onnx" in broken["path"] and broken["error"]
    assert "model.load_failed" in agent.log_text()
    code, body = curl(agent.socket, "/v1/models/broken")
    assert code == 200 and json.loads(body)["model_version_status"][0]["state"] == "END"
    code, body = curl(agent.socket, "/v2/models/broken/ready")
    assert code == 503 and "failed to load" in json.loads(body)["error"]
    assert agent.client.infer("face_detection", {"input": np.zeros((1, 128, 128, 3), np.float32)})


def test_metrics_and_status(agent):
    agent.client.infer("face_detection", {"input": np.zeros((1, 128, 128, 3), np.float32)})
    text = agent.client.metrics()
    assert 'edge_agent_requests_total{code="200",model="face_detection",protocol="v2",version="1"}' in text
    assert "edge_agent_request_latency_seconds_bucket" in text
    assert "edge_agent_process_rss_bytes" in text and "edge_agent_system_memory_percent" in text
    status = agent.client.status()
    assert status["profile"]["name"] == "x86-cpu"
    assert 0 < status["system"]["memory"]["percent"] < 100 and status["system"]["process"]["rss_bytes"] > 10**6
    face = next(m for m in status["models"] if m["name"] == "face_detection")
    assert face["delegate"] == "xnnpack" and face["runtime"] == "tflite" and face["requests"] >= 1


def test_quick_cpu_models_run_inline_batched_ones_too(agent):
    wake = {"serving_default_input_audio:0": np.zeros((1, 3, 40), np.float32)}
    for _ in range(3):  # timed on the worker thread first, then inline
        agent.client.infer("okay_nabu", wake)
        agent.client.infer("silero_vad", silero_feeds())
    models = {(m["name"], m["version"]): m for m in agent.client.status()["models"]}
    assert models[("okay_nabu", 1)]["inline"] is True
    # A quick batching model runs inline only a request that arrives alone (docs/configuration.md).
    assert models[("silero_vad", 2)]["batching"] is True and models[("silero_vad", 2)]["inline"] is True


def test_curl_predict(agent):
    body = json.dumps({"instances": [np.zeros((128, 128, 3)).tolist()]})
    code, out = curl(agent.socket, "/v1/models/face_detection:predict", data=body)
    assert code == 200
    assert np.asarray(json.loads(out)["predictions"][0]["classificators"]).shape == (896, 1)


def test_socket_mode(agent):
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o660


def test_dynamic_batching_coalesces_concurrent_clients(agent, direct):
    results: dict[int, dict[str, np.ndarray]] = {}

    def call(i: int) -> None:
        with AgentClient(agent.socket) as c:
            for j in range(5):
                results[i * 10 + j] = c.infer("silero_vad", silero_feeds(seed=i * 10 + j))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 40
    for key, got in results.items():
        want = direct["silero_vad"].run(None, silero_feeds(seed=key))
        np.testing.assert_allclose(got["output"], want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["stateN"], want[1], rtol=1e-4, atol=1e-5)
    text = agent.client.metrics()
    batched = [line for line in text.splitlines() if line.startswith("edge_agent_batch_size_bucket")
               and 'model="silero_vad"' in line and 'le="1.0"' in line]
    count = [line for line in text.splitlines() if line.startswith("edge_agent_batch_size_count")
             and 'model="silero_vad",version="2"' in line]
    assert batched and count
    rows_at_1 = float(next(b for b in batched if 'version="2"' in b).rsplit(" ", 1)[1])
    calls = float(count[0].rsplit(" ", 1)[1])
    assert rows_at_1 < calls, "some runtime calls must have carried more than one request"
    (stats,) = agent.client.stats("silero_vad", 2)
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 1
    assert stats["execution_count"] < stats["inference_count"]  # fewer runtime calls than rows


def phases(agent, name: str) -> dict[str, dict[str, int]]:
    (entry,) = agent.client.stats(name)
    return dict(entry["inference_stats"])


def test_statistics_split_each_request_into_phases(agent):
    wake = {"serving_default_input_audio:0": np.zeros((1, 3, 40), np.float32)}
    before = phases(agent, "okay_nabu")
    for _ in range(10):
        agent.client.infer("okay_nabu", wake)
    with pytest.raises(ClientError):
        agent.client.infer("okay_nabu", {"serving_default_input_audio:0": np.zeros((1, 4, 40), np.float32)})
    after = phases(agent, "okay_nabu")

    delta = {k: (after[k]["count"] - before[k]["count"], after[k]["ns"] - before[k]["ns"]) for k in after}
    assert {k: c for k, (c, _) in delta.items()} == {"success": 10, "fail": 1, "queue": 10, "compute_input": 10,
                                                     "compute_infer": 10, "compute_output": 10}
    total = delta["success"][1]
    assert delta["compute_infer"][1] > 0 and delta["compute_input"][1] > 0 and delta["compute_output"][1] > 0
    # The phases tile each request: before the call, queued, the call, after it.
    parts = sum(delta[k][1] for k in ("compute_input", "queue", "compute_infer", "compute_output"))
    assert parts == total
    assert total < 10 * 1_000_000_000  # nanoseconds: ten small calls take far less than 1 s each


def test_statistics_endpoints(agent):
    every = agent.client.stats()
    names = {(s["name"], s["version"]) for s in every}
    assert {("silero_vad", "1"), ("silero_vad", "2"), ("face_detection", "1"), ("okay_nabu", "1")} <= names
    assert [s["version"] for s in agent.client.stats("silero_vad")] == ["1", "2"]
    assert [s["version"] for s in agent.client.stats("silero_vad", 1)] == ["1"]
    with pytest.raises(ClientError, match="404"):
        agent.client.stats("nope")
    with pytest.raises(ClientError, match="404"):
        agent.client.stats("silero_vad", 9)
    server = json.loads(agent.client.request("GET", "/v2")[2])
    assert "statistics" in server["extensions"]


# -- bad input: clear 4xx, nothing else affected ----------------------------------------------
def binary_request(size: int, payload: bytes, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    length = len(header) if header_length is None else header_length
    return header + payload, {"Inference-Header-Content-Length": str(length)}


BAD_REQUESTS = [
    ("GET", "/v1/models/nope", None, {}, 404, "model 'nope' not found"),
    ("GET", "/v2/models/nope", None, {}, 404, "model 'nope' not found"),
    ("GET", "/v2/models/silero_vad/versions/9", None, {}, 404, "version 9 not found"),
    ("POST", "/v1/models/nope:predict", b"{}", {}, 404, "not found"),
    ("POST", "/v1/models/face_detection:predict", b"{not json", {}, 400, "malformed JSON"),
    ("POST", "/v1/models/face_detection:predict", b"[1, 2]", {}, 400, "JSON object"),
    ("POST", "/v1/models/face_detection:predict", b'{"foo": 1}', {}, 400, "exactly one of 'instances' or 'inputs'"),
    ("POST", "/v1/models/face_detection:predict", b'{"inputs": [[1, 2], [3]]}', {}, 400, "input 'input'"),
    ("POST", "/v1/models/face_detection:predict", b'{"inputs": {"image": [1]}}', {}, 400, "unknown input 'image'"),
    ("POST", "/v1/models/face_detection:predict", b'{"instances": [[1, 2, 3]]}', {}, 400, "dimensions"),
    ("POST", "/v2/models/face_detection/infer", b'{"inputs": [{"name": "input", "shape": [1, 64, 64, 3], '
     b'"datatype": "FP32", "data": []}]}', {}, 400, "needs 12288"),
    ("POST", "/v2/models/face_detection/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 64, 64, 3],
     "datatype": "FP32", "data": [0.0] * 12288}]}).encode(), {}, 400, "dimension 1 must be 128"),
    ("POST", "/v2/models/silero_vad/infer", json.dumps({"inputs": [
        {"name": "input", "shape": [1, 576], "datatype": "FP64", "data": [0.0] * 576},
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0.0] * 256},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": 16000}]}).encode(), {}, 400,
     "input 'input': expected dtype float32, got float64"),
    ("POST", "/v2/models/silero_vad/infer", json.dumps({"inputs": [
        {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": [0.0] * 576}]}).encode(), {}, 400,
     "missing input 'state'"),
    ("POST", "/v2/models/face_detection/infer", b'{"inputs": [{"name": "input", "shape": [1], "datatype": "STR", '
     b'"data": [1]}]}', {}, 400, "unsupported datatype 'STR'"),
    ("POST", "/v2/models/face_detection/infer", b'{"inputs": []}', {}, 400, "non-empty list"),
    ("POST", "/v2/models/face_detection/infer", *binary_request(196608, b"", header_length=500), 400,
     "Inference-Header-Content-Length is 500"),
    ("POST", "/v2/models/face_detection/infer", *binary_request(196608, b"\0" * 100), 400, "truncated"),
    ("POST", "/v2/models/face_detection/infer", *binary_request(12, b"\0" * 12), 400,
     "binary_data_size 12 does not match"),
    ("POST", "/v2/models/face_detection/infer", *binary_request(196608, b"\0" * 196612), 400,
     "4 bytes not claimed"),
    ("POST", "/v2/models/face_detection/infer", b"{}", {"Inference-Header-Content-Length": "abc"}, 400,
     "must be an integer"),
    ("POST", "/v2/models/face_detection/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 128, 128, 3],
     "datatype": "FP32", "data": [0.0] * 49152}], "outputs": [{"name": "boxes"}]}).encode(), {}, 400,
     "unknown output 'boxes'"),
    ("POST", "/v1/models/face_detection/versions/abc:predict", b"{}", {}, 400, "positive integer"),
    ("GET", "/v3/whatever", None, {}, 404, "no such endpoint"),
    # Wrong types anywhere: 400 naming the field, never 500 (issue 12, item 2).
    *[("POST", "/v2/models/face_detection/infer", json.dumps(body).encode(), {}, 400, message) for body, message in [
        ({"inputs": [{"name": "input", "shape": [0, 3, 4611686018427387904, 1], "datatype": "FP32", "data": []}]},
         "'shape' must be a list"),
        ({"inputs": [{"name": "input", "shape": [0, 2**31 - 1, 2**31 - 1, 2**31 - 1], "datatype": "FP32",
                      "data": []}]}, "beyond any tensor's size"),
        ({"inputs": [{"name": "input", "shape": [True, 128, 128, 3], "datatype": "FP32", "data": [0.0]}]},
         "'shape' must be a list"),
        ({"inputs": [{"name": "input", "shape": [1] * 40, "datatype": "FP32", "data": [0.0]}]}, "at most 32"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0],
                      "parameters": 5}]}, "'parameters' must be an object"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0],
                      "parameters": "binary_data_size"}]}, "'parameters' must be an object"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "outputs": [{"name": "classificators", "parameters": [1]}]}, "'parameters' must be an object"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "outputs": [{"name": "classificators", "parameters": {"binary_data": "yes"}}]}, "binary_data must be"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "outputs": {"name": "classificators"}}, "'outputs' must be a list"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "outputs": 5}, "'outputs' must be a list"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "parameters": [1]}, "'parameters' must be an object"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "parameters": {"binary_data_output": 1}}, "binary_data_output must be true or false"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "parameters": {"raw_output": "no"}}, "raw_output must be true or false"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [0.0] * 49152}],
          "id": 7}, "'id' must be a string"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": ["FP32"], "data": [0.0]}]},
         "unsupported datatype"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32",
                      "data": ["0.5"] * 49152}]}, "float32 takes numbers, got strings"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32",
                      "data": [None] * 49152}]}, "float32 takes numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32",
                      "data": [{"b64": "AAAA"}]}]}, "float32 takes numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32",
                      "data": [[0.0, 1.0], [2.0]]}]}, "cannot convert"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32", "data": [True] * 49152}]},
         "float32 takes numbers, got booleans"),
        ({"inputs": [{"name": "input", "shape": [1, 128, 128, 3], "datatype": "FP32",
                      "parameters": {"binary_data_size": True}}]}, "binary_data_size True does not match"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "INT8", "data": [300]}]}, "outside the range"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "INT8", "data": [1.5]}]},
         "int8 takes integers, got floats"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "UINT64", "data": [-1, 2**64 - 1]}]},
         "uint64 takes integers"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "BOOL", "data": [1]}]}, "takes true/false"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": eval("[" * 40 + "1" + "]" * 40)}]},
         "more than 32 dimensions"),
        ({"inputs": [{"name": "x" * 5000, "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "unknown input"),
    ]],
    ("POST", "/v2/models/silero_vad/infer", json.dumps({"inputs": [
        {"name": "input", "shape": [0, 576], "datatype": "FP32", "data": []},
        {"name": "state", "shape": [2, 0, 128], "datatype": "FP32", "data": []},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": 16000}]}).encode(), {}, 400,
     "dimension 0 must not be 0"),  # ONNX Runtime aborts the whole process on this one
    ("POST", "/v2/models/silero_vad/infer", json.dumps({"inputs": [
        {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": [0.0] * 576},
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0.0] * 256},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": 16000.0}]}).encode(), {}, 400,
     "int64 takes integers, got floats"),
    ("POST", "/v2/models/face_detection/infer", b"{}", {"Inference-Header-Content-Length": "\u00b2\u00b3"}, 400,
     "must be an integer"),
    ("POST", "/v2/models/face_detection/infer", b"{}", {"Inference-Header-Content-Length": "9" * 5000}, 400,
     "must be an integer"),
    ("POST", "/v1/models/face_detection:predict", b'{"inputs": [1], "raw_output": "yes"}', {}, 400,
     "'raw_output' must be true or false"),
    ("POST", "/v1/models/face_detection:predict", b'{"inputs": [1], "signature_name": "other"}', {}, 400,
     "unknown signature_name"),
    ("POST", "/v1/models/face_detection:predict", b'{"inputs": [1], "signature_name": 5}', {}, 400,
     "unknown signature_name"),
    ("POST", "/v1/models/face_detection:predict", b'{"instances": [{"input": "x"}]}', {}, 400,
     "float32 takes numbers, got strings"),
    ("POST", "/v1/models/face_detection:predict", b'{"instances": [1, {"input": 1}]}', {}, 400, "input 'input'"),
    ("POST", "/v1/models/face_detection:predict", b'{"instances": {"input": [1]}}', {}, 400, "non-empty list"),
    ("GET", "/v2/models/silero_vad/versions/" + "9" * 5000, None, {}, 400, "positive integer"),
    ("GET", "/v2/models/silero_vad/versions/%C2%B2", None, {}, 400, "positive integer"),
    ("POST", "/v1/agent/models/silero_vad:deploy", b"[1]", {}, 400, "JSON object"),
    ("POST", "/v1/agent/models/silero_vad:deploy", b'{"version": true}', {}, 400, "positive integer or null"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "message"), BAD_REQUESTS,
                         ids=[f"{i}-{r[5][:30]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_requests(agent, method, path, body, headers, status, message):
    with AgentClient(agent.socket) as client:
        code, _, data = client.request(method, path, body, headers)
    assert code == status, data
    assert message in json.loads(data)["error"]
    # the agent keeps serving everyone else
    assert agent.client.infer("okay_nabu", {"serving_default_input_audio:0": np.zeros((1, 3, 40), np.float32)})


def test_body_over_limit_is_413(agent):
    big = b'{"inputs": [' + b"0," * 1_100_000 + b"0]}"
    with AgentClient(agent.socket) as client:
        code, _, data = client.request("POST", "/v1/models/face_detection:predict", big)
    assert code == 413 and "exceeds the limit" in json.loads(data)["error"]


def test_client_reports_unreachable_agent(tmp_path):
    with pytest.raises(ClientError, match="cannot reach the agent"):
        AgentClient(tmp_path / "none.sock").status()


# -- lifecycle -------------------------------------------------------------------------------------
def test_stale_socket_removed_and_live_socket_refused(daemon_factory, models_dir, tmp_path):
    import socket as socketlib

    work = tmp_path / "stale"
    work.mkdir()
    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(str(work / "agent.sock"))
    stale.close()  # leaves a socket file nobody listens on
    first = daemon_factory("--models-dir", str(models_dir), workdir=work)
    assert first.client.status()["models"]
    second = daemon_factory("--models-dir", str(models_dir), workdir=work, wait=False)
    assert second.proc.wait(30) == 1
    assert "already listening" in second.log_text()
    assert first.client.status()["models"], "the first agent's socket must survive"
    assert first.stop(signal.SIGINT) == 0
    assert not (work / "agent.sock").exists()


def test_graceful_stop_finishes_in_flight(daemon_factory, models_dir):
    daemon = daemon_factory("--models-dir", str(models_dir))
    errors: list[Exception] = []
    done: list[int] = []

    def hammer() -> None:
        with AgentClient(daemon.socket) as c:
            for _ in range(200):
                try:
                    c.infer("face_detection", {"input": np.zeros((1, 128, 128, 3), np.float32)})
                    done.append(1)
                except ClientError as exc:
                    if "cannot reach" not in str(exc):
                        errors.append(exc)
                    return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    while len(done) < 20:
        threading.Event().wait(0.01)
    assert daemon.stop() == 0
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert "agent.stopped" in daemon.log_text()


# -- binary header plans (unit level, real Silero specs) ------------------------------------------
def binary_body(feeds: dict[str, np.ndarray], request_id: str | None = None) -> tuple[bytes, str]:
    names = {"float32": "FP32", "int64": "INT64"}
    header: dict[str, object] = {"inputs": [
        {"name": n, "shape": list(a.shape), "datatype": names[a.dtype.name],
         "parameters": {"binary_data_size": a.nbytes}} for n, a in feeds.items()],
        "parameters": {"binary_data_output": True}}
    if request_id is not None:
        header["id"] = request_id
    head = json.dumps(header).encode()
    return head + b"".join(a.tobytes() for a in feeds.values()), str(len(head))


def test_binary_header_plans_are_reused_only_when_they_fit(samples):
    from types import SimpleNamespace

    from agent.api import oip
    from agent.errors import RequestError
    from agent.runtimes.onnx import OnnxBackend

    session = OnnxBackend().load(samples["silero_vad"], [])
    model = SimpleNamespace(name="vad", version=1, outputs=session.outputs)
    plans: oip.Plans = {}
    first, second = silero_feeds(seed=1), silero_feeds(seed=2)
    body, hlen = binary_body(first)
    got = oip.parse_infer(body, hlen, model, plans)
    assert len(plans) == 1
    body2, hlen2 = binary_body(second)
    assert hlen2 == hlen
    again = oip.parse_infer(body2, hlen2, model, plans)  # same header bytes: sliced by the plan
    for name, value in second.items():
        np.testing.assert_array_equal(again.feeds[name], value)
        assert again.feeds[name].shape == value.shape and again.feeds[name].dtype == value.dtype
    assert again.binary_default is True and got.feeds["input"][0, 0] != again.feeds["input"][0, 0]

    with pytest.raises(RequestError, match="truncated"):  # a short body never takes the plan's word for it
        oip.parse_infer(body2[:-4], hlen2, model, plans)
    other = SimpleNamespace(name="vad", version=1, outputs=OnnxBackend().load(samples["silero_vad"], []).outputs)
    assert oip.parse_infer(body2, hlen2, other, plans).feeds["input"].shape == (1, 576)  # a reloaded version re-parses
    (plan,) = plans.values()
    assert plan.specs is other.outputs
    with_id, id_len = binary_body(first, request_id="r-1")
    assert oip.parse_infer(with_id, id_len, model, plans).request_id == "r-1"
    assert len(plans) == 1, "requests with an id are not remembered: ids differ per request"


# -- the HTTP layer: answered at once or finished by a task, always in order ----------------------
async def test_handlers_that_wait_or_not_answer_pipelined_requests_in_order(tmp_path):
    import asyncio
    import socket as socketlib

    from agent.api.http import HTTPServer, Request, Response, Router

    loop = asyncio.get_running_loop()
    later: asyncio.Future[bytes] = loop.create_future()

    async def at_once(request: Request) -> Response:
        return Response(200, b"at-once")

    async def bare_yield(request: Request) -> Response:
        await asyncio.sleep(0)
        return Response(200, b"after-yield")

    async def waits(request: Request) -> Response:
        return Response(200, await later)

    async def fails_later(request: Request) -> Response:
        failing: asyncio.Future[bytes] = loop.create_future()
        loop.call_later(0.01, failing.set_exception, ValueError("boom"))
        try:
            return Response(200, await failing)
        except ValueError as exc:
            return Response(500, str(exc).encode())

    async def not_found(request: Request) -> Response:
        return Response(404, b"none")

    router = Router(not_found)
    for path, handler in (("/now", at_once), ("/yield", bare_yield), ("/wait", waits), ("/fail", fails_later)):
        router.add("GET", path, handler)
    server = HTTPServer(router)
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(str(tmp_path / "http.sock"))
    await server.listen_unix(sock)
    loop.call_later(0.05, later.set_result, b"waited")

    def pipelined() -> list[bytes]:
        with socketlib.socket(socketlib.AF_UNIX) as c:
            c.connect(str(tmp_path / "http.sock"))
            c.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                               for p in ("/wait", "/now", "/fail", "/yield", "/now")))
            data = b""
            while data.count(b"HTTP/1.1 ") < 5 or not data.endswith(b"at-once"):
                data += c.recv(65536)
            return [part.rsplit(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 ")[1:]]

    bodies = await asyncio.wait_for(asyncio.to_thread(pipelined), 10)
    assert bodies == [b"waited", b"at-once", b"boom", b"after-yield", b"at-once"]
    await server.stop(5)


async def test_cancelling_a_waiting_handler_reaches_the_handler(tmp_path):
    """At shutdown the loop cancels what is left: a handler resumed by the HTTP layer must see
    the cancellation (and run its clean-up), as it would in a task of its own."""
    import asyncio
    import socket as socketlib

    from agent.api.http import HTTPServer, Request, Response, Router

    loop = asyncio.get_running_loop()
    seen: list[str] = []
    never: asyncio.Future[bytes] = loop.create_future()

    async def waits_forever(request: Request) -> Response:
        await asyncio.sleep(0)  # a bare yield first: the layer takes over with a task
        try:
            return Response(200, await never)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    router = Router(waits_forever)
    server = HTTPServer(router)
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(str(tmp_path / "http.sock"))
    await server.listen_unix(sock)
    client = socketlib.socket(socketlib.AF_UNIX)
    await loop.sock_connect(client, str(tmp_path / "http.sock"))
    await loop.sock_sendall(client, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(200):
        tasks = [c.task for c in server.connections if c.task is not None]
        if tasks:
            break
        await asyncio.sleep(0.01)
    (task,) = tasks
    await asyncio.sleep(0.01)  # past the bare yield: now waiting on ``never``
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and never.cancelled()
    client.close()
    await server.stop(1)


async def test_a_handler_that_times_out_before_its_first_wait_runs_in_a_task(tmp_path):
    """``asyncio.wait_for``/``asyncio.timeout`` need a current task (3.12+): the live results feed
    waits like this, and used to be cut off after its first line on Python 3.12 and 3.13."""
    import asyncio
    import socket as socketlib

    from agent.api.http import HTTPServer, Request, Response, Router

    async def with_timeout(request: Request) -> Response:
        assert asyncio.current_task() is not None
        value = await asyncio.wait_for(asyncio.sleep(0, result=b"in time"), 5)
        return Response(200, value)

    server = HTTPServer(Router(with_timeout))
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(str(tmp_path / "http.sock"))
    await server.listen_unix(sock)

    def get() -> bytes:
        with socketlib.socket(socketlib.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(tmp_path / "http.sock"))
            client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            return data

    answer = await asyncio.wait_for(asyncio.to_thread(get), 10)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"in time"), answer
    await server.stop(1)


async def test_answers_written_by_another_thread_stay_whole_and_in_order(tmp_path):
    """A handler's answer written by the thread that computed it (``DirectAnswer``, as the model
    workers do for predicts, POST): pipelined requests behind it are answered after it, in order;
    an answer larger than the socket takes at once is finished by the event loop; a HEAD or a GET
    never goes that way."""
    import asyncio
    import socket as socketlib

    from agent.api.http import HTTPServer, Request, Response, Router

    big = bytes(range(256)) * (8 * 1024 * 1024 // 256)  # far more than a Unix socket buffers
    used: list[bool] = []

    def compute(request: Request, body: bytes) -> Response:
        response = Response(200, body)
        if request.direct is not None:
            request.direct.send(response)
        used.append(request.direct is not None and request.direct.data is not None)
        return response

    async def threaded(request: Request) -> Response:
        return await asyncio.to_thread(compute, request, big if request.path == "/big" else b"from-thread")

    async def at_once(request: Request) -> Response:
        return Response(200, b"at-once")

    router = Router(at_once)
    router.add("POST", "/thread", threaded)
    router.add("POST", "/big", threaded)
    router.add("GET", "/thread", threaded)
    server = HTTPServer(router)
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(str(tmp_path / "http.sock"))
    await server.listen_unix(sock)

    def exchange(requests: list[bytes], answers: int) -> bytes:
        with socketlib.socket(socketlib.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(str(tmp_path / "http.sock"))
            c.sendall(b"".join(requests))
            data = b""
            while data.count(b"HTTP/1.1 200") < answers or not data.endswith((b"at-once", b"from-thread", big[-64:])):
                data += c.recv(1 << 20)
            return data

    def get(path: str, method: str = "GET") -> bytes:
        return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()

    def post(path: str) -> bytes:
        return get(path, "POST")

    data = await asyncio.wait_for(asyncio.to_thread(
        exchange, [post("/thread"), get("/other"), post("/thread"), get("/other")], 4), 10)
    bodies = [part.rsplit(b"\r\n\r\n", 1)[1] for part in data.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"from-thread", b"at-once", b"from-thread", b"at-once"]
    assert used[0], "the first answer is written by its thread"

    data = await asyncio.wait_for(asyncio.to_thread(exchange, [post("/big"), get("/other")], 2), 20)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(big)}".encode() in head
    assert rest[: len(big)] == big and rest[len(big):].endswith(b"at-once")

    used.clear()
    data = await asyncio.wait_for(asyncio.to_thread(exchange, [get("/thread", "HEAD"), get("/other")], 2), 10)
    assert data.count(b"HTTP/1.1 200") == 2 and b"from-thread" not in data
    assert used == [False], "a HEAD is answered by the event loop, without the body"
    used.clear()
    data = await asyncio.wait_for(asyncio.to_thread(exchange, [get("/thread")], 1), 10)
    assert data.endswith(b"from-thread") and used == [False], "only predicts (POST) are answered by threads"
    await server.stop(1)


def test_client_keeps_its_connection_between_requests(agent):
    """httptools resets its parser once a message is complete: asked afterwards, every answer
    looked like "Connection: close" and the client reconnected for each request."""
    with AgentClient(agent.socket) as client:
        client.request("GET", "/v2/health/live")
        first = client._sock
        for _ in range(3):
            client.infer("silero_vad", silero_feeds(), version=1)
            client.request("GET", "/v2/health/live")
        assert first is not None and client._sock is first
