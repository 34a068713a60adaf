"""Triton's system shared-memory extension against a real daemon, with regions made by
``tritonclient.utils.shared_memory`` (real POSIX shared-memory objects in /dev/shm)."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm

from agent.api.shm import SharedMemory, SharedMemoryError
from agent.client import AgentClient, ShmInput, ShmOutput
from agent.errors import ClientError
from tests.conftest import Daemon, install, start_daemon, wait_for
from tests.test_api import face_input, silero_feeds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def agent(tmp_path_factory, samples) -> Daemon:
    work = tmp_path_factory.mktemp("shm")
    models = work / "models"
    for name in ("silero_vad", "face_detection"):
        install(models, samples, name)
    port = _free_port()
    daemon = start_daemon(work, "--models-dir", str(models), "--tcp", f"127.0.0.1:{port}")
    daemon.port = port  # type: ignore[attr-defined]
    yield daemon
    daemon.client.register_shm("at-stop", *_region_for_stop())
    assert daemon.stop() == 0
    assert any("shm.unregistered" in line and "at-stop" in line for line in daemon.log_text().splitlines())


_made: list[shm.SharedMemoryRegion] = []


def _region_for_stop() -> tuple[str, int]:
    key = _key()
    _made.append(shm.create_shared_memory_region("at-stop", key, 4096))
    return key, 4096


@pytest.fixture(scope="module", autouse=True)
def _destroy_regions():
    yield
    for handle in _made:
        shm.destroy_shared_memory_region(handle)


def _key() -> str:
    return f"/edge-agent-test-{uuid.uuid4().hex[:12]}"


def region(size: int) -> tuple[shm.SharedMemoryRegion, str]:
    """A new shared-memory object of ``size`` bytes (destroyed at the module's end), and its key."""
    key = _key()
    handle = shm.create_shared_memory_region(key.lstrip("/"), key, size)
    _made.append(handle)
    return handle, key


def error_of(call, *args, **kwargs) -> str:
    """The message of the 400 that ``call(*args, **kwargs)`` raises."""
    with pytest.raises(ClientError) as info:
        call(*args, **kwargs)
    assert info.value.status == 400, info.value
    return str(info.value)


# -- round trips equal the normal path ----------------------------------------------------------------
def test_face_detection_input_and_outputs_in_shared_memory(agent, samples):
    image = face_input(samples["astronaut"])
    want = agent.client.infer("face_detection", _face_feeds(agent, image))
    sizes = {name: value.nbytes for name, value in want.items()}
    total = image.nbytes + sum(sizes.values())
    handle, key = region(total)
    shm.set_shared_memory_region(handle, [image])
    client = agent.client
    client.register_shm("face", key, total)
    try:
        outputs, at = {}, image.nbytes
        for name, size in sizes.items():
            outputs[name] = ShmOutput("face", size, at)
            at += size
        input_name = next(iter(_face_feeds(agent, image)))
        got = client.infer_shm("face_detection", {input_name: ShmInput("face", image.shape, "FP32")}, outputs)
        for name, value in want.items():
            meta = got[name]
            assert meta["shape"] == list(value.shape) and meta["datatype"] == "FP32"
            params = meta["parameters"]
            assert params["shared_memory_region"] == "face"
            assert params["shared_memory_offset"] == outputs[name].offset
            assert params["shared_memory_byte_size"] == value.nbytes
            written = shm.get_contents_as_numpy(handle, np.float32, value.shape, offset=outputs[name].offset)
            np.testing.assert_array_equal(written, value)
        # Outputs answered as usual beside a shared-memory input.
        inline = client.infer_shm("face_detection", {input_name: ShmInput("face", image.shape, "FP32")})
        for name, value in want.items():
            np.testing.assert_array_equal(inline[name], value)
    finally:
        client.unregister_shm("face")


def _face_feeds(agent, image):
    name = agent.client.model_metadata("face_detection")["inputs"][0]["name"]
    return {name: image}


def test_silero_inputs_at_offsets_equal_the_normal_path(agent):
    feeds = silero_feeds(batch=2, seed=3)
    want = agent.client.infer("silero_vad", feeds)
    handle, key = region(8192)
    x, state = feeds["input"], feeds["state"]
    shm.set_shared_memory_region(handle, [x], offset=256)
    shm.set_shared_memory_region(handle, [state], offset=256 + x.nbytes)
    client = agent.client
    client.register_shm("vad", key, 8192 - 128, offset=128)  # a region that starts inside the object
    try:
        got = client.infer_shm("silero_vad", {"input": ShmInput("vad", x.shape, "FP32", 128),
                                              "state": ShmInput("vad", state.shape, "FP32", 128 + x.nbytes),
                                              "sr": feeds["sr"]})
        np.testing.assert_array_equal(got["output"], want["output"])
        np.testing.assert_array_equal(got["stateN"], want["stateN"])
    finally:
        client.unregister_shm("vad")


def test_status_register_unregister_and_unregister_all(agent):
    client = agent.client
    assert client.shm_status() == []
    keys = {}
    for name in ("a", "b", "with space"):
        _, keys[name] = region(4096)
        client.register_shm(name, keys[name], 1000, offset=16)
    status = sorted(client.shm_status(), key=lambda r: r["name"])
    assert status == [{"name": n, "key": keys[n], "offset": 16, "byte_size": 1000} for n in ("a", "b", "with space")]
    assert client.shm_status("with space") == [status[2]]
    client.unregister_shm("a")
    client.unregister_shm("a")  # no longer registered: no error, as in Triton
    assert {r["name"] for r in client.shm_status()} == {"b", "with space"}
    client.unregister_shm()
    assert client.shm_status() == []
    assert "unknown shared memory region 'b'" in error_of(lambda: client.shm_status("b"))
    assert "system_shared_memory" in client._json("GET", "/v2")["extensions"]


# -- registration errors ---------------------------------------------------------------------------
def test_registration_errors(agent):
    client = agent.client
    _, key = region(4096)
    assert "no shared memory object" in error_of(lambda: client.register_shm("r", "/edge-agent-none", 16))
    assert "too small" in error_of(lambda: client.register_shm("r", key, 4097))
    assert "too small" in error_of(lambda: client.register_shm("r", key, 4000, offset=100))
    assert "invalid shared memory key" in error_of(lambda: client.register_shm("r", "/../etc/passwd", 16))
    assert "invalid shared memory key" in error_of(lambda: client.register_shm("r", "/", 16))
    assert "byte_size' must be at least 1" in error_of(lambda: client.register_shm("r", key, 0))
    status, _, body = client.request("POST", "/v2/systemsharedmemory/region/r/register", b'{"key": 5}')
    assert status == 400 and b"'key' must be a string" in body
    status, _, body = client.request("POST", "/v2/systemsharedmemory/region/r/register",
                                     f'{{"key": "{key}", "byte_size": -1}}'.encode())
    assert status == 400 and b"non-negative integer" in body
    client.register_shm("r", key, 4096)
    try:
        assert "already registered" in error_of(lambda: client.register_shm("r", key, 16))
    finally:
        client.unregister_shm("r")
    assert client.shm_status() == []


def test_infer_errors_name_the_problem(agent):
    client = agent.client
    feeds = silero_feeds(batch=1, seed=4)
    x = feeds["input"]
    handle, key = region(4096)
    shm.set_shared_memory_region(handle, [x])
    client.register_shm("small", key, 4096)
    try:
        def infer(inp: ShmInput, outputs=None):
            return lambda: client.infer_shm("silero_vad", {"input": inp, "state": feeds["state"], "sr": feeds["sr"]},
                                            outputs)

        assert "unknown shared memory region 'nope'" in error_of(infer(ShmInput("nope", x.shape, "FP32")))
        assert "out of bounds of region 'small'" in error_of(infer(ShmInput("small", x.shape, "FP32", 4000)))
        # A byte size that does not match the shape and datatype.
        body = {"inputs": [{"name": "input", "shape": [1, 576], "datatype": "FP32",
                            "parameters": {"shared_memory_region": "small", "shared_memory_byte_size": 100}},
                           {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0.0] * 256},
                           {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}]}
        assert "does not match shape [1, 576] of FP32 (2304 bytes)" in error_of(
            lambda: client._json("POST", "/v2/models/silero_vad/infer", body))
        body["inputs"][0]["parameters"] = {"shared_memory_region": "small"}
        assert "shared_memory_byte_size is required" in error_of(
            lambda: client._json("POST", "/v2/models/silero_vad/infer", body))
        body["inputs"][0]["parameters"] = {"shared_memory_region": "small", "shared_memory_byte_size": 2304,
                                           "shared_memory_offset": -1}
        assert "shared_memory_offset must be a non-negative integer" in error_of(
            lambda: client._json("POST", "/v2/models/silero_vad/infer", body))
        # An output that does not fit what the client set aside, or the region.
        assert "needs 4 bytes but shared_memory_byte_size is 2" in error_of(
            infer(ShmInput("small", x.shape, "FP32"), {"output": ShmOutput("small", 2, 3000)}))
        assert "out of bounds of region 'small'" in error_of(
            infer(ShmInput("small", x.shape, "FP32"), {"output": ShmOutput("small", 100, 4000)}))
        # Still fine afterwards.
        got = client.infer_shm("silero_vad", {"input": ShmInput("small", x.shape, "FP32"), "state": feeds["state"],
                                              "sr": feeds["sr"]}, {"output": ShmOutput("small", 4, 3000)})
        assert got["output"]["parameters"]["shared_memory_byte_size"] == 4
    finally:
        client.unregister_shm("small")


