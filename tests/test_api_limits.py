"""The HTTP server's limits (``agent.api.http``): request heads, timeouts, the connection cap, the
body budget, write backpressure, fairness between pipelining connections, HEAD and old HTTP
versions; and, in a real daemon, the ``[api]`` settings and bearer tokens for control over TCP.

The server runs in the test's event loop on a real Unix socket; clients are raw blocking sockets
in threads, so every byte on the wire is the test's choice. Nothing here measures time: a timeout
test sets a short timeout and waits (with a generous socket timeout) for the answer it must get.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from agent.api.http import _BODY as http_body_state
from agent.api.http import HTTPServer, Limits, Request, Response, Router
from agent.client import AgentClient
from agent.errors import ClientError
from tests.conftest import install, start_daemon, wait_for

LONG = 3600.0  # a timeout that must not be what answers


@dataclass
class Parsed:
    status: int
    headers: dict[str, str]
    body: bytes


class Raw:
    """A raw client connection: bytes in, responses (or the connection's end) out."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """False when the server has closed the connection meanwhile."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> Parsed | None:
        """The next response (after any 100 Continue), or None if the connection ends first.

        Parsed by hand: every answer of this server has a Content-Length, or ends with the connection.
        """
        while True:
            while b"\r\n\r\n" not in self.buffer:
                if not self._fill():
                    return None
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if status != 100:
                break
        if head_only:
            return Parsed(status, headers, b"")
        if "content-length" not in headers:
            while self._fill():
                pass
            body, self.buffer = self.buffer, b""
            return Parsed(status, headers, body)
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            if not self._fill():
                return None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Parsed(status, headers, body)

    def closed(self) -> bool:
        """Reads until the server closes (True) or sends something else (False)."""
        while True:
            if self.buffer:
                return False
            if not self._fill():
                return True

    def closed_now(self) -> bool:
        """Whether the server has closed it already (does not wait)."""
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(30)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Rig:
    server: HTTPServer
    path: Path
    calls: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def connect(self, timeout: float = 30.0) -> Raw:
        return Raw(self.path, timeout)


async def _build(tmp_path: Path, limits: Limits, **kw: object) -> Rig:
    async def not_found(request: Request) -> Response:
        return Response(404, b'{"error": "none"}')

    router = Router(not_found)
    rig = Rig(HTTPServer(router, limits, **kw), tmp_path / "http.sock")  # type: ignore[arg-type]

    async def hello(request: Request) -> Response:
        rig.calls.append(request.path)
        return Response(200, b"hello", "text/plain")

    async def big(request: Request) -> Response:
        rig.calls.append(request.path)
        return Response(200, b"x" * (1 << 20), "application/octet-stream")

    async def wait(request: Request) -> Response:
        rig.calls.append(request.path)
        await rig.release.wait()
        return Response(200, b"released", "text/plain")

    async def busy(request: Request) -> Response:
        rig.calls.append(request.headers.get("x-client", "?"))
        time.sleep(0.002)  # a handler that holds the loop, like a status with much to say
        return Response(200, b"done", "text/plain")

    async def upload(request: Request) -> Response:
        rig.calls.append(request.path)
        return Response(200, str(len(request.body)).encode(), "text/plain")

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            rig.calls.append("streamed")
            yield b"data: 1\n\n"

        return Response(200, b"", "text/event-stream", stream=stream())

    router.add("GET", "/hello", hello)
    router.add("GET", "/big", big)
    router.add("GET", "/wait", wait)
    router.add("GET", "/busy", busy)
    router.add("POST", "/upload", upload)
    router.add("GET", "/events", events)
    router.add("POST", "/control", hello, control=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(rig.path))
    await rig.server.listen_unix(sock)
    return rig


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[Rig] = []

    async def factory(**limits: object) -> Rig:
        rig = await _build(tmp_path / str(len(made)) if made else tmp_path,
                           replace(Limits(header_timeout=LONG, body_timeout=LONG, keep_alive=LONG,
                                          send_timeout=LONG), **limits))
        made.append(rig)
        return rig

    if not tmp_path.exists():
        tmp_path.mkdir()
    yield factory
    for rig in made:
        rig.release.set()
        await rig.server.stop(5)


def run(fn: Callable[[], object]) -> object:
    return asyncio.wait_for(asyncio.to_thread(fn), 60)


GET = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


# -- request heads ----------------------------------------------------------------------------------------
async def test_request_target_over_the_limit_is_414(make):
    rig = await make(max_url=1024)

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 414, answer
        assert json.loads(answer.body)["code"] == "uri_too_long"
        assert c.closed()

    await run(client)
    assert rig.calls == []


async def test_too_many_headers_is_431(make):
    rig = await make(max_headers=20)

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(21)) + b"\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 431 and b"header fields" in answer.body
        assert c.closed()
        ok = rig.connect()
        ok.send(b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(19)) + b"\r\n")
        assert ok.response().status == 200  # type: ignore[union-attr]

    await run(client)


