"""A small HTTP/1.1 server on asyncio, with ``httptools`` (the parser behind uvicorn) doing
the parsing.

Why not a framework: on this path the agent's whole budget is ~150 µs over the raw runtime,
and aiohttp's request/response machinery alone measured ~185 µs per call here. This module
owns only what the API needs: keep-alive, pipelined requests answered in order,
``Expect: 100-continue``, and a graceful stop that lets in-flight requests finish; and the
limits of a server that faces clients it does not trust (``Limits``, from ``[api]``), at least
those of uvicorn and h11:

- the request target (414), the head's bytes and its header count (431), checked before the
  parser holds more than one read past the limit: httptools joins a partial header by
  concatenation, so an unbounded one costs the square of its size;
- a body over ``max_body`` (413), and every body held at once, all connections together, over
  ``max_buffered`` (503): a few large uploads at once cannot take the device's memory;
- timeouts, checked by one sweep per server so a request only stores when it began: a head
  must arrive within ``header_timeout`` of its first byte, its body within ``body_timeout``
  of the head (408), the next request within ``keep_alive`` (closed quietly), and a client
  that does not read its answers is dropped after ``send_timeout``;
- at most ``max_connections``: a new connection makes room by closing the one that has gone
  longest without a request to answer (idle since its last answer, or stuck in a head or body
  since it began); only when every connection is being answered is it refused (503);
- write backpressure: a connection whose unsent answers exceed ``max_unsent`` is neither read
  nor answered until its client reads;
- fairness: of the requests pipelined in one read, the first may be answered at once and the
  rest one per turn of the event loop, so one connection never holds the loop while others wait;
- HEAD is answered as GET without a body; HTTP/0.9 is refused at once (400), versions but 1.0
  and 1.1 with 505;
- over TCP, routes marked ``control`` need ``Authorization: Bearer <token>`` (403 when no token
  is configured): the Unix socket's file permissions are its only access control.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httptools
import structlog

from agent.api.codec import dumps
from agent.api.errors import error_body, http_status
from agent.errors import (
    AgentError,
    ForbiddenError,
    HeadTooLargeError,
    HTTPVersionError,
    MethodNotAllowedError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
    RequestTimeoutError,
    UnauthorizedError,
    URITooLongError,
)

log = structlog.get_logger(__name__)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes | bytearray
    params: dict[str, str] = field(default_factory=dict)  # from the route pattern
    received: int = 0  # time.perf_counter_ns() when it was parsed whole (body included), as Triton starts its clock
    held: int = 0  # bytes of the server's body budget this request holds until it is answered
    # Set while its handler runs when the answer may be written by the thread that computes it
    # (``DirectAnswer``); None when the event loop must write it (HEAD, unsent bytes queued, ...).
    direct: DirectAnswer | None = None
    local: bool = True  # came over the Unix socket (not TCP)


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    stream: AsyncIterator[bytes] | None = None  # a long-lived body (Server-Sent Events); then the connection closes
    sent: Callable[[int], None] | None = None  # called with time.perf_counter_ns() as its write began


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server (``[api]`` in the agent's config, docs/api.md)."""

    max_body: int = 64 * 1024 * 1024
    max_buffered: int = 128 * 1024 * 1024
    max_url: int = 8 * 1024
    max_head: int = 16 * 1024
    max_headers: int = 100
    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive: float = 5.0
    send_timeout: float = 60.0
    max_unsent: int = 1024 * 1024
    max_pipelined: int = 32  # requests waiting on one connection before it is no longer read

    @property
    def tick(self) -> float:
        """How often timeouts are checked: a quarter of the shortest, at most a second."""
        return max(0.005, min(1.0, self.header_timeout, self.body_timeout, self.keep_alive, self.send_timeout) / 4)


Handler = Callable[[Request], Awaitable[Response]]
_REASONS = {s.value: s.phrase for s in HTTPStatus}


