"""A TUF fetcher over HTTP that resumes interrupted target downloads with ``Range``.

Only *immutable* URLs are resumed: with consistent snapshots every target URL carries the
file's hash (``targets/<name>/<sha256>.<file>``), so bytes kept from an earlier attempt
belong to the same file. Metadata (``timestamp.json`` changes in place) is always fetched
whole. The fetcher only moves bytes: TUF verifies length and hashes of the complete file
afterwards, and a partial file is discarded once the download completes, verified or not.

Limits are enforced while streaming: the hard ``max_bytes`` cap and TUF's per-file length,
an optional bandwidth limit, and connect/read timeouts (raised as TUF download errors,
which :mod:`cloud_sync.updater.client` maps to :class:`cloud_sync.errors.DownloadError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import structlog
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

log = structlog.get_logger(__name__)

Progress = Callable[[str, int, "int | None"], None]
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def is_immutable_target(url: str) -> bool:
    """True for hash-prefixed target URLs (safe to resume), False for metadata."""
    return "/targets/" in url and "/metadata/" not in url


class ResumableFetcher(FetcherInterface):
    """HTTP(S) fetcher with resume, a hard size cap, a bandwidth limit and progress events.

    Args:
        cache_dir: where partial downloads are kept between attempts (keyed by URL).
        max_bytes: hard cap for any single file, on top of TUF's own length limits.
        bandwidth: bytes per second, or None for no limit.
        progress: ``callback(url, received, total_or_None)`` after every chunk.
        timeout: read timeout (max gap between bytes) in seconds; connect_timeout likewise.
        resumable: which URLs may be resumed (default: hash-prefixed targets only).
    """

    def __init__(self, cache_dir: Path, *, max_bytes: int = 1 << 30, bandwidth: int | None = None,
                 progress: Progress | None = None, timeout: float = 30.0, connect_timeout: float = 10.0,
                 chunk_size: int = 1 << 16, resumable: Callable[[str], bool] = is_immutable_target,
                 user_agent: str = "edge-agent-updater") -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError("bandwidth must be positive bytes/s or None")
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

    def _request(self, url: str, offset: int) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            return self._pool.request("GET", url, headers=headers, preload_content=False,
                                      decode_content=False, timeout=self._timeout)
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"timed out connecting to {url}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc}") from exc

    def _download_into(self, url: str, fh: IO[bytes], offset: int, limit: int) -> int:
        """Append the rest of ``url`` to ``fh`` (which holds ``offset`` bytes); return the total size."""
        resp = self._request(url, offset)
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
            received = self._copy(url, resp, fh, offset=offset, total=total, limit=limit)
            done = True
            return received
        finally:
            if not done:
                resp.close()  # unread body (error page, endless data): never reuse the connection
            resp.release_conn()

    def _copy(self, url: str, resp: urllib3.BaseHTTPResponse, fh: IO[bytes], *, offset: int, total: int | None,
              limit: int) -> int:
        received = offset
        session = 0
        started = time.monotonic()
        if self.progress:
            self.progress(url, received, total)
        try:
            for chunk in resp.stream(self.chunk_size, decode_content=False):
                received += len(chunk)
                if received > limit:
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"{url}: received more than the allowed {limit} bytes")
                fh.write(chunk)
                fh.flush()
                session += len(chunk)
                if self.progress:
                    self.progress(url, received, total)
                if self.bandwidth:
                    ahead = session / self.bandwidth - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"{url}: read timed out after {received} bytes") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: transfer interrupted after {received} bytes: {exc}") from exc
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