async def test_header_count_is_checked_after_empty_lines_and_across_reads(make):
    rig = await make(max_headers=20)

    def client() -> None:
        c = rig.connect()
        c.send(b"\r\n\r\nGET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(10)))
        c.send(b"".join(b"Y-%d: y\r\n" % i for i in range(15)) + b"\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 431 and b"header fields" in answer.body

    await run(client)
    assert rig.calls == []


async def test_a_huge_header_is_refused_before_it_is_read(make):
    """A header that never ends is answered 431 once the head passes the limit (plus a read or two),
    never buffered whole: the client sees the answer while it is still sending."""
    rig = await make(max_head=16 * 1024)

    def client() -> int:
        c = rig.connect()
        c.send(b"GET /hello HTTP/1.1\r\nX-Big: ")
        sent = 0
        while sent < 64 * 1024 * 1024:
            if not c.send(b"a" * 8192):
                break
            sent += 8192
            c.sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c._fill()
            c.sock.setblocking(True)
            if c.buffer:
                break
        answer = c.response()
        assert answer is not None and answer.status == 431, answer
        assert json.loads(answer.body)["code"] == "headers_too_large"
        return sent

    sent = await run(client)
    assert sent < 4 * 1024 * 1024  # type: ignore[operator]  # refused after kilobytes, not after the 64 MiB


async def test_header_bytes_over_the_limit_are_431_and_within_it_are_fine(make):
    rig = await make(max_head=4096)

    def client() -> None:
        ok = rig.connect()
        ok.send(b"GET /hello HTTP/1.1\r\nX-A: " + b"a" * 3000 + b"\r\n\r\n")
        assert ok.response().status == 200  # type: ignore[union-attr]
        c = rig.connect()
        c.send(b"GET /hello HTTP/1.1\r\nX-A: " + b"a" * 3000 + b"\r\nX-B: " + b"b" * 2000 + b"\r\n\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 431

    await run(client)


@pytest.mark.parametrize(("line", "status"), [(b"GET /hello\r\n", 400), (b"GET /hello\r\n\r\n", 400),
                                             (b"\r\nGET /hello\r\n", 400), (b"GET /hello HTTP/0.9\r\n\r\n", 400),
                                             (b"GET /hello HTTP/2.0\r\n\r\n", 505),
                                             (b"GET /hello HTTP/1.2\r\n\r\n", 400)])  # httptools: invalid
async def test_http_09_and_other_versions_are_refused_at_once(make, line, status):
    rig = await make()  # no short timeout: the refusal must not be a timeout

    def client() -> None:
        c = rig.connect()
        c.send(line)
        answer = c.response()
        assert answer is not None and answer.status == status, answer
        assert c.closed()

    await run(client)
    assert rig.calls == []


async def test_http_10_is_served_and_closed(make):
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /hello HTTP/1.0\r\n\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 200 and answer.body == b"hello"
        assert c.closed()

    await run(client)


async def test_a_refusal_behind_a_pending_request_waits_for_its_answer(make):
    """Malformed bytes pipelined behind a request still being answered: the answer goes out first,
    then the 400, then the connection closes (it used to close at once, losing the answer)."""
    rig = await make()

    async def later() -> None:
        while not rig.calls:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        rig.release.set()

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage\r\n\r\n" + GET)
        first = c.response()
        assert first is not None and first.status == 200 and first.body == b"released"
        second = c.response()
        assert second is not None and second.status == 400
        assert c.closed()

    await asyncio.gather(later(), run(client))


# -- HEAD, OPTIONS, odd methods ----------------------------------------------------------------------------
async def test_head_is_answered_without_a_body_and_the_connection_stays_in_step(make):
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        head = c.response(head_only=True)
        assert head is not None and head.status == 200 and head.headers["content-length"] == "5"
        answer = c.response()  # the next response starts right after the head: nothing in between
        assert answer is not None and answer.status == 200 and answer.body == b"hello"
        c.send(b"HEAD /upload HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        refused = c.response(head_only=True)
        assert refused is not None and refused.status == 405 and refused.headers["allow"] == "POST"
        assert int(refused.headers["content-length"]) > 0
        assert c.response().body == b"hello"  # type: ignore[union-attr]

    await run(client)


async def test_head_on_a_stream_writes_the_head_only_and_never_starts_it(make):
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head = c.response(head_only=True)
        assert head is not None and head.status == 200
        assert c.closed()

    await run(client)
    assert "streamed" not in rig.calls


@pytest.mark.parametrize(("method", "allow"), [(b"OPTIONS", "GET, HEAD"), (b"DELETE", "GET, HEAD"),
                                               (b"PUT", "GET, HEAD"), (b"POST", "GET, HEAD")])
async def test_other_methods_on_known_paths_are_405_with_allow(make, method, allow):
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(method + b" /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" + GET)
        answer = c.response()
        assert answer is not None and answer.status == 405 and answer.headers["allow"] == allow
        assert json.loads(answer.body)["code"] == "method_not_allowed"
        assert c.response().body == b"hello"  # type: ignore[union-attr]

    await run(client)


@pytest.mark.parametrize("request_bytes", [b"FOO /hello HTTP/1.1\r\n\r\n", b"CONNECT x:443 HTTP/1.1\r\n\r\n",
                                           b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET * HTTP/1.1\r\n\r\n"])
async def test_unknown_methods_upgrades_and_odd_targets_are_4xx(make, request_bytes):
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(request_bytes)
        answer = c.response()
        assert answer is None or 400 <= answer.status < 500 or answer.status == 505, answer

    await run(client)
    assert rig.calls == []


async def test_an_upgrade_is_ignored_the_request_answered_and_the_connection_closed(make):
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /hello HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nPRI * HTTP/2.0\r\n\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 200 and answer.headers["connection"] == "close"
        assert c.closed()  # one answer, nothing for the bytes after the upgrade

    await run(client)
    assert rig.calls == ["/hello"]


# -- timeouts ---------------------------------------------------------------------------------------------
async def test_a_head_that_does_not_arrive_in_time_is_408(make):
    rig = await make(header_timeout=0.2)

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(3):  # slowloris: a byte now and then does not extend the deadline
            if not c.send(b"a"):
                break
            time.sleep(0.05)
        answer = c.response()
        assert answer is not None and answer.status == 408, answer
        assert json.loads(answer.body)["code"] == "request_timeout"
        assert c.closed()

    await run(client)
    assert rig.server.refusals["request_timeout"] == 1


async def test_a_body_that_does_not_arrive_in_time_is_408_and_its_budget_returned(make):
    rig = await make(body_timeout=0.2)

    def client() -> None:
        c = rig.connect()
        c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
        answer = c.response()
        assert answer is not None and answer.status == 408
        assert c.closed()

    await run(client)
    assert rig.calls == [] and rig.server.buffered == 0


async def test_idle_keep_alive_connections_are_closed_quietly(make):
    rig = await make(keep_alive=0.2)

    def client() -> None:
        c = rig.connect()
        c.send(GET)
        assert c.response().body == b"hello"  # type: ignore[union-attr]
        assert c.closed()  # and nothing else was written
        fresh = rig.connect()  # never sends anything
        assert fresh.closed()

    await run(client)
    assert rig.server.refusals["idle_timeout"] == 2


async def test_a_connection_busy_answering_is_not_timed_out(make):
    rig = await make(keep_alive=0.05, header_timeout=0.05)

    async def later() -> None:
        while not rig.calls:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # several timeouts long
        rig.release.set()

    def client() -> None:
        c = rig.connect()
        c.send(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.response().body == b"released"  # type: ignore[union-attr]

    await asyncio.gather(later(), run(client))


# -- connections ------------------------------------------------------------------------------------------
def _live_connections() -> int:
    from agent.api.http import _Connection

    return sum(1 for o in gc.get_objects() if type(o) is _Connection)


async def test_closed_connections_are_freed_without_the_cyclic_gc(make):
    """A soak (issue 12 item 16b) found a client reconnecting per request: each closed connection stayed in
    memory, in a cycle with its parser, until one of the cyclic GC's rare full collections."""
    rig = await make()
    gc.collect()
    gc.disable()
    try:
        before = _live_connections()

        def clients() -> None:
            for _ in range(30):
                c = rig.connect()
                c.send(GET)
                assert c.response().status == 200  # type: ignore[union-attr]
                c.close()

        await run(clients)
        await asyncio.wait_for(_until(lambda: not rig.server.connections), 30)
        await asyncio.sleep(0)  # connection_lost has run for each; nothing else holds them
        assert _live_connections() - before <= 1, "closed connections wait for the cyclic GC"
    finally:
        gc.enable()


async def _until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_the_client_keeps_one_connection(make):
    """AgentClient reads keep-alive when the answer completes (httptools forgets it afterwards):
    it reconnected for every request, a connection per predict."""
    rig = await make()

    def client() -> None:
        with AgentClient(rig.path) as c:
            assert c.request("GET", "/hello")[0] == 200
            first = c._sock
            for _ in range(5):
                assert c.request("GET", "/hello")[0] == 200
            assert first is not None and c._sock is first

    await run(client)


async def test_the_client_reconnects_once_when_the_agent_closed_an_idle_connection(make):
    rig = await make(keep_alive=0.05)

    def client() -> None:
        with AgentClient(rig.path) as c:
            assert c.request("GET", "/hello")[0] == 200
            first = c._sock
            assert first is not None
            deadline = time.monotonic() + 30
            while not _peer_closed(first):  # the agent's keep-alive timeout
                assert time.monotonic() < deadline, "the idle connection was never closed"
                time.sleep(0.01)
            assert c.request("GET", "/hello")[0] == 200  # on a new connection, no error
            assert c._sock is not first

    await run(client)


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False

async def test_at_the_connection_cap_the_idlest_connection_makes_room(make):
    """Cap 4: three clients answered and idle, one stalled head. Newcomers are served: the stalled
    head goes first (it never completed a request), then the idle ones, the longest idle first."""
    rig = await make(max_connections=4)

    def client() -> None:
        idle = [rig.connect() for _ in range(3)]
        for c in idle:  # each answered once, now idle in keep-alive
            c.send(GET)
            assert c.response().body == b"hello"  # type: ignore[union-attr]
        slow = rig.connect()
        slow.send(b"GET /hello HTTP/1.1\r\n")  # an unfinished head
        deadline = time.monotonic() + 30
        while len(rig.server.connections) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        candidates = {"slow": slow, "idle0": idle[0], "idle1": idle[1], "idle2": idle[2]}
        order: list[str] = []
        newcomers = []  # kept open: each one counts against the cap
        for _ in range(4):
            c = rig.connect()
            newcomers.append(c)
            c.send(GET)
            assert c.response().body == b"hello"  # type: ignore[union-attr]
            gone = wait_for(lambda: [n for n, conn in candidates.items() if n not in order and conn.closed_now()],
                            30, "a connection closed to make room")
            order.extend(gone)
        assert order == ["slow", "idle0", "idle1", "idle2"]

    await run(client)
    assert rig.server.refusals["evicted"] == 4


async def test_when_every_connection_is_being_answered_a_new_one_is_refused_503(make):
    rig = await make(max_connections=4)

    def client() -> None:
        waiting = [rig.connect() for _ in range(4)]
        for c in waiting:
            c.send(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 30
        while len(rig.calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = rig.connect()
        answer = extra.response()
        assert answer is not None and answer.status == 503 and answer.headers["retry-after"] == "1"
        assert json.loads(answer.body)["code"] == "overloaded"
        assert extra.closed()

    await run(client)
    rig.release.set()
    assert rig.server.refusals["refused_connection"] == 1


# -- bodies -----------------------------------------------------------------------------------------------
async def test_bodies_held_at_once_share_one_budget(make):
    rig = await make(max_body=1 << 20, max_buffered=2 << 20)

    def client() -> None:
        head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 20)
        first, second, third = rig.connect(), rig.connect(), rig.connect()
        first.send(head + b"a" * 1000)
        second.send(head + b"a" * 1000)
        deadline = time.monotonic() + 30
        while rig.server.buffered < 2 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        third.send(head + b"a" * 1000)
        answer = third.response()
        assert answer is not None and answer.status == 503 and json.loads(answer.body)["code"] == "overloaded"
        first.send(b"a" * ((1 << 20) - 1000))
        assert first.response().body == b"%d" % (1 << 20)  # type: ignore[union-attr]
        fourth = rig.connect()  # the first body is answered: its share is free again
        fourth.send(head + b"a" * (1 << 20))
        assert fourth.response().body == b"%d" % (1 << 20)  # type: ignore[union-attr]
        second.close()

    await run(client)
    deadline = time.monotonic() + 30
    while rig.server.buffered and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert rig.server.buffered == 0


async def test_a_chunked_body_counts_against_the_budget_and_the_limit(make):
    rig = await make(max_body=1 << 20, max_buffered=1 << 20)

    def client() -> None:
        ok = rig.connect()
        ok.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"1000\r\n" + b"a" * 4096 + b"\r\n0\r\n\r\n")
        assert ok.response().body == b"4096"  # type: ignore[union-attr]
        big = rig.connect()
        big.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = None
        for _ in range(300):
            if not big.send(b"10000\r\n" + b"a" * 65536 + b"\r\n"):
                break
        answer = big.response()
        assert answer is not None and answer.status == 413

    await run(client)
    assert rig.server.buffered == 0


async def test_big_chunks_arriving_in_one_read_are_data_not_framing(make):
    """A fast client's chunks land in the agent's read buffer many at a time: before they are
    parsed they must not be counted as framing (a 400 "out of proportion" under load, once)."""
    rig = await make(max_body=4 << 20, max_buffered=4 << 20)
    body = b"".join(b"10000\r\n" + bytes([65 + i]) * 65536 + b"\r\n" for i in range(16))

    def client() -> None:
        c = rig.connect()
        c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        # The head read alone, the body then arrives in reads of many chunks each.
        def reading_body() -> bool:
            try:
                return any(conn.reading == http_body_state for conn in list(rig.server.connections))
            except RuntimeError:  # the loop changed the set meanwhile: look again
                return False

        wait_for(reading_body, what="the head parsed")
        c.send(body + b"0\r\n\r\n")
        answer = c.response()
        assert answer is not None and answer.status == 200, answer
        assert answer.body == str(16 * 65536).encode()

    await run(client)


async def test_tiny_chunks_are_refused(make):
    """One Python callback per chunk: tiny ones are refused within the read that brings them."""
    rig = await make()

    def client() -> None:
        c = rig.connect()
        c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 50_000)
        answer = c.response()
        assert answer is not None and answer.status == 400 and b"average under 64 bytes" in answer.body
        slow = rig.connect()  # sent one by one: refused too
        slow.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20_000):
            if not slow.send(b"1\r\na\r\n"):
                break
        answer = slow.response()
        assert answer is not None and answer.status == 400 and b"chunked" in answer.body

    await run(client)
    assert rig.calls == []


async def test_body_over_the_limit_is_413_and_the_connection_closes(make):
    rig = await make(max_body=1000)

    def client() -> None:
        c = rig.connect()
        c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000)
        answer = c.response()
        assert answer is not None and answer.status == 413 and json.loads(answer.body)["code"] == "too_large"
        assert c.closed()

    await run(client)
    assert rig.server.buffered == 0


# -- writes and fairness ----------------------------------------------------------------------------------
async def test_a_client_that_does_not_read_is_neither_read_nor_answered(make):
    """Write backpressure: 200 pipelined requests for 1 MiB answers, never read: the server stops
    once its unsent output passes the bound, and answers the rest, in order, as the client reads."""
    rig = await make(max_unsent=64 * 1024)
    sender = rig.connect()
    requests = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    await run(lambda: sender.send(requests))
    conn = None
    for _ in range(3000):
        conn = next(iter(rig.server.connections), None)
        if conn is not None and conn.write_paused:
            break
        await asyncio.sleep(0.01)
    assert conn is not None and conn.write_paused and conn.read_paused
    answered = len(rig.calls)
    assert answered <= 3, answered  # a response or two in the socket's buffer, one being written: no more

    def read_all() -> int:
        count = 0
        while count < 200:
            answer = sender.response()
            assert answer is not None and answer.status == 200 and len(answer.body) == 1 << 20
            count += 1
        return count

    assert await run(read_all) == 200
    assert len(rig.calls) == 200


async def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(make):
    rig = await make(max_unsent=64 * 1024, send_timeout=0.2)
    sender = rig.connect()
    await run(lambda: sender.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 20))
    for _ in range(3000):
        if rig.server.refusals["send_timeout"]:
            break
        await asyncio.sleep(0.01)
    assert rig.server.refusals["send_timeout"] == 1
    assert len(rig.calls) < 20
    sender.close()


async def test_pipelined_requests_do_not_hold_the_loop_against_other_connections(make):
    """One connection pipelines 300 requests whose handler holds the loop for a moment; another
    connection's single request is answered long before the 300 are."""
    rig = await make(max_pipelined=1000)
    hog, other = rig.connect(), rig.connect()
    order: list[str] = []

    def hog_client() -> None:
        hog.send(b"GET /busy HTTP/1.1\r\nHost: x\r\nX-Client: hog\r\n\r\n" * 300)
        for _ in range(300):
            assert hog.response() is not None
        order.append("hog done")

    def other_client() -> None:
        while "hog" not in rig.calls:
            time.sleep(0.001)
        other.send(b"GET /busy HTTP/1.1\r\nHost: x\r\nX-Client: other\r\n\r\n")
        assert other.response().body == b"done"  # type: ignore[union-attr]
        order.append("other done")

    await asyncio.gather(run(hog_client), run(other_client))
    position = rig.calls.index("other")
    assert position < 150, position  # served between the hog's requests, not after all of them
    assert order == ["other done", "hog done"]


# -- control routes and TCP -------------------------------------------------------------------------------
async def test_control_routes_over_tcp_need_the_token(tmp_path):
    async def not_found(request: Request) -> Response:
        return Response(404, b"{}")

    async def ok(request: Request) -> Response:
        return Response(200, b"ok", "text/plain")

    results = {}
    for token in (None, b"s3cret-token-0123456789"):
        router = Router(not_found)
        router.add("GET", "/data", ok)
        router.add("POST", "/control", ok, control=True)
        server = HTTPServer(router, Limits(), token=token)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        await server.listen_tcp("127.0.0.1", port)
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(tmp_path / f"{token is None}.sock"))
        await server.listen_unix(unix)

        def calls(port: int = port, path: Path = tmp_path / f"{token is None}.sock") -> list[int]:
            tcp = AgentClient(tcp=f"127.0.0.1:{port}")
            local = AgentClient(path)
            out = [tcp.request("GET", "/data")[0], tcp.request("POST", "/control")[0],
                   tcp.request("POST", "/control", headers={"Authorization": "Bearer wrong-token-0123456789"})[0],
                   tcp.request("POST", "/control", headers={"Authorization": "Bearer s3cret-token-0123456789"})[0],
                   local.request("POST", "/control")[0]]
            tcp.close()
            local.close()
            return out

        results[token is None] = await run(calls)
        await server.stop(5)
    assert results[True] == [200, 403, 403, 403, 200]  # no token configured: never over TCP
    assert results[False] == [200, 401, 401, 200, 200]


# -- the daemon: settings and bearer tokens -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tcp_listening(port: int) -> None:
    """The daemon binds TCP just after the Unix socket its start-up wait polls."""
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, 30, f"TCP port {port}")


@pytest.fixture(scope="module")
def tcp_agent(tmp_path_factory, samples):
    work = tmp_path_factory.mktemp("tcp")
    install(work / "models", samples, "silero_vad")
    token = work / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    port = _free_port()
    config = work / "agent.toml"
    config.write_text(f'[api]\ntcp = "127.0.0.1:{port}"\ntcp_token_file = "{token}"\nmax_headers = 30\n'
                      "keep_alive_s = 30\n")
    daemon = start_daemon(work, "--config", str(config), "--models-dir", str(work / "models"))
    _tcp_listening(port)
    yield daemon, port
    assert daemon.stop() == 0


CONTROL = [("GET", "/v1/agent/status"), ("POST", "/v1/agent/models:reload"),
           ("POST", "/v1/agent/models/silero_vad:deploy"), ("POST", "/v1/agent/models/silero_vad:rollback"),
           ("GET", "/v1/agent/deployments/silero_vad"), ("GET", "/v1/agent/streams"),
           ("POST", "/v1/agent/streams/cam:start"), ("POST", "/v1/agent/streams/cam:stop"),
           ("GET", "/v1/agent/streams/cam/results"), ("POST", "/v1/agent/results/app")]
DATA = [("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", "/v2/models/silero_vad"),
        ("GET", "/v2/models/silero_vad/ready"), ("GET", "/v2/models/stats"), ("GET", "/v1/models/silero_vad"),
        ("GET", "/v1/models/silero_vad/metadata"), ("GET", "/metrics")]


def test_daemon_over_tcp_serves_the_data_plane_and_control_only_with_the_token(tcp_agent):
    daemon, port = tcp_agent
    with AgentClient(tcp=f"127.0.0.1:{port}") as tcp:
        for method, path in DATA:
            assert tcp.request(method, path)[0] == 200, path
        feeds = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32),
                 "sr": np.array(16000, np.int64)}
        assert tcp.infer("silero_vad", feeds)["output"].shape == (1, 1)
        for method, path in CONTROL:
            status, headers, body = tcp.request(method, path, b"{}" if method == "POST" else None)
            assert status == 401, (path, status, body)
            assert headers["www-authenticate"].startswith("Bearer")
            assert json.loads(body)["code"] == "unauthorized"
        auth = {"Authorization": "Bearer 0123456789abcdef0123456789abcdef"}
        assert tcp.request("GET", "/v1/agent/status", headers=auth)[0] == 200
        assert tcp.request("POST", "/v1/agent/models:reload", headers=auth)[0] == 200
        assert tcp.request("GET", "/v1/agent/status", headers={"Authorization": "Bearer nope"})[0] == 401
    assert daemon.client.request("GET", "/v1/agent/status")[0] == 200  # the socket needs no token