def encode(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    """Status line, headers and (unless answering a HEAD) the body."""
    head = encode_head(response, keep_alive)
    return head if head_only else head + response.body


def encode_head(response: Response, keep_alive: bool) -> bytes:
    """Status line and headers."""
    head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}"]
    if not keep_alive:
        head.append("Connection: close")
    if response.headers:
        head.extend(f"{k}: {v}" for k, v in response.headers.items())
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


#: Answers larger than this are written as head and body, without joining them into one copy.
_JOIN_MAX = 64 * 1024


class DirectAnswer:
    """Lets the thread that computed a request's answer (a model's worker) write it to the
    client itself, so the client is not also kept waiting for the event loop to wake up and
    write it (on a shared 2-core VM, that second wake-up cost 200-700 µs per request).

    Safe because nothing else writes to the connection meanwhile: the answer goes out only
    while the connection's transport holds no unsent bytes and this request is the oldest one
    unanswered (answers stay in order), and the event loop ``close``s it (under the lock)
    before it writes anything to this connection itself. It writes through a duplicate of the
    socket's descriptor, owned by the connection and closed only after ``close``, so the
    descriptor it writes to is always this connection's, even if the transport closed
    meanwhile. Sends never block (``MSG_DONTWAIT``): what the kernel does not take at once,
    the event loop writes after the handler returns (``written`` tells it how much went).
    """

    __slots__ = ("_lock", "_loop_thread", "_open", "_server", "_sock", "at", "data", "keep_alive", "written")

    def __init__(self, sock: socket.socket, lock: threading.Lock, keep_alive: bool, server: HTTPServer) -> None:
        self._sock = sock
        self._lock = lock
        self._loop_thread = threading.get_ident()  # made on the event loop's thread
        self._open = True
        self._server = server
        self.keep_alive = keep_alive
        self.data: tuple[bytes, bytes] | None = None  # what ``send`` wrote (head, body), once it did
        self.written = 0  # of ``data``, bytes the kernel took
        self.at = 0  # time.perf_counter_ns() when the write began

    def send(self, response: Response) -> None:
        """Write ``response`` (once; from any thread but the event loop's, which writes its answers
        itself); the event loop writes whatever is left. A failed write writes nothing: the event
        loop's write then meets the error itself."""
        if response.stream is not None or threading.get_ident() == self._loop_thread:
            return
        keep_alive = self.keep_alive and not self._server.stopping
        head, body = encode_head(response, keep_alive), response.body
        with self._lock:
            if not self._open:
                return
            self._open = False
            # Stamped as the write begins: a client that the write wakes may run before it returns.
            at = time.perf_counter_ns()
            try:
                written = self._sock.sendmsg([head, body], (), socket.MSG_DONTWAIT)  # no copy into one buffer
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError:
                return  # reset or closed: nothing went; the event loop's write finds out
            self.keep_alive, self.data, self.written, self.at = keep_alive, (head, body), written, at

    def close(self) -> None:
        """No more writes by ``send`` (the event loop's, before it writes to the connection)."""
        with self._lock:
            self._open = False


def error_response(exc: AgentError) -> Response:
    """The JSON error answer for ``exc``, with the headers its status calls for."""
    status = http_status(exc)
    headers = None
    if isinstance(exc, MethodNotAllowedError):
        headers = {"Allow": ", ".join(exc.allowed)}
    elif isinstance(exc, UnauthorizedError):
        headers = {"WWW-Authenticate": 'Bearer realm="edge-agent"'}
    elif isinstance(exc, OverloadedError):
        headers = {"Retry-After": "1"}
    return Response(status, dumps(error_body(exc)), headers=headers)