def test_region_unlinked_or_shrunk_while_registered(agent):
    """The client frees the object while the agent holds it: a clear 400, never a SIGBUS."""
    client = agent.client
    feeds = silero_feeds(batch=1, seed=5)
    x = feeds["input"]
    for how in ("shrunk", "unlinked"):
        key = _key()
        path = Path("/dev/shm") / key.lstrip("/")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 8192)
            os.pwrite(fd, x.tobytes(), 0)
            client.register_shm(how, key, 8192)
            inputs = {"input": ShmInput(how, x.shape, "FP32"), "state": feeds["state"], "sr": feeds["sr"]}
            client.infer_shm("silero_vad", inputs, {"output": ShmOutput(how, 4, 4096)})
            if how == "shrunk":
                os.ftruncate(fd, 100)
            else:
                path.unlink()
            assert how in error_of(client.infer_shm, "silero_vad", inputs)
            assert how in error_of(client.infer_shm, "silero_vad", {**inputs, "input": x},
                                   {"output": ShmOutput(how, 4, 4096)})
            assert client.request("GET", "/v2/health/live")[0] == 200
            client.unregister_shm(how)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
    assert agent.proc.poll() is None
    np.testing.assert_array_equal(client.infer("silero_vad", feeds)["output"].shape, (1, 1))