def test_cli_over_tcp_sends_the_token(tcp_agent, tmp_path):
    import subprocess
    import sys

    daemon, port = tcp_agent
    token = daemon.socket.parent / "token"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", "status", "--tcp", f"127.0.0.1:{port}", "--json",
                               *args], capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "EDGE_AGENT_CONFIG": ""})

    ok = cli("--token-file", str(token))
    assert ok.returncode == 0 and json.loads(ok.stdout)["models"], ok.stderr
    refused = cli()
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr, refused.stderr
    missing = cli("--token-file", str(tmp_path / "none"))
    assert missing.returncode == 2 and "cannot read the token file" in missing.stderr


def test_daemon_takes_its_limits_from_the_config(tcp_agent):
    daemon, _ = tcp_agent
    with AgentClient(daemon.socket) as client:
        headers = {f"X-{i}": "y" for i in range(30)}
        status, _, body = client.request("GET", "/v2/health/live", headers=headers)
    assert status == 431 and json.loads(body)["code"] == "headers_too_large"


def test_daemon_without_a_token_refuses_control_over_tcp(daemon_factory, models_dir):
    port = _free_port()
    daemon = daemon_factory("--models-dir", str(models_dir), "--tcp", f"127.0.0.1:{port}")
    _tcp_listening(port)
    with AgentClient(tcp=f"127.0.0.1:{port}") as tcp:
        assert tcp.request("GET", "/v2/health/ready")[0] == 200
        for method, path in CONTROL:
            status, _, body = tcp.request(method, path, b"{}" if method == "POST" else None)
            assert status == 403 and json.loads(body)["code"] == "forbidden", (path, status)
        with pytest.raises(ClientError, match="HTTP 403"):
            tcp.status()
    assert daemon.client.status()["models"]
    assert daemon.stop() == 0