class Router:
    """Routes by method and a path pattern with ``{name}`` or ``{name:regex}`` placeholders."""

    def __init__(self, not_found: Handler) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler, bool]] = []
        self._not_found = not_found

    def add(self, method: str, pattern: str, handler: Handler, *, control: bool = False) -> None:
        """``control``: over TCP, only with the bearer token (the Unix socket's permissions guard it otherwise)."""
        def placeholder(m: re.Match[str]) -> str:
            name, _, regex = m.group(1).partition(":")
            return f"(?P<{name}>{regex or '[^/]+'})"

        regex = re.sub(r"\{([^{}]+(?:\{[^{}]*\}[^{}]*)*)\}", placeholder, pattern)
        self._routes.append((method, re.compile(f"^{regex}$"), handler, control))

    def resolve(self, request: Request) -> tuple[Handler, bool]:
        """The handler of ``request`` (HEAD is served by GET's) and whether it is a control route.

        Raises:
            MethodNotAllowedError: the path is known, with other methods.
        """
        method = "GET" if request.method == "HEAD" else request.method
        path = request.path
        for route_method, regex, handler, control in self._routes:
            m = regex.match(path)
            if m is not None and route_method == method:
                request.params = m.groupdict()
                return handler, control
        allowed = {route_method for route_method, regex, _, _ in self._routes if regex.match(path) is not None}
        if allowed:
            if "GET" in allowed:
                allowed.add("HEAD")
            raise MethodNotAllowedError(f"method {request.method} not allowed on {path}", tuple(sorted(allowed)))
        return self._not_found, False


class _Refused(Exception):  # noqa: N818 - a signal, not an error
    """Raised from a parser callback to stop parsing a request that has been answered with an error."""


_IDLE, _HEAD, _BODY = 0, 1, 2
#: Body bytes past which chunks are gathered in one growing buffer rather than joined at the end.
_GROW_IN_PLACE = 1024 * 1024  # what a connection is reading: between requests, a head, a body


def _lacks_version(data: bytes) -> bool:
    """Whether ``data`` starts with a complete request line that has no HTTP version (HTTP/0.9):
    httptools would wait for headers that such a client never sends."""
    start = 0
    while start < len(data) and data[start] in b"\r\n":
        start += 1
    end = data.find(b"\n", start)
    return end != -1 and data.rfind(b" HTTP/", start, end) == -1


