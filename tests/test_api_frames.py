"""Predict on a camera frame through the model's manifest pre-processing (agent.api.frames), against a
real daemon: the answer equals the same pre-processing and model run here; binary, JSON and
shared memory agree; every bad request is a 400 naming its problem and changes nothing."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import cv2
import numpy as np
import orjson
import pytest
import tritonclient.utils.shared_memory as shm

from agent.client import AgentClient, ShmInput
from agent.pipelines.base import Frame
from agent.pipelines.preprocess import make_preprocessor
from agent.runtimes.litert import LiteRTBackend
from tests.conftest import Daemon, install, start_daemon

FACE_PRE = {"type": "image", "resize": "letterbox", "scale": 1 / 127.5, "offset": -1.0}
VAD_PRE = {"type": "audio", "sample_rate": 16000, "window": 512, "context": 64,
           "state": {"input": "state", "output": "stateN", "shape": [2, 1, 128]}, "constants": {"sr": 16000}}


def _manifest(models, samples, name: str, as_name: str, preprocess: dict | None) -> None:
    path = install(models, samples, name, as_name=as_name)
    runtime = "tflite" if path.suffix == ".tflite" else "onnx"
    manifest = {"model": path.name, "runtime": runtime}
    if preprocess is not None:
        manifest["preprocess"] = preprocess
    (path.parent / "manifest.json").write_bytes(orjson.dumps(manifest))


@pytest.fixture(scope="module")
def agent(tmp_path_factory, samples) -> Daemon:
    work = tmp_path_factory.mktemp("frames")
    models = work / "models"
    _manifest(models, samples, "face_detection", "face", FACE_PRE)
    _manifest(models, samples, "silero_vad", "vad", VAD_PRE)
    install(models, samples, "face_detection", as_name="face_plain")  # no manifest at all
    daemon = start_daemon(work, "--models-dir", str(models))
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def frame(samples) -> np.ndarray:
    """A 640x480 BGR camera frame with the astronaut's face in it."""
    photo = cv2.imread(str(samples["astronaut"]), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(cv2.resize(photo, (640, 480)))


def expected(samples, image: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """The same manifest pre-processing and model, run here."""
    session = LiteRTBackend().load(samples["face_detection"], [], threads=1)
    prepared = next(iter(make_preprocessor(FACE_PRE, session.inputs)(Frame(image, 0.0, 0, "test"))))
    return session.run(prepared.feeds), prepared.meta


def test_frame_answer_equals_preprocessing_and_model_run_here(agent, samples, frame):
    outputs, where = agent.client.infer_frame("face", frame)
    want, meta = expected(samples, frame)
    assert set(outputs) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-4, atol=1e-4)
    assert where == {"scale": list(meta["scale"]), "pad": list(meta["pad"]),
                     "input_size": [128, 128], "source_size": [640, 480]}
    assert where["pad"] == [0.0, 16.0]  # letterboxed: 640x480 -> 128x96, centred
    assert float(outputs["classificators"].max()) > 0  # the face is found (a logit above 0.5 probability)


def test_rgb_frame_answers_as_the_bgr_one(agent, frame):
    bgr, _ = agent.client.infer_frame("face", frame)
    rgb, _ = agent.client.infer_frame("face", np.ascontiguousarray(frame[:, :, ::-1]), color="rgb")
    for name in bgr:
        np.testing.assert_allclose(rgb[name], bgr[name], rtol=1e-5, atol=1e-5)
    swapped, _ = agent.client.infer_frame("face", np.ascontiguousarray(frame[:, :, ::-1]))  # told the wrong order
    assert any(not np.allclose(swapped[name], bgr[name], atol=1e-3) for name in bgr)


def test_frame_from_shared_memory_and_json_answer_the_same(agent, frame):
    binary, where = agent.client.infer_frame("face", frame[None])  # a leading batch of 1 is allowed
    key = f"/edge-agent-test-{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key.lstrip("/"), key, frame.nbytes)
    try:
        shm.set_shared_memory_region(handle, [frame])
        agent.client.register_shm("camera", key, frame.nbytes)
        shared, shared_where = agent.client.infer_frame("face", ShmInput("camera", frame.shape, "UINT8"))
        agent.client.unregister_shm("camera")
    finally:
        shm.destroy_shared_memory_region(handle)
    small = np.ascontiguousarray(frame[::8, ::8])  # 80x60: JSON stays small
    body = {"inputs": [{"name": "f", "shape": list(small.shape), "datatype": "UINT8",
                        "data": small.reshape(-1).tolist()}], "parameters": {"preprocess": True}}
    status, _, data = agent.client.request("POST", "/v2/models/face/infer", orjson.dumps(body),
                                           {"Content-Type": "application/json"})
    assert status == 200, data
    answer = orjson.loads(data)
    small_binary, _ = agent.client.infer_frame("face", small)
    json_outputs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in answer["outputs"]}
    assert answer["parameters"]["preprocess"]["source_size"] == [80, 60]
    for name in binary:
        np.testing.assert_array_equal(shared[name], binary[name])
        np.testing.assert_allclose(json_outputs[name], small_binary[name], rtol=1e-6, atol=1e-6)
    assert shared_where == where