@pytest.mark.parametrize(("mode", "content", "reason"), [
    (0o644, "0123456789abcdef0123", "readable by the service only"),
    (0o640, "0123456789abcdef0123", "readable by the service only"),
    (0o600, "short", "at least 16"),
    (0o600, "has spaces in the token ok", "at least 16"),
    (None, "", "cannot read"),
])
def test_a_token_file_that_others_can_read_stops_the_agent(tmp_path, models_dir, mode, content, reason):
    token = tmp_path / "token"
    if mode is not None:
        token.write_text(content)
        token.chmod(mode)
    config = tmp_path / "agent.toml"
    config.write_text(f'[api]\ntcp = "127.0.0.1:{_free_port()}"\ntcp_token_file = "{token}"\n')
    daemon = start_daemon(tmp_path / "agent", "--config", str(config), "--models-dir", str(models_dir), wait=False)
    assert daemon.proc.wait(60) == 2
    log = daemon.log_text()
    assert "api.tcp_token_file" in log and reason in log, log
    daemon.client.close()


def test_token_file_must_be_owned_by_the_service(tmp_path):
    from agent.api.server import read_token
    from agent.errors import ConfigError

    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123")
    token.chmod(0o600)
    assert read_token(token) == b"0123456789abcdef0123"
    link = tmp_path / "link"
    link.symlink_to(token)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token(link)
    if os.geteuid() == 0:
        os.chown(token, 12345, -1)
        with pytest.raises(ConfigError, match="owned by the service"):
            read_token(token)