def test_region_freed_and_unregistered_while_requests_use_it(agent):
    """Requests race a client that shrinks, restores, unregisters and registers its object:
    every answer is a result or a clear 400, and the agent lives on."""
    feeds = silero_feeds(batch=1, seed=8)
    x = feeds["input"]
    key = _key()
    path = Path("/dev/shm") / key.lstrip("/")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    statuses: list[int] = []
    done = threading.Event()

    def requests() -> None:
        inputs = {"input": ShmInput("racy", x.shape, "FP32"), "state": feeds["state"], "sr": feeds["sr"]}
        with AgentClient(agent.socket) as client:
            for _ in range(150):
                try:
                    client.infer_shm("silero_vad", inputs, {"output": ShmOutput("racy", 4, 4096)})
                    statuses.append(200)
                except ClientError as exc:
                    statuses.append(exc.status or 0)
        done.set()

    try:
        os.ftruncate(fd, 8192)
        os.pwrite(fd, x.tobytes(), 0)
        agent.client.register_shm("racy", key, 8192)
        worker = threading.Thread(target=requests)
        worker.start()
        turn = 0
        while not done.is_set():
            turn += 1
            if turn % 3 == 0:
                agent.client.unregister_shm("racy")
                agent.client.register_shm("racy", key, 8192)
            else:
                os.ftruncate(fd, 100)
                os.ftruncate(fd, 8192)
                os.pwrite(fd, x.tobytes(), 0)
        worker.join()
    finally:
        agent.client.unregister_shm("racy")
        os.close(fd)
        path.unlink(missing_ok=True)
    assert len(statuses) == 150 and set(statuses) <= {200, 400}, set(statuses)
    assert agent.proc.poll() is None and agent.client.request("GET", "/v2/health/live")[0] == 200


def test_refused_over_tcp_by_default(agent):
    _, key = region(4096)
    agent.client.register_shm("local", key, 4096)
    port = agent.port
    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 30, "the TCP listener")
    try:
        with AgentClient(tcp=f"127.0.0.1:{port}") as tcp:
            for call, args in ((tcp.register_shm, ("r", key, 16)), (tcp.shm_status, ()), (tcp.unregister_shm, ())):
                with pytest.raises(ClientError) as info:
                    call(*args)
                assert info.value.status == 403 and "api.tcp_shared_memory" in str(info.value)
            feeds = silero_feeds(batch=1, seed=6)
            message = error_of(lambda: tcp.infer_shm(
                "silero_vad", {**feeds, "input": ShmInput("local", feeds["input"].shape, "FP32")}))
            assert "not served on this listener" in message
            assert tcp.infer("silero_vad", feeds)["output"].shape == (1, 1)
        assert [r["name"] for r in agent.client.shm_status()] == ["local"]  # untouched by the TCP client
    finally:
        agent.client.unregister_shm("local")