def _raw(client: AgentClient, model: str, header: dict, blob: bytes = b"") -> tuple[int, dict]:
    head = orjson.dumps(header)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    status, _, data = client.request("POST", f"/v2/models/{model}/infer", head + blob, headers)
    return status, orjson.loads(data)


def _frame_header(shape: list[int], datatype: str = "UINT8", size: int | None = None, **params) -> dict:
    return {"inputs": [{"name": "frame", "shape": shape, "datatype": datatype,
                        "parameters": {"binary_data_size": size if size is not None else int(np.prod(shape))}}],
            "parameters": {"preprocess": True, **params}}


@pytest.mark.parametrize(("model", "header", "blob", "code", "words"), [
    ("face_plain", _frame_header([48, 64, 3]), bytes(48 * 64 * 3), "no_preprocessing", "not installed from a bundle"),
    ("vad", _frame_header([48, 64, 3]), bytes(48 * 64 * 3), "no_preprocessing", "declares 'audio'"),
    ("face", _frame_header([48, 64, 3], "FP32", 48 * 64 * 3 * 4), bytes(48 * 64 * 3 * 4), "bad_request",
     "must be a UINT8 frame"),
    ("face", _frame_header([48, 64, 5]), bytes(48 * 64 * 5), "bad_request", "must be a UINT8 frame"),
    ("face", _frame_header([2, 48, 64, 3]), bytes(2 * 48 * 64 * 3), "bad_request", "must be a UINT8 frame"),
    ("face", _frame_header([0, 64, 3]), b"", "bad_request", "outside 1..16384"),
    ("face", _frame_header([1, 20000, 1]), bytes(20000), "bad_request", "outside 1..16384"),
    ("face", _frame_header([48, 64, 3], frame_color="xyz"), bytes(48 * 64 * 3), "bad_request", "'bgr' or 'rgb'"),
    ("face", _frame_header([48, 64, 3], frame_color=3), bytes(48 * 64 * 3), "bad_request", "'bgr' or 'rgb'"),
    ("face", {**_frame_header([48, 64, 3]), "parameters": {"preprocess": "yes"}}, bytes(48 * 64 * 3), "bad_request",
     "preprocess must be true or false"),
    ("face", {**_frame_header([48, 64, 3]), "parameters": {"frame_color": "rgb"}}, bytes(48 * 64 * 3), "bad_request",
     "only with parameters.preprocess"),
    ("face", {"inputs": [*_frame_header([4, 4, 3])["inputs"], {**_frame_header([4, 4, 3])["inputs"][0],
                                                               "name": "other"}],
              "parameters": {"preprocess": True}}, bytes(96), "bad_request", "send one input"),
])
def test_bad_frame_requests_are_400_and_change_nothing(agent, frame, model, header, blob, code, words):
    before = {m["name"]: (m["requests"], m["errors"]) for m in agent.client.status()["models"]}
    status, body = _raw(agent.client, model, header, blob)
    assert status == 400, body
    assert body["code"] == code, body
    assert words in body["error"], body
    after = {m["name"]: (m["requests"], m["errors"]) for m in agent.client.status()["models"]}
    assert after == before  # refused before the model: nothing counted against it
    outputs, _ = agent.client.infer_frame("face", frame)  # and the model serves on
    assert "classificators" in outputs


def test_the_model_own_input_still_works_beside_frames(agent, samples, frame):
    from tests.test_api import face_input

    direct = agent.client.infer("face", {"input": face_input(samples["astronaut"])})
    framed, _ = agent.client.infer_frame("face", frame)
    assert direct["classificators"].shape == framed["classificators"].shape


# -- the model's side: ``prepare`` runs on the worker thread, its output is what is mirrored ------------

def _served_with_worker():
    from agent.models.served import ServedModel
    from agent.models.store import ModelVersion
    from agent.models.worker import Worker
    from tests.fakes import FakeSession

    session = FakeSession()
    entry = ModelVersion("m", 1, Path("/nonexistent/m/1"), Path("/nonexistent/m/1/model.onnx"), "onnx")
    return ServedModel("m", 1, "onnx", entry, session, Worker("m@1", session))


def test_prepare_runs_on_the_model_thread_and_the_shadow_gets_its_output():
    served = _served_with_worker()
    mirrored, threads = [], []
    served.mirror = lambda feeds, outputs, meta: mirrored.append(dict(feeds))

    def prepare(feeds):
        threads.append(threading.current_thread().name)
        return {"x": np.full((1, 4), feeds["frame"].mean(), np.float32)}

    try:
        out = asyncio.run(served.infer_then({"frame": np.ones((8, 8, 3), np.uint8)}, lambda o: o, prepare=prepare))
    finally:
        served.close()
    assert set(out) == {"y"}
    assert threads == ["infer-m@1"]
    assert list(mirrored[0]) == ["x"] and mirrored[0]["x"].shape == (1, 4)


def test_a_failing_prepare_is_the_request_fault_never_the_model():
    from agent.errors import InvalidInputError

    served = _served_with_worker()

    def prepare(_feeds):
        raise ValueError("cv2 says no")

    try:
        with pytest.raises(InvalidInputError, match="pre-processing failed: ValueError: cv2 says no"):
            asyncio.run(served.infer_then({"frame": np.ones((8, 8, 3), np.uint8)}, lambda o: o, prepare=prepare))
        assert served.stats.consecutive_failures == 0
    finally:
        served.close()
