"""Development HTTP server for a repository directory, with single-range ``Range`` support.

Production serves the same directory from any static host or object store; this server
exists so a laptop or a test can play the repository. It serves regular files under the
root only (no listings, no symlinks out), answers ``Range: bytes=...`` with 206 and
``Content-Range``, and unsatisfiable or malformed ranges with 416. Loopback by default.
"""

from __future__ import annotations

import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import structlog

log = structlog.get_logger(__name__)

CHUNK = 1 << 16
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(Exception):  # noqa: N818 - maps to HTTP 416, not an error of ours
    """The Range header cannot be served for this file."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` inclusive for a single ``bytes=`` range, ``None`` to serve the whole file.

    Multiple ranges are not supported and are ignored (RFC 9110 allows serving 200).

    Raises:
        RangeNotSatisfiable: malformed, or no byte of the range is inside the file.
    """
    header = header.strip()
    if "," in header:
        return None
    match = RANGE_RE.match(header)
    if not match or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable(header)
    start_s, end_s = match.groups()
    if start_s == "":  # suffix range: the last N bytes
        suffix = int(end_s)
        if suffix == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - suffix), size - 1
    start = int(start_s)
    end = size - 1 if end_s == "" else min(int(end_s), size - 1)
    if start >= size or (end_s != "" and int(end_s) < start):
        raise RangeNotSatisfiable(header)
    return start, end


class RepoRequestHandler(BaseHTTPRequestHandler):
    """GET/HEAD of files under ``server.root``. Subclass and override hooks to inject faults."""

    server: RepoHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "edge-fleet-repo/1"

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: its business
            log.debug("repo.client_disconnected", client=self.client_address[0])

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def resolve(self) -> Path | None:
        """The file a request names, or None (outside the root, missing, not a regular file)."""
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        root = self.server.root
        # Dot files (the writer's lock, half-written ``.tmp`` files) are never served.
        if any(part in ("..", "") or part.startswith(".") for part in rel.split("/")) or "\x00" in rel:
            return None
        path = root / rel
        try:
            if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(root):
                return None
        except OSError:
            return None
        return path

    def _serve(self, *, body: bool) -> None:
        path = self.resolve()
        range_header = self.headers.get("Range")
        self.server.record(self.command, self.path, range_header)
        if path is None:
            self._error(HTTPStatus.NOT_FOUND)
            return
        with path.open("rb") as fh:
            size = path.stat().st_size
            try:
                span = parse_range(range_header, size) if range_header else None
            except RangeNotSatisfiable:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = span if span else (0, size - 1)
            length = max(0, last - first + 1)
            if span:
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                fh.seek(first)
                self.send_body(fh, length)

    def send_body(self, fh: BinaryIO, length: int) -> None:
        """Copy ``length`` bytes of ``fh`` to the client (the fault-injection hook)."""
        remaining = length
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                break
            self.wfile.write(chunk)
            remaining -= len(chunk)

    def _error(self, status: HTTPStatus) -> None:
        payload = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("repo.http", client=self.client_address[0], message=format % args)


class RepoHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server over a repository root that records the requests it saw."""

    daemon_threads = True

    def __init__(self, root: Path, address: tuple[str, int],
                 handler: type[RepoRequestHandler] = RepoRequestHandler) -> None:
        self.root = Path(root).resolve()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))
        log.info("repo.request", method=method, path=path, range=range_header)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"


def make_server(repo_dir: Path, host: str = "127.0.0.1", port: int = 0,
                handler: type[RepoRequestHandler] = RepoRequestHandler) -> RepoHTTPServer:
    """Bind (port 0 picks a free one) without serving yet; call ``serve_forever`` or ``serve``."""
    return RepoHTTPServer(Path(repo_dir), (host, port), handler)


def serve(repo_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``repo_dir`` until interrupted (blocking)."""
    server = make_server(repo_dir, host, port)
    log.info("repo.serving", url=server.url, root=str(server.root))
    try:
        server.serve_forever()
    finally:
        server.server_close()