# -- the registry's own limits (no daemon) ---------------------------------------------------------
def test_caps_on_regions_and_registered_bytes(tmp_path):
    for i in range(3):
        (tmp_path / f"obj{i}").write_bytes(b"\0" * 100_000)
    regions = SharedMemory(max_regions=2, max_bytes=150_000, directory=tmp_path)
    regions.register("a", {"key": "/obj0", "offset": 0, "byte_size": 60_000})
    with pytest.raises(SharedMemoryError, match="over its limit"):
        regions.register("b", {"key": "/obj1", "offset": 0, "byte_size": 90_001})
    regions.register("b", {"key": "obj1", "offset": 5003, "byte_size": 90_000})  # any offset, no alignment
    with pytest.raises(SharedMemoryError, match="too many shared memory regions"):
        regions.register("c", {"key": "/obj2", "offset": 0, "byte_size": 10})
    b = regions.get("b")
    (tmp_path / "obj1").write_bytes(bytes(range(256)) * 400)
    np.testing.assert_array_equal(b.read(1, np.dtype(np.uint8), [3]), [140, 141, 142])  # 5004 = 19 * 256 + 140
    b.write("output 'x'", 2, 4, np.array([7], np.int32))
    assert (tmp_path / "obj1").read_bytes()[5005:5009] == np.array([7], np.int32).tobytes()
    os.truncate(tmp_path / "obj1", 6000)
    with pytest.raises(SharedMemoryError, match="shrank to 6000 bytes"):
        b.read(0, np.dtype(np.uint8), [3])
    regions.close()
    assert regions.status() == [] and regions.registered == 0
    (tmp_path / "dir").mkdir()
    with pytest.raises(SharedMemoryError, match=r"not a shared memory object|cannot open"):
        regions.register("d", {"key": "/dir", "offset": 0, "byte_size": 1})


def test_tritonclient_over_tcp_when_allowed(daemon_factory, samples, tmp_path):
    """Triton's own client, end to end: register, status, infer in and out of a region, unregister."""
    import tritonclient.http as httpclient

    models = tmp_path / "models"
    install(models, samples, "silero_vad")
    config = tmp_path / "agent.toml"
    config.write_text("[api]\ntcp_shared_memory = true\n")
    port = _free_port()
    daemon_factory("--config", str(config), "--models-dir", str(models), "--tcp", f"127.0.0.1:{port}")

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 30, "the TCP listener")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    feeds = silero_feeds(batch=1, seed=7)
    x = feeds["input"]
    handle, key = region(8192)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("vad", key, 8192)
    assert client.get_system_shared_memory_status() == [{"name": "vad", "key": key, "offset": 0, "byte_size": 8192}]
    assert client.get_system_shared_memory_status("vad")[0]["name"] == "vad"
    inputs = [httpclient.InferInput("input", list(x.shape), "FP32"),
              httpclient.InferInput("state", list(feeds["state"].shape), "FP32"),
              httpclient.InferInput("sr", [], "INT64")]
    inputs[0].set_shared_memory("vad", x.nbytes)
    inputs[1].set_data_from_numpy(feeds["state"], binary_data=True)
    inputs[2].set_data_from_numpy(feeds["sr"], binary_data=True)
    outputs = [httpclient.InferRequestedOutput("output"), httpclient.InferRequestedOutput("stateN")]
    outputs[0].set_shared_memory("vad", 4, offset=4096)
    result = client.infer("silero_vad", inputs, outputs=outputs)
    want = AgentClient(tcp=f"127.0.0.1:{port}").infer("silero_vad", feeds)
    meta = result.get_output("output")
    assert meta["shape"] == [1, 1] and meta["parameters"]["shared_memory_region"] == "vad"
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 1], offset=4096), want["output"])
    np.testing.assert_array_equal(result.as_numpy("stateN"), want["stateN"])
    client.unregister_system_shared_memory("vad")
    assert client.get_system_shared_memory_status() == []
    client.close()