class _Connection(asyncio.Protocol):
    # Slots: past 30 attributes CPython (3.11+) stops sharing an instance dict's keys, and every
    # attribute access on the request path gets slower (about 0.5 µs per request here).
    __slots__ = ("answered", "body", "body_size", "chunked", "chunks", "counting", "deferred", "direct", "direct_lock",
                 "direct_sock", "drained", "eager", "fresh",
                 "head_size", "header_count", "headers", "held", "keep_alive", "limits", "local", "parser",
                 "paused_since", "pending", "read_paused", "reading", "refused", "server", "since",
                 "streaming", "task", "too_large", "transport", "upgrade_answered", "url", "wire", "write_paused")

    def __init__(self, server: HTTPServer, local: bool) -> None:
        self.server = server
        self.limits = server.limits
        self.local = local  # the Unix socket: no bearer token needed for control routes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # What is being read, and since when (the sweep derives the deadline from both).
        self.reading = _IDLE
        # time.perf_counter_ns() when the current head or body began, or (idle) about when the last answer
        # was written: the sweep moves it forward while the connection is being answered.
        self.since = 0
        self.wire = 0  # bytes fed since the head or body began (from the read after the one it began in)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_count = 0
        self.head_size = 0
        # The body read so far: its chunks; past _GROW_IN_PLACE bytes, one bytearray that grows in place
        # (a large body is never joined in one go on the event loop: 20 MB took ~10 ms).
        self.body: list[bytes] | bytearray = []
        self.chunks = 0  # chunks of the body (httptools calls ``on_body`` once per chunk)
        self.body_size = 0
        self.held = 0  # of the server's body budget, for the body being read
        self.chunked = False
        self.too_large = False
        self.refused = False
        self.upgrade_answered = False
        self.deferred: AgentError | None = None  # a refusal to write once the requests before it are answered
        self.pending: collections.deque[tuple[Request, bool]] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.streaming = False  # answering with a long-lived body: cancelled at stop, not waited for
        self.eager = False  # the next request may be answered inside this read (the first one of it)
        self.fresh = False  # the head beginning this read was measured whole by ``data_received``
        self.counting = True  # this head is measured header by header
        self.keep_alive = True
        self.answered = False  # a request of this connection has been answered (eviction spares it longer)
        self.read_paused = False
        self.write_paused = False
        self.paused_since = 0
        self.drained: asyncio.Future[None] | None = None
        # Answers written by the thread that computes them (``DirectAnswer``): the request's, while
        # its handler runs; a duplicate of the socket's descriptor for them, made on first use.
        self.direct: DirectAnswer | None = None
        self.direct_lock = threading.Lock()
        self.direct_sock: socket.socket | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        server = self.server
        if server.stopping:
            # Accepted just before the listener closed, but announced only now (a later loop turn on
            # 3.12+): serving it would race the models being unloaded.
            transport.close()
            return
        if len(server.connections) >= self.limits.max_connections and not server.make_room():
            server.count("refused_connection")
            self._refuse(OverloadedError(f"the agent is at its limit of {self.limits.max_connections} connections, "
                                         "all of them being answered: retry shortly"))
            return
        server.connections.add(self)
        transport.set_write_buffer_limits(high=self.limits.max_unsent)  # type: ignore[attr-defined]
        self.since = time.perf_counter_ns()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_direct()
        if self.direct_sock is not None:
            with self.direct_lock:  # after a send in progress, if any
                self.direct_sock.close()
            self.direct_sock = None
        # The parser holds this protocol (its callbacks) and this protocol the parser: a cycle that
        # only the cyclic GC's rare full collections free. Broken here, a closed connection is freed
        # at once (a client reconnecting per request piled up thousands of them between collections).
        self.parser = None  # type: ignore[assignment]  # never read after connection_lost
        server = self.server
        server.connections.discard(self)
        server.release(self.held)
        self.held = 0
        for request, _ in self.pending:
            server.release(request.held)
        self.pending.clear()
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_since = time.perf_counter_ns()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.paused_since = 0
        self._wake()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        reading = self.reading
        if reading:
            wire = self.wire = self.wire + len(data)
            if reading == _HEAD:
                if wire > self.limits.max_head:  # a head that never ends: refused before httptools buffers it
                    self._refuse(HeadTooLargeError(f"request head exceeds {self.limits.max_head} bytes"))
                    return
            elif self.chunked and wire - len(data) - self.body_size > self.limits.max_head + self.body_size // 8:
                # Tiny chunks (a Python callback each) or endless extensions and trailers, in what the
                # parser has seen (this read's data is not parsed yet: a fast client's large read of
                # big chunks is all data, not framing).
                self._refuse(ProtocolError("chunked body: framing out of proportion to its data"))
                return
        else:
            # The usual read: one whole request from its first byte. Its head is measured here in C
            # (find, count); only heads that span reads or follow another in the same read are
            # measured header by header (``counting``).
            limits = self.limits
            end = data.find(b"\r\n\r\n", 0, limits.max_head)
            # (A header line takes 4 bytes at least: a short head cannot hold too many.)
            # (Empty lines before a request, which the parser skips, would fool the find: measured slowly.)
            self.fresh = end > 0 and data[0] not in (13, 10) and (
                end < 4 * limits.max_headers or data.count(b"\r\n", 0, end) <= limits.max_headers)
        self.eager = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.upgrade_answered:  # answered as plain HTTP (allowed): nothing more is read from it
                self.refused = True
            else:
                self._refuse(ProtocolError("protocol upgrade is not supported"))
        except httptools.HttpParserError as exc:
            if not (self.refused or self.too_large):
                cause = exc.__context__
                if isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
                    log.warning("api.callback_failed", error=f"{type(cause).__name__}: {cause}")
                self._refuse(ProtocolError(f"malformed HTTP request: {exc}"))
        self.eager = False
        if self.reading == _HEAD and not reading and not self.header_count and not self.refused \
                and _lacks_version(data):
            # A head begun in this read with its request line complete but no version: HTTP/0.9,
            # whose client waits for an answer to that line alone. A 400, as h11 and Apache answer it.
            self._refuse(ProtocolError("HTTP/0.9 is not supported (no version in the request line): use HTTP/1.1"))

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.since = time.perf_counter_ns()
        self.reading, self.wire = _HEAD, 0
        self.counting, self.fresh = not self.fresh, False
        self.url, self.headers, self.header_count, self.head_size = b"", {}, 0, 0
        self.body, self.chunks, self.body_size, self.chunked, self.too_large = [], 0, 0, False, False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_url:
            self._refuse(URITooLongError(f"request target exceeds {self.limits.max_url} bytes"))
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here, judged once the head is complete: the read guard in ``data_received``
        # already bounds what one head can cost before that.
        if self.counting:
            self.header_count += 1
            self.head_size += len(name) + len(value) + 4
        if self.reading == _HEAD:  # trailers of a chunked body are counted, not kept
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        limits = self.limits
        if self.counting:
            if self.header_count > limits.max_headers:
                self._refuse(HeadTooLargeError(f"more than {limits.max_headers} header fields"))
                raise _Refused
            if self.head_size + len(self.url) > limits.max_head:
                self._refuse(HeadTooLargeError(f"request head exceeds {limits.max_head} bytes"))
                raise _Refused
            self.counting = False  # trailers: the chunked framing guard bounds them
        parser = self.parser
        self.keep_alive = keep_alive = parser.should_keep_alive()
        if not keep_alive or "connection" in self.headers:
            # An HTTP/1.1 request keeps alive by default, and needs no look at its version (formatted
            # into a string by httptools); any other version does not, without a Connection header.
            version = parser.get_http_version()
            if version not in ("1.1", "1.0"):
                self._refuse(ProtocolError("HTTP/0.9 is not supported: use HTTP/1.1") if version == "0.9" else
                             HTTPVersionError(f"HTTP/{version} is not supported: use HTTP/1.1"))
                raise _Refused
        self.reading, self.wire = _BODY, 0
        headers = self.headers
        length = headers.get("content-length")
        if length is not None or "transfer-encoding" in headers:
            self.since = time.perf_counter_ns()  # a body follows: its timeout counts from here
        if length is not None:
            size = int(length) if length.isdigit() else 0  # httptools refuses any other value
            if size > limits.max_body:
                self._too_large()
                return
            if size:
                server = self.server
                if server.buffered + size > limits.max_buffered:
                    self._over_budget()
                server.buffered += size
                self.held = size
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.chunked = True
        if headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self._end_direct()  # (a pipelined request's: the answer being computed is written by the loop)
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        size = self.body_size = self.body_size + len(chunk)
        if self.too_large:
            # Keep reading (and dropping) so the client sees the 413 instead of a broken pipe.
            if size > 4 * self.limits.max_body and self.transport is not None:
                self.transport.close()
            return
        if size > self.limits.max_body:
            self._too_large()
            return
        if size > self.held:  # a chunked body reserves as it grows
            self._reserve(size - self.held)
        chunks = self.chunks = self.chunks + 1
        body = self.body
        if isinstance(body, list):
            if size <= _GROW_IN_PLACE:
                body.append(chunk)
            else:
                grown = self.body = bytearray()
                for part in body:
                    grown += part
                grown += chunk
        else:
            body += chunk  # in place
        if self.chunked and chunks > 1024 and size < 64 * chunks:
            # One Python call per chunk: tiny chunks would keep the loop busy within a single read.
            self._refuse(ProtocolError("chunked body: chunks average under 64 bytes"))
            raise _Refused

    def on_message_complete(self) -> None:
        if self.too_large:
            if self.transport is not None and self.deferred is None:
                self.transport.close()
            return
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(ProtocolError(f"invalid request target {self.url[:100]!r}"))
            raise _Refused from None
        self.reading = _IDLE  # answering: no read deadline
        method = self.parser.get_method().decode("ascii")
        parts = self.body
        body = parts if isinstance(parts, bytearray) else parts[0] if len(parts) == 1 else b"".join(parts)
        request = Request(method, (parsed.path or b"/").decode("utf-8", "replace"), self.headers, body,
                          received=time.perf_counter_ns(), held=self.held, local=self.local)
        self.body, self.chunks, self.held = [], 0, 0
        keep_alive = self.keep_alive
        if self.parser.should_upgrade():  # ignored (RFC 9110 allows it): answered, then closed
            self.upgrade_answered, keep_alive = True, False
        self.pending.append((request, keep_alive))
        if self.task is None:
            self._start_serving(self.eager)
        self.eager = False
        if len(self.pending) > self.limits.max_pipelined:
            self._update_reading()  # a client pipelining without reading answers

    # -- limits ----------------------------------------------------------------------------------
    def _reserve(self, size: int) -> None:
        """Take ``size`` bytes of the server's body budget for the body being read, or refuse it (503)."""
        server = self.server
        if server.buffered + size > self.limits.max_buffered:
            self._over_budget()
        server.buffered += size
        self.held += size

    def _over_budget(self) -> None:
        self.server.count("over_budget")
        self._refuse(OverloadedError(f"the agent is holding {self.limits.max_buffered} bytes of request "
                                     "bodies: retry shortly"))
        raise _Refused

    def _too_large(self) -> None:
        """Answer 413 at once and drop the rest of the body (closed once it has been read)."""
        self.too_large = True
        self.body, self.chunks = [], 0
        self.server.release(self.held)
        self.held = 0
        self._send_error(PayloadTooLargeError(f"request body exceeds the limit of {self.limits.max_body} bytes"))

    def _refuse(self, exc: AgentError) -> None:
        """A protocol-level refusal: answered, then the connection closes; nothing more is read."""
        self.refused = True
        self.server.release(self.held)
        self.held = 0
        self._send_error(exc)
        if self.deferred is None and self.transport is not None:
            self.transport.close()

    def _send_error(self, exc: AgentError) -> None:
        """Write ``exc``'s answer now, or after the requests before it (answers go out in order);
        then the connection closes."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.server.count(exc.code)
        if self.task is None and not self.pending:
            transport.write(encode(error_response(exc), keep_alive=False))
        elif self.deferred is None:
            self.deferred = exc
            self._update_reading()

    def expire(self, now: int) -> None:
        """The sweep's check (``now`` from ``time.perf_counter_ns``): close the connection if it is
        past its deadline. A head has ``header_timeout`` from its first byte, a body
        ``body_timeout`` from the end of its head; an idle connection ``keep_alive`` from its last
        answer (or from its start); one being answered has none, but its client must read its
        answers within ``send_timeout``."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        limits = self.limits
        if self.paused_since and now - self.paused_since > limits.send_timeout * 1e9:
            self.server.count("send_timeout")
            transport.abort()  # its client reads nothing: what is unsent would never be
            return
        reading = self.reading
        if reading == _IDLE:
            if self.task is not None or self.pending or self.streaming:
                self.since = now  # being answered: idle time counts from about its end (a tick at most)
                return
            allowed = limits.keep_alive
        else:
            allowed = limits.header_timeout if reading == _HEAD else limits.body_timeout
        if now - self.since <= allowed * 1e9:
            return
        if reading == _IDLE:
            self.server.count("idle_timeout")
            transport.close()
        elif self.too_large or self.refused:
            transport.close()
        else:
            what = "head" if reading == _HEAD else "body"
            self._refuse(RequestTimeoutError(f"request {what} not received in time"))

    def evict(self) -> None:
        """Make room for a new connection: this one is idle or stalled."""
        self.server.connections.discard(self)
        self.server.count("evicted")
        if self.transport is not None:
            self.transport.close()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self.write_paused or self.deferred is not None or len(self.pending) > self.limits.max_pipelined
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _wake(self) -> None:
        waiter = self.drained
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _drain(self) -> None:
        """Wait until the client has read enough of what was written (or is gone)."""
        while self.write_paused and self.transport is not None and not self.transport.is_closing():
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained

    # -- answering -------------------------------------------------------------------------------
    def _start_serving(self, eager: bool) -> None:
        """Answer the pending requests in a task of their own (one per busy connection).

        On Python 3.12+ the task starts eagerly: a predict that runs inline never waits, so it
        is answered right here, with no extra turn of the event loop (~10-20 µs per request on
        a small board); only a handler that waits is scheduled like any task. Requests pipelined
        behind the first one of a read start on the next turn, after other connections' reads.
        """
        task = _spawn(self._serve(), name="http-connection", eager=eager)
        self.task = None if task.done() else task  # an eager task may already have finished (and cleared it)

    async def _serve(self) -> None:
        try:
            while self.pending:
                if self.write_paused:
                    await self._drain()
                    if not self.pending:
                        return
                request, keep_alive = self.pending.popleft()
                server = self.server
                direct = None
                try:
                    handler, control = server.router.resolve(request)
                    if control and not self.local:
                        server.authorize(request)
                except AgentError as exc:
                    response = error_response(exc)
                else:
                    server.in_flight += 1
                    direct = request.direct = self._direct(request, keep_alive)
                    try:
                        response = await handler(request)
                    finally:
                        server.in_flight -= 1
                        if request.held:
                            server.buffered -= request.held
                        if direct is not None:
                            self._end_direct()
                keep_alive = keep_alive and not server.stopping
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                head_only = request.method == "HEAD"
                if response.stream is not None:
                    self.streaming = True
                    await self._stream(response, head_only)
                    return
                if direct is not None and direct.data is not None:  # written by the thread that computed it
                    keep_alive = keep_alive and direct.keep_alive
                    head, body = direct.data
                    written = direct.written
                    if written < len(head):
                        transport.writelines([memoryview(head)[written:], body])
                    elif written < len(head) + len(body):
                        transport.write(memoryview(body)[written - len(head):])
                    sent = direct.at
                elif len(response.body) > _JOIN_MAX and not head_only:
                    head = encode_head(response, keep_alive)
                    sent = time.perf_counter_ns()  # as the write begins (it may wake the client first)
                    transport.writelines([head, response.body])
                else:
                    data = encode(response, keep_alive, head_only)
                    sent = time.perf_counter_ns()
                    transport.write(data)
                self.answered = True
                if response.sent is not None:
                    response.sent(sent)
                if not keep_alive:
                    transport.close()
                    return
                if self.pending:
                    self._update_reading()
                    await asyncio.sleep(0)  # pipelined: one request per turn, other connections in between
        finally:
            self.task = None
            if self.deferred is not None and not self.pending:  # a refusal behind the answered requests
                transport = self.transport
                if transport is not None and not transport.is_closing() and not self.streaming:
                    transport.write(encode(error_response(self.deferred), keep_alive=False))
                    transport.close()
            if self.read_paused or self.write_paused or self.deferred is not None:
                self._update_reading()
            self.server.idle.set()

    def _direct(self, request: Request, keep_alive: bool) -> DirectAnswer | None:
        """A ``DirectAnswer`` for ``request``, when nothing unsent is queued on the connection."""
        transport = self.transport
        if (request.method != "POST" or transport is None or self.write_paused or transport.is_closing()
                or transport.get_write_buffer_size()):
            return None  # (the answers that threads compute are predicts: POST)
        sock = self.direct_sock
        if sock is None:
            raw = transport.get_extra_info("socket")
            if raw is None:
                return None
            # A duplicate descriptor: never closed under a writing thread. (The duplicate shares the
            # socket's non-blocking mode; it must never be changed through it.)
            sock = self.direct_sock = socket.socket(raw.family, raw.type, raw.proto, os.dup(raw.fileno()))
        self.direct = DirectAnswer(sock, self.direct_lock, keep_alive, self.server)
        return self.direct

    def _end_direct(self) -> None:
        """Stop the current request's ``DirectAnswer`` (before the event loop writes itself)."""
        direct = self.direct
        if direct is not None:
            direct.close()
            self.direct = None

    async def _stream(self, response: Response, head_only: bool) -> None:
        """Head without a length, then chunks until the producer ends or the client goes away."""
        assert self.transport is not None and response.stream is not None
        head = (f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
                f"Content-Type: {response.content_type}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n")
        self.transport.write(head.encode("latin-1"))
        try:
            if head_only:
                return
            async for chunk in response.stream:
                if self.transport.is_closing() or self.server.stopping:
                    break
                self.transport.write(chunk)
                if self.write_paused:
                    await self._drain()
        finally:
            await response.stream.aclose()  # type: ignore[attr-defined]
            self.transport.close()

    def close_if_idle(self) -> None:
        if self.task is None and self.transport is not None:
            self.transport.close()


