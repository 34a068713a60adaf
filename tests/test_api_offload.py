"""Large JSON off the event loop (``agent.api.offload``): bodies decoded in the helper process
give the same tensors and the same errors as decoding on the loop; answers encoded in slices
are byte for byte the JSON of one ``orjson.dumps``."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from agent.api.codec import JSON_OPTS, dumps, to_array
from agent.api.offload import SLICE, JsonDecoder, encoded, fragments
from agent.errors import RequestError


@pytest.mark.parametrize("shape", [(SLICE + 7,), (3, SLICE + 1), (2000, 576), (2, 1900, 128), (1, 2, 3), (0, 5)])
def test_sliced_encoding_is_the_same_json(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert orjson.dumps(encoded(array), option=JSON_OPTS) == orjson.dumps(array, option=JSON_OPTS)
    doc = {"outputs": [{"name": "y", "data": array.reshape(-1)}], "n": 1}
    assert dumps(fragments(doc)) == dumps(doc)


def spilled() -> set[str]:
    import tempfile
    from pathlib import Path

    from agent.api import offload

    return {p.name for p in Path(offload._SPILL_DIR or tempfile.gettempdir()).glob("edge-agent-json-*")}


async def test_helper_process_decodes_like_the_loop() -> None:
    decoder = JsonDecoder(timeout=60)
    before = spilled()
    try:
        rows = np.random.default_rng(1).standard_normal((300, 576)).astype(np.float32)
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [300, 576], "datatype": "FP32",
                                         "data": rows.reshape(-1)},
                                        {"name": "sr", "shape": [], "datatype": "INT64", "data": 16000}]},
                            option=JSON_OPTS)
        got = await asyncio.wait_for(decoder.decode(body), 60)
        want = orjson.loads(body)
        first, second = got["inputs"]
        assert first["shape"] == [300, 576] and isinstance(first["shape"], list)  # shapes stay lists
        assert isinstance(first["data"], np.ndarray)
        np.testing.assert_array_equal(to_array("input", first["data"], np.dtype(np.float32)),
                                      to_array("input", want["inputs"][0]["data"], np.dtype(np.float32)))
        assert second == want["inputs"][1]

        with pytest.raises(RequestError, match="malformed JSON"):
            await asyncio.wait_for(decoder.decode(b'{"inputs": [' + b"1," * 100_000), 60)
        ragged = await asyncio.wait_for(decoder.decode(orjson.dumps({"data": [[1.0] * 40, [2.0] * 41]})), 60)
        with pytest.raises(RequestError, match="input 'x': cannot convert to float32"):
            to_array("x", ragged["data"], np.dtype(np.float32))
        strings = await asyncio.wait_for(decoder.decode(orjson.dumps({"data": ["a"] * 40})), 60)
        with pytest.raises(RequestError, match="float32 takes numbers, got strings"):
            to_array("x", strings["data"], np.dtype(np.float32))
        assert spilled() <= before, "the files that carried the bodies are removed"
    finally:
        decoder.close()


async def test_a_dead_helper_is_an_overload_and_is_restarted() -> None:
    from agent.errors import OverloadedError

    decoder = JsonDecoder(timeout=60)
    try:
        assert await asyncio.wait_for(decoder.decode(b"[1, 2]"), 60) == [1, 2]
        pool = await decoder._executor()
        for proc in list(pool._processes.values()):  # type: ignore[attr-defined]
            proc.kill()
        with pytest.raises(OverloadedError, match="died"):
            await asyncio.wait_for(decoder.decode(b"[1, 2, 3]"), 60)
        assert await asyncio.wait_for(decoder.decode(b"[4]"), 60) == [4]  # a new helper
    finally:
        decoder.close()


async def test_client_reconnects_when_the_agent_closed_an_idle_connection(tmp_path) -> None:
    import socket as socketlib

    from agent.api.http import HTTPServer, Limits, Request, Response, Router
    from agent.client import AgentClient

    async def hello(request: Request) -> Response:
        return Response(200, b'{"hello": 1}')

    server = HTTPServer(Router(hello), Limits(keep_alive=0.05))
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.bind(str(tmp_path / "http.sock"))
    await server.listen_unix(sock)

    def calls() -> list[object]:
        with AgentClient(tmp_path / "http.sock", timeout=10) as client:
            first = client._json("GET", "/x")
            kept = client._sock
            second = client._json("GET", "/x")
            assert client._sock is kept  # kept alive
            import time

            time.sleep(0.5)  # the server closes the idle connection meanwhile
            third = client._json("GET", "/x")
            return [first, second, third]

    assert await asyncio.wait_for(asyncio.to_thread(calls), 10) == [{"hello": 1}] * 3
    await server.stop(1)
