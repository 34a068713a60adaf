"""A small HTTP/1.1 server on asyncio, with ``httptools`` (the parser behind uvicorn) doing
the parsing.

Why not a framework: on this path the agent's whole budget is ~150 µs over the raw runtime,
and aiohttp's request/response machinery alone measured ~185 µs per call here. This module
owns only what the API needs: keep-alive, pipelined requests answered in order,
``Expect: 100-continue``, a body limit enforced while reading, and a graceful stop that lets
in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httptools
import structlog

log = structlog.get_logger(__name__)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # from the route pattern
    received: int = 0  # time.perf_counter_ns() when its first byte was parsed


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    stream: AsyncIterator[bytes] | None = None  # a long-lived body (Server-Sent Events); then the connection closes
    sent: Callable[[int], None] | None = None  # called with time.perf_counter_ns() once written


Handler = Callable[[Request], Awaitable[Response]]
_REASONS = {s.value: s.phrase for s in HTTPStatus}


def encode(response: Response, keep_alive: bool) -> bytes:
    head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}"]
    if not keep_alive:
        head.append("Connection: close")
    if response.headers:
        head.extend(f"{k}: {v}" for k, v in response.headers.items())
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


class Router:
    """Routes by method and a path pattern with ``{name}`` or ``{name:regex}`` placeholders."""

    def __init__(self, not_found: Handler) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._not_found = not_found

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        def placeholder(m: re.Match[str]) -> str:
            name, _, regex = m.group(1).partition(":")
            return f"(?P<{name}>{regex or '[^/]+'})"

        regex = re.sub(r"\{([^{}]+(?:\{[^{}]*\}[^{}]*)*)\}", placeholder, pattern)
        self._routes.append((method, re.compile(f"^{regex}$"), handler))

    def resolve(self, request: Request) -> Handler:
        allowed = False
        for method, regex, handler in self._routes:
            m = regex.match(request.path)
            if m is not None:
                if method == request.method:
                    request.params = m.groupdict()
                    return handler
                allowed = True
        return _method_not_allowed if allowed else self._not_found


async def _method_not_allowed(request: Request) -> Response:
    return Response(405, f'{{"error": "method {request.method} not allowed on {request.path}"}}'.encode())


class _Connection(asyncio.Protocol):
    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.received = 0
        self.pending: collections.deque[tuple[Request, bool]] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.streaming = False  # answering with a long-lived body: cancelled at stop, not waited for
        self.closing = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        if self.server.stopping:
            # Accepted just before the listener closed, but announced only now (a later loop turn on
            # 3.12+): serving it would race the models being unloaded.
            transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrade is not supported")
        except httptools.HttpParserError as exc:
            if not self.too_large:
                self._fail(400, f"malformed HTTP request: {exc}")

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.body_size, self.too_large = b"", {}, [], 0, False
        self.received = time.perf_counter_ns()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._too_large()
            return
        if self.headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.too_large:
            # Keep reading (and dropping) so the client sees the 413 instead of a broken pipe.
            if self.body_size > 4 * self.server.max_body and self.transport is not None:
                self.transport.close()
            return
        if self.body_size > self.server.max_body:
            self._too_large()
            return
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        if self.too_large:
            if self.transport is not None:
                self.transport.close()
            return
        parsed = httptools.parse_url(self.url)
        method = self.parser.get_method().decode("ascii")
        request = Request(method, parsed.path.decode("utf-8", "replace"), self.headers, b"".join(self.body),
                          received=self.received)
        self.pending.append((request, self.parser.should_keep_alive()))
        if self.task is None:
            self._start_serving()
        if len(self.pending) > 32 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining without reading answers

    # -- answering -------------------------------------------------------------------------------
    def _start_serving(self) -> None:
        """Answer the pending requests in a task of their own (one per busy connection).

        On Python 3.12+ the task starts eagerly: a predict that runs inline never waits, so it
        is answered right here, with no extra turn of the event loop (~10-20 µs per request on
        a small board); only a handler that waits is scheduled like any task.
        """
        task = _spawn(self._serve(), name="http-connection")
        self.task = None if task.done() else task  # an eager task may already have finished (and cleared it)

    async def _serve(self) -> None:
        try:
            while self.pending:
                request, keep_alive = self.pending.popleft()
                handler = self.server.router.resolve(request)
                self.server.in_flight += 1
                try:
                    response = await handler(request)
                finally:
                    self.server.in_flight -= 1
                keep_alive = keep_alive and not self.server.stopping
                if self.transport is None or self.transport.is_closing():
                    return
                if response.stream is not None:
                    self.streaming = True
                    await self._stream(response)
                    return
                self.transport.write(encode(response, keep_alive))
                if response.sent is not None:
                    response.sent(time.perf_counter_ns())
                if not keep_alive:
                    self.transport.close()
                    return
                if len(self.pending) <= 32:
                    self.transport.resume_reading()
        finally:
            self.task = None
            self.server.idle.set()

    async def _stream(self, response: Response) -> None:
        """Head without a length, then chunks until the producer ends or the client goes away."""
        assert self.transport is not None and response.stream is not None
        head = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
                f"Content-Type: {response.content_type}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n")
        self.transport.write(head.encode("latin-1"))
        try:
            async for chunk in response.stream:
                if self.transport.is_closing() or self.server.stopping:
                    break
                self.transport.write(chunk)
        finally:
            await response.stream.aclose()  # type: ignore[attr-defined]
            self.transport.close()

    def _too_large(self) -> None:
        self.too_large = True
        self.body = []
        self._fail(413, f"request body exceeds the limit of {self.server.max_body} bytes", close=False)

    def _fail(self, status: int, message: str, close: bool = True) -> None:
        """Protocol-level errors: answer once, then close (at once, or once the body is drained)."""
        if self.transport is None or self.transport.is_closing():
            return
        body = ('{"error": ' + json.dumps(message) + "}").encode()
        self.transport.write(encode(Response(status, body), keep_alive=False))
        if close:
            self.transport.close()

    def close_if_idle(self) -> None:
        if self.task is None and self.transport is not None:
            self.transport.close()


def _spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A task that starts at once where the interpreter can (3.12+), else on the next loop turn."""
    loop = asyncio.get_running_loop()
    if _EAGER:
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)  # type: ignore[call-arg]
    return loop.create_task(coro, name=name)


_EAGER = sys.version_info >= (3, 12)


class HTTPServer:
    """Serves ``router`` on any number of listening sockets; ``stop`` drains in-flight requests."""

    def __init__(self, router: Router, max_body: int) -> None:
        self.router = router
        self.max_body = max_body
        self.connections: set[_Connection] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.in_flight = 0
        self.stopping = False
        self.idle = asyncio.Event()

    async def listen_unix(self, sock: object) -> None:
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_unix_server(lambda: _Connection(self), sock=sock))  # type: ignore[arg-type]

    async def listen_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_server(lambda: _Connection(self), host, port))

    async def stop(self, timeout: float) -> None:
        """Stop accepting, finish what is in flight (up to ``timeout``), close every connection.

        Long-lived answers (live result feeds) are cancelled at once: they never end by themselves.
        """
        self.stopping = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.streaming and conn.task is not None:
                conn.task.cancel()
            conn.close_if_idle()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.task is not None for c in self.connections):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.warning("api.stop_timeout", in_flight=self.in_flight)
                break
            self.idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), remaining)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
