"""A TUF fetcher over HTTP that resumes interrupted target downloads with ``Range``.

Only *immutable* URLs are resumed: with consistent snapshots every target URL carries the
file's hash (``targets/<name>/<sha256>.<file>``), so bytes kept from an earlier attempt
belong to the same file. Metadata (``timestamp.json`` changes in place) is always fetched
whole. The fetcher only moves bytes: TUF verifies length and hashes of the complete file
afterwards, and a partial file is discarded once the download completes, verified or not.

Limits are enforced while streaming: the hard ``max_bytes`` cap and TUF's per-file length,
an optional bandwidth limit, connect/read timeouts, and TUF's slow-retrieval defence: every
request must finish within a deadline and, after a grace period, keep a minimum average rate.
A read timeout alone is not enough: a mirror that drips one byte every two seconds never trips
it, in the headers or the body. A blocked read cannot be interrupted from its own thread, so a
small monitor thread per request (:class:`_Watch`) shuts the socket down when either limit is
passed; the socket is handed to it by the connection class when the request is sent. All of
these are raised as TUF download errors (``SlowRetrievalError`` for the timeouts), which
:mod:`cloud_sync.updater.client` maps to :class:`cloud_sync.errors.DownloadError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import structlog
import urllib3
import urllib3.connection
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

log = structlog.get_logger(__name__)

Progress = Callable[[str, int, "int | None"], None]
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def is_immutable_target(url: str) -> bool:
    """True for hash-prefixed target URLs (safe to resume), False for metadata."""
    return "/targets/" in url and "/metadata/" not in url


class _Watch:
    """Slow-retrieval guard of one request: past ``deadline_s``, or under ``min_rate`` bytes/s on
    average once ``grace_s`` have passed, the socket is shut down and ``reason`` says why."""

    INTERVAL_S = 0.2

    def __init__(self, deadline_s: float, min_rate: int, grace_s: float) -> None:
        self.deadline_s = deadline_s
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.started = time.monotonic()
        self.received = 0  # body bytes of this request, updated by the reading thread
        self.reason: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-watch", daemon=True)
        self._thread.start()

    def verdict(self, now: float) -> str | None:
        """Why the request must stop now, or None (pure)."""
        elapsed = now - self.started
        if elapsed > self.deadline_s:
            return f"not complete after the {self.deadline_s:g} s deadline ({self.received} bytes received)"
        if elapsed > self.grace_s and self.received < self.min_rate * elapsed:
            return (f"{self.received / elapsed:.0f} bytes/s on average over {elapsed:.1f} s is under the "
                    f"{self.min_rate} bytes/s minimum")
        return None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.reason is not None:
                _shut(sock)

    def _run(self) -> None:
        while not self._done.wait(self.INTERVAL_S):
            reason = self.verdict(time.monotonic())
            if reason is not None:
                with self._lock:
                    self.reason = reason
                    if self._sock is not None:
                        _shut(self._sock)
                return

    def close(self) -> None:
        """Stop watching (before the connection goes back to the pool: it is never shut down later)."""
        self._done.set()
        with self._lock:
            self._sock = None


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket: wakes a reader blocked in another thread.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()  # .watch: the _Watch of the request this thread is making


class _WatchedMixin:
    """Hands the socket to the current request's watch before the response headers are read."""

    sock: socket.socket | None

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        watch: _Watch | None = getattr(_current, "watch", None)
        if watch is not None and self.sock is not None:
            watch.attach(self.sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_WatchedMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class ResumableFetcher(FetcherInterface):
    """HTTP(S) fetcher with resume, a hard size cap, a bandwidth limit and progress events.

    Args:
        cache_dir: where partial downloads are kept between attempts (keyed by URL).
        max_bytes: hard cap for any single file, on top of TUF's own length limits.
        bandwidth: bytes per second, or None for no limit.
        progress: ``callback(url, received, total_or_None)`` after every chunk.
        timeout: read timeout (max gap between bytes) in seconds; connect_timeout likewise.
        deadline: seconds one request (one file, or the rest of a resumed one) may take in all.
        min_rate: bytes/s a request must average once ``rate_grace`` seconds have passed.
        resumable: which URLs may be resumed (default: hash-prefixed targets only).
    """

    def __init__(self, cache_dir: Path, *, max_bytes: int = 1 << 30, bandwidth: int | None = None,
                 progress: Progress | None = None, timeout: float = 30.0, connect_timeout: float = 10.0,
                 deadline: float = 3600.0, min_rate: int = 1024, rate_grace: float = 10.0,
                 chunk_size: int = 1 << 16, resumable: Callable[[str], bool] = is_immutable_target,
                 user_agent: str = "edge-agent-updater") -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("bandwidth must be positive bytes/s or None")
        if deadline <= 0 or min_rate <= 0 or rate_grace < 0:
            raise ValueError("deadline and min_rate must be positive, rate_grace >= 0")
        self.deadline = deadline
        self.min_rate = min_rate
        self.rate_grace = rate_grace
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.bandwidth = bandwidth
        self.progress = progress
        self.chunk_size = min(chunk_size, max(1024, bandwidth // 8)) if bandwidth else chunk_size
        self.resumable = resumable
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=timeout)
        self._pool = urllib3.PoolManager(
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        )
        self._pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    # -- partial files -------------------------------------------------------------------

    def partial_path(self, url: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()}.part"

    def discard_partial(self, url: str) -> None:
        self.partial_path(url).unlink(missing_ok=True)

    # -- FetcherInterface ------------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Stream ``url`` whole (no resume); used by ``fetch()`` callers outside TUF's download path."""
        with tempfile.TemporaryFile() as tmp:
            self._download_into(url, tmp, 0, self.max_bytes)
            tmp.seek(0)
            while chunk := tmp.read(self.chunk_size):
                yield chunk

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` (at most ``max_length`` bytes), resuming a kept partial when allowed.

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: more than the allowed bytes.
            tuf.api.exceptions.DownloadHTTPError: an HTTP error status.
            tuf.api.exceptions.SlowRetrievalError: a connect or read timeout.
            tuf.api.exceptions.DownloadError: any other transport failure.
        """
        limit = min(max_length, self.max_bytes)
        if not self.resumable(url):
            with tempfile.TemporaryFile() as tmp:
                self._download_into(url, tmp, 0, limit)
                tmp.seek(0)
                yield tmp
            return
        part = self.partial_path(url)
        part.parent.mkdir(parents=True, exist_ok=True)
        fh = part.open("a+b")
        try:
            offset = fh.seek(0, 2)
            if offset > limit:
                fh.truncate(0)
                offset = 0
            if offset:
                log.info("fetch.resume", url=url, offset=offset)
            self._download_into(url, fh, offset, limit)
        except tuf_exc.DownloadLengthMismatchError:
            fh.close()
            part.unlink(missing_ok=True)
            raise
        except BaseException:
            fh.close()  # interrupted: keep the partial for the next attempt
            raise
        try:
            fh.seek(0)
            yield fh
        finally:
            # Complete, verified or not: the partial has served its purpose (a corrupt one
            # must not be resumed again).
            fh.close()
            part.unlink(missing_ok=True)

    # -- HTTP ------------------------------------------------------------------------------

    def _request(self, url: str, offset: int, watch: _Watch) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        _current.watch = watch
        try:
            return self._pool.request("GET", url, headers=headers, preload_content=False,
                                      decode_content=False, timeout=self._timeout)
        except urllib3.exceptions.HTTPError as exc:
            if watch.reason is not None:
                raise tuf_exc.SlowRetrievalError(f"{url}: {watch.reason}") from exc
            if isinstance(exc, urllib3.exceptions.TimeoutError):
                raise tuf_exc.SlowRetrievalError(f"timed out connecting to {url}") from exc
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc}") from exc
        finally:
            _current.watch = None

    def _download_into(self, url: str, fh: IO[bytes], offset: int, limit: int) -> int:
        """Append the rest of ``url`` to ``fh`` (which holds ``offset`` bytes); return the total size."""
        watch = _Watch(self.deadline, self.min_rate, self.rate_grace)
        try:
            return self._download_watched(url, fh, offset, limit, watch)
        finally:
            watch.close()

    def _download_watched(self, url: str, fh: IO[bytes], offset: int, limit: int, watch: _Watch) -> int:
        resp = self._request(url, offset, watch)
        done = False
        try:
            total: int | None
            if offset and resp.status == 416:
                # Our partial is at or past the end: complete if the sizes agree, else start over.
                size = _content_range_total(resp.headers.get("Content-Range"))
                if size == offset:
                    return offset
                resp.close()
                log.info("fetch.restart", url=url, reason="range_not_satisfiable", offset=offset)
                fh.seek(0)
                fh.truncate()
                return self._download_into(url, fh, 0, limit)
            if resp.status >= 400:
                raise tuf_exc.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
            if offset and resp.status == 206:
                start, size = _parse_content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    raise tuf_exc.DownloadError(f"server resumed {url} at byte {start}, asked for {offset}")
                total = size
            else:
                if offset:
                    log.info("fetch.restart", url=url, reason="range_ignored", status=resp.status, offset=offset)
                    fh.seek(0)
                    fh.truncate()
                    offset = 0
                if resp.status != 200:
                    raise tuf_exc.DownloadHTTPError(f"unexpected HTTP {resp.status} for {url}", resp.status)
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            fh.seek(0, 2)
            received = self._copy(url, resp, fh, offset=offset, total=total, limit=limit, watch=watch)
            done = True
            return received
        finally:
            if not done:
                resp.close()  # unread body (error page, endless data): never reuse the connection
            watch.close()  # before the connection can be reused: the watch must never shut it down later
            resp.release_conn()

    def _copy(self, url: str, resp: urllib3.BaseHTTPResponse, fh: IO[bytes], *, offset: int, total: int | None,
              limit: int, watch: _Watch) -> int:
        received = offset
        session = 0
        started = time.monotonic()
        if self.progress:
            self.progress(url, received, total)
        try:
            # read1: what has arrived, without waiting for a full chunk, so the watch sees the real rate.
            while chunk := resp.read1(self.chunk_size, decode_content=False):
                if watch.reason is not None:
                    raise tuf_exc.SlowRetrievalError(f"{url}: {watch.reason}")
                received += len(chunk)
                if received > limit:
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"{url}: received more than the allowed {limit} bytes")
                fh.write(chunk)
                fh.flush()
                session += len(chunk)
                watch.received = session
                if self.progress:
                    self.progress(url, received, total)
                if self.bandwidth:
                    ahead = session / self.bandwidth - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if watch.reason is not None:  # the watch shut the socket: whatever the read raised, this is why
                raise tuf_exc.SlowRetrievalError(f"{url}: {watch.reason}") from exc
            if isinstance(exc, urllib3.exceptions.TimeoutError):
                raise tuf_exc.SlowRetrievalError(f"{url}: read timed out after {received} bytes") from exc
            if isinstance(exc, OSError):
                raise
            raise tuf_exc.DownloadError(f"{url}: transfer interrupted after {received} bytes: {exc}") from exc
        if watch.reason is not None:  # shut down just as a body without a length "ended": it did not
            raise tuf_exc.SlowRetrievalError(f"{url}: {watch.reason}")
        log.debug("fetch.complete", url=url, bytes=received, resumed_from=offset)
        return received


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    match = CONTENT_RANGE_RE.match((value or "").strip())
    if not match:
        raise tuf_exc.DownloadError(f"bad Content-Range {value!r}")
    size = match.group(3)
    return int(match.group(1)), None if size == "*" else int(size)


def _content_range_total(value: str | None) -> int | None:
    match = re.match(r"^bytes \*/(\d+)$", (value or "").strip())
    return int(match.group(1)) if match else None