def _spawn(coro: Coroutine[Any, Any, None], name: str, eager: bool = True) -> asyncio.Task[None]:
    """A task that starts at once where the interpreter can (3.12+) and ``eager``, else on the next loop turn."""
    loop = asyncio.get_running_loop()
    if _EAGER and eager:
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)  # type: ignore[call-arg]
    return loop.create_task(coro, name=name)


_EAGER = sys.version_info >= (3, 12)
#: Connections the kernel queues before they are accepted. asyncio's default (100) fills during a
#: connection flood, and a client connecting then gets EAGAIN (Unix sockets) before the agent can
#: make room; accepted connections are capped by ``Limits.max_connections`` instead.
BACKLOG = 1024


class HTTPServer:
    """Serves ``router`` on any number of listening sockets within ``limits``; ``stop`` drains in-flight requests.

    ``token``: the bearer token that control routes need over TCP (None: TCP serves no control route).
    """

    def __init__(self, router: Router, limits: Limits | None = None, *, token: bytes | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        """``on_stop``: called once every connection is closed (the routes' helpers)."""
        self.router = router
        self.on_stop = on_stop
        self.limits = limits or Limits()
        self.token = token
        self.connections: set[_Connection] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.in_flight = 0
        self.buffered = 0  # request body bytes held, all connections together
        self.refusals: collections.Counter[str] = collections.Counter()  # by code or reason, for status and benches
        self.stopping = False
        self.idle = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    async def listen_unix(self, sock: object) -> None:
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_unix_server(lambda: _Connection(self, local=True), sock=sock,  # type: ignore[arg-type]
                                                          backlog=BACKLOG))
        self._start_sweeper()

    async def listen_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.servers.append(await loop.create_server(lambda: _Connection(self, local=False), host, port,
                                                     backlog=BACKLOG))
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="http-timeouts")

    async def _sweep(self) -> None:
        tick = self.limits.tick
        while True:
            await asyncio.sleep(tick)
            now = time.perf_counter_ns()
            for conn in list(self.connections):
                try:
                    conn.expire(now)
                except Exception:
                    log.exception("api.sweep_failed")

    def count(self, reason: str) -> None:
        self.refusals[reason] += 1

    def release(self, size: int) -> None:
        self.buffered -= size

    def make_room(self) -> bool:
        """Close a connection that is not being answered so a new one can be served: one that never
        completed a request first (an idle flood, a slowloris head), then the one gone longest
        without a request (idle since its last answer, or stuck in a head or body since it began).
        False when every connection is being answered."""
        victim: _Connection | None = None
        best: tuple[bool, float] = (True, math.inf)
        for conn in self.connections:
            if conn.task is not None or conn.pending or conn.streaming:
                continue
            key = (conn.answered, conn.since)
            if key < best:
                victim, best = conn, key
        if victim is None:
            return False
        victim.evict()
        return True

    def authorize(self, request: Request) -> None:
        """A control route over TCP.

        Raises:
            ForbiddenError: no token is configured: control routes are for the Unix socket only.
            UnauthorizedError: the request does not carry the token.
        """
        if self.token is None:
            raise ForbiddenError(f"{request.path} is not served over TCP without a token (api.tcp_token_file): "
                                 "use the Unix socket")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            raise UnauthorizedError(f"{request.path} over TCP needs 'Authorization: Bearer <token>'")

    async def stop(self, timeout: float) -> None:
        """Stop accepting, finish what is in flight (up to ``timeout``), close every connection.

        Long-lived answers (live result feeds) are cancelled at once: they never end by themselves.
        """
        self.stopping = True
        for server in self.servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
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
        if self.on_stop is not None:
            self.on_stop()
