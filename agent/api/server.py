"""The API's routes and the Unix-socket binding.

The routes see two things: the model catalogue (the data plane: metadata and predict) and the
operations facade (everything else), as KServe's REST endpoints see only a data plane. Errors
are mapped to status codes once (``agent.api.errors``); a handler never lets an exception reach
the HTTP layer, so one bad request cannot disturb others.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import stat
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent.api import frames, oip, tfserving
from agent.api.codec import dumps, loads
from agent.api.errors import error_body, http_status
from agent.api.http import Handler, HTTPServer, Limits, Request, Response, Router
from agent.api.offload import JsonDecoder
from agent.api.shadow import shadow_args
from agent.api.shm import SharedMemory
from agent.config import ApiSection
from agent.core.metrics import Metrics
from agent.core.ports import ModelCatalog
from agent.errors import AgentError, ConfigError, ForbiddenError, RequestError
from agent.models.stats import Timing
from agent.models.worker import Outputs
from agent.operations import Operations

log = structlog.get_logger(__name__)


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, dumps(value))


def _version(request: Request) -> int | None:
    raw = request.params.get("version")
    if raw is None:
        return None
    # ASCII digits only ("²".isdigit() is true), and few of them (int() refuses over 4300 digits).
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or int(raw) < 1:
        raise RequestError(f"version must be a positive integer, got {raw[:40]!r}")
    return int(raw)


def _shadow_version(request: Request) -> int | None:
    """Promote and discard: the shadow's version from an optional ``{"version": N}`` body."""
    body = loads(request.body) if request.body else {}
    if not isinstance(body, dict) or set(body) - {"version"}:
        raise RequestError("request body must be empty or {\"version\": N}")
    version = body.get("version")
    if version is not None and (type(version) is not int or not 1 <= version <= 2**31 - 1):
        raise RequestError("'version' must be a positive integer or null")
    return version


def _region(request: Request) -> str | None:
    """The region named in the path (percent-decoded: clients quote it), or None for all."""
    raw = request.params.get("region")
    return None if raw is None else urllib.parse.unquote(raw)


def _guard(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except AgentError as exc:
            return _json(error_body(exc), http_status(exc))
        except Exception as exc:
            log.exception("api.unhandled", path=request.path)
            return _json({"error": f"internal error: {type(exc).__name__}", "code": "internal"}, 500)

    return wrapped


class Routes:
    def __init__(self, ops: Operations, models: ModelCatalog, metrics: Metrics, *,
                 json_offload_bytes: int = 128 * 1024, shm: SharedMemory | None = None,
                 tcp_shared_memory: bool = False) -> None:
        self.ops = ops
        self.models = models
        self.metrics = metrics
        self._plans: oip.Plans = {}  # binary infer headers already decoded
        self.json_offload_bytes = json_offload_bytes  # larger JSON is decoded in a helper process
        self.decoder = JsonDecoder()
        self.shm = shm if shm is not None else SharedMemory()
        self.tcp_shared_memory = tcp_shared_memory  # else TCP clients may not name shared memory

    def _shm(self, request: Request) -> SharedMemory | None:
        """The regions this request may use: None over TCP unless ``api.tcp_shared_memory``."""
        return self.shm if request.local or self.tcp_shared_memory else None

    def _shm_endpoint(self, request: Request) -> SharedMemory:
        shm = self._shm(request)
        if shm is None:
            raise ForbiddenError("system shared memory is not served over TCP unless api.tcp_shared_memory = true")
        return shm

    def close(self) -> None:
        """The routes' helpers, once every connection is closed: the decoder, the mapped regions."""
        self.decoder.close()
        self.shm.close()

    # -- TF Serving v1 --------------------------------------------------------------------
    async def v1_status(self, request: Request) -> Response:
        name, version = request.params["name"], _version(request)
        models = self.models
        if not models.known(name) or (version is not None
                                      and not any(f.name == name and f.version == version
                                                  for f in models.failures())):
            models.get(name, version)  # raises the 404 for an unknown name or version
        states = [s for s in models.version_states(name) if version is None or s["version"] == version]
        return _json(tfserving.version_status(states))

    async def v1_metadata(self, request: Request) -> Response:
        model = self.models.get(request.params["name"], _version(request))
        return _json(tfserving.metadata(model))

    async def v1_predict(self, request: Request) -> Response:
        model = self.models.get(request.params["name"], _version(request))
        with self._observed(model, "v1", request) as timing:
            body = request.body
            decoded = await self.decoder.decode(body) if len(body) > self.json_offload_bytes else None
            feeds, fmt, raw = tfserving.parse_predict(body, model, decoded)
            sent = functools.partial(model.stats.succeeded, timing)
            direct = request.direct

            def answer(outputs: Outputs) -> Response:
                response = Response(200, dumps(tfserving.format_predict(outputs, fmt)), sent=sent)
                if direct is not None:
                    direct.send(response)
                return response

            return await model.infer_then(feeds, answer, raw_outputs=raw, timing=timing)

    # -- Open Inference Protocol v2 -------------------------------------------------------
    async def v2_server(self, _request: Request) -> Response:
        return _json({"name": "edge-agent", "version": self.ops.info.version,
                      "extensions": ["binary_tensor_data", "model_repository", "statistics",
                                     "system_shared_memory"]})

    async def v2_live(self, _request: Request) -> Response:
        return _json({"live": True})

    async def v2_ready(self, _request: Request) -> Response:
        ready = self.models.ready and not self.ops.stopping
        return _json({"ready": ready}, 200 if ready else 503)

    async def v2_model(self, request: Request) -> Response:
        name = request.params["name"]
        model = self.models.get(name, _version(request))
        return _json(oip.metadata(model, self.models.versions(name)))

    async def v2_model_ready(self, request: Request) -> Response:
        model = self.models.get(request.params["name"], _version(request))
        return _json({"name": model.name, "version": str(model.version), "ready": True})

    async def v2_infer(self, request: Request) -> Response:
        model = self.models.get(request.params["name"], _version(request))
        with self._observed(model, "v2", request) as timing:
            body, header_length = request.body, request.headers.get("inference-header-content-length")
            size = oip.json_bytes(body, header_length)
            if size > self.json_offload_bytes:  # decoded in the helper process (agent.api.offload)
                decoded = await self.decoder.decode(body if header_length is None else body[:size])
                parsed = oip.parse_infer(body, header_length, model, None, decoded, shm=self._shm(request))
            else:
                parsed = oip.parse_infer(body, header_length, model, self._plans, shm=self._shm(request))
            sent = functools.partial(model.stats.succeeded, timing)
            direct = request.direct
            prepare, frame = None, None
            if parsed.preprocess is not None:  # a frame, through the manifest's pre-processing
                preprocessor = await frames.frame_preprocessor(model, parsed.preprocess)
                prepare, frame = frames.frame_prepare(preprocessor, parsed.feeds, parsed.shm_inputs)

            def answer(outputs: Outputs) -> Response:
                """Formatted, and written when it can be, by the thread that ran the model."""
                body, header_length = oip.format_infer(model, parsed, outputs,
                                                       None if frame is None else {"preprocess": frame})
                if header_length is None:
                    response = Response(200, body, sent=sent)
                else:
                    response = Response(200, body, "application/octet-stream", {oip.HEADER: str(header_length)},
                                        sent=sent)
                if direct is not None:
                    direct.send(response)
                return response

            return await model.infer_then(parsed.feeds, answer, raw_outputs=parsed.raw_output, timing=timing,
                                          prepare=prepare)

    async def v2_stats(self, request: Request) -> Response:
        """Triton's statistics extension: cumulative counts and nanoseconds per model version."""
        models, name = self.models, request.params.get("name")
        if name is None:
            chosen = list(models.served())
        else:
            version = _version(request)
            model = models.get(name, version)  # raises the 404 for an unknown name or version
            chosen = [model] if version is not None else [m for m in models.served() if m.name == name]
        return _json({"model_stats": [m.stats.to_dict(m.name, m.version)
                                      for m in sorted(chosen, key=lambda m: (m.name, m.version))]})

    # -- Triton's system shared-memory extension ---------------------------------------------
    async def shm_register(self, request: Request) -> Response:
        """Map a region of a POSIX shared-memory object: ``{"key", "offset", "byte_size"}``."""
        shm = self._shm_endpoint(request)
        shm.register(urllib.parse.unquote(request.params["region"]), loads(request.body) if request.body else None)
        return Response(200, b"")

    async def shm_unregister(self, request: Request) -> Response:
        self._shm_endpoint(request).unregister(_region(request))
        return Response(200, b"")

    async def shm_status(self, request: Request) -> Response:
        return _json(self._shm_endpoint(request).status(_region(request)))

    # -- agent ------------------------------------------------------------------------------
    async def metrics_text(self, _request: Request) -> Response:
        body = await asyncio.to_thread(_render, self.metrics)  # may run nvidia-smi: off the event loop
        return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")

    async def agent_status(self, _request: Request) -> Response:
        return _json(await self.ops.status())

    async def deploy(self, request: Request) -> Response:
        """Start installing a signed bundle; poll ``GET /v1/agent/deployments/{name}`` for progress."""
        body = loads(request.body) if request.body else {}
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object (or empty)")
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise RequestError("'version' must be a positive integer or null")
        mode, shadow = shadow_args(body)
        record = await self.ops.deploy(request.params["name"], version, mode, shadow)
        return _json(record.to_dict(), 202)

    async def shadows(self, _request: Request) -> Response:
        return _json({"shadows": self.ops.shadows()})

    async def promote(self, request: Request) -> Response:
        """Swap the shadow in; poll ``GET /v1/agent/deployments/{name}`` for the health window's outcome."""
        return _json(self.ops.promote(request.params["name"], _shadow_version(request)).to_dict(), 202)

    async def discard(self, request: Request) -> Response:
        return _json(await self.ops.discard(request.params["name"], _shadow_version(request)))

    async def deployment(self, request: Request) -> Response:
        return _json(await self.ops.deployment(request.params["name"]))

    async def reload(self, _request: Request) -> Response:
        """Re-read the models directory (models copied in by hand or by other tools)."""
        return _json(await self.ops.reload())

    async def rollback(self, request: Request) -> Response:
        return _json(await self.ops.rollback(request.params["name"]))

    async def streams(self, _request: Request) -> Response:
        return _json({"streams": self.ops.stream_status()})

    async def stream_start(self, request: Request) -> Response:
        return _json(self.ops.stream_start(request.params["name"]))

    async def stream_stop(self, request: Request) -> Response:
        return _json(await self.ops.stream_stop(request.params["name"]))

    async def stream_results(self, request: Request) -> Response:
        """Live results as Server-Sent Events (``data: {json}``), until the client disconnects or the agent stops."""
        broadcaster = self.ops.stream_feed(request.params["name"])

        async def events() -> AsyncIterator[bytes]:
            # Subscribed once the answer is being written: a HEAD, or a client gone before, never is.
            queue = broadcaster.subscribe()
            try:
                yield b": connected\n\n"
                while True:
                    try:
                        result = await asyncio.wait_for(queue.get(), 15)
                    except asyncio.TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    yield b"data: " + dumps(result) + b"\n\n"
            finally:
                broadcaster.unsubscribe(queue)

        return Response(200, b"", "text/event-stream", stream=events())

    async def agent_result(self, request: Request) -> Response:
        """Local applications push their own results upstream through the outbox."""
        seq = self.ops.push_result(request.params["stream"], loads(request.body))
        return _json({"seq": seq}, 202)

    @contextlib.contextmanager
    def _observed(self, model: Any, protocol: str, request: Request) -> Iterator[Timing]:
        """Count the answer by status code; time it when it succeeds; a failure goes into the
        model's statistics here, a success once its answer is written (``Response.sent``)."""
        started = time.perf_counter()
        timing = Timing(request.received or time.perf_counter_ns())
        code = "500"
        try:
            yield timing
            code = "200"
        except AgentError as exc:
            code = str(http_status(exc))
            raise
        finally:
            stats = model.stats
            stats.answered(protocol, code)
            if code != "200":
                stats.failed(timing.received)
            else:
                stats.observe_latency(time.perf_counter() - started)


def _render(metrics: Metrics) -> bytes:
    """The Prometheus text; the exposition library is loaded on the first scrape only."""
    from agent.health.exposition import render

    return render(metrics)


async def _not_found(request: Request) -> Response:
    return _json({"error": f"no such endpoint: {request.method} {request.path}", "code": "not_found"}, 404)


def build_server(ops: Operations, models: ModelCatalog, metrics: Metrics, settings: ApiSection) -> HTTPServer:
    """The API's routes on an HTTP server with ``settings``' limits.

    Raises:
        ConfigError: ``api.tcp_token_file`` is unreadable, empty, or readable by others.
    """
    shm = SharedMemory(max_regions=settings.shared_memory_max_regions, max_bytes=settings.shared_memory_max_bytes)
    r = Routes(ops, models, metrics, json_offload_bytes=settings.json_offload_bytes, shm=shm,
               tcp_shared_memory=settings.tcp_shared_memory)
    router = Router(_not_found)
    name = "{name:[A-Za-z0-9][A-Za-z0-9_.-]*}"
    ver = "/versions/{version:[^/:]+}"
    region = "{region:[^/]+}"
    data_plane = [  # the predict paths first: the router tries patterns in order
        ("POST", f"/v2/models/{name}/infer", r.v2_infer),
        ("POST", f"/v2/models/{name}{ver}/infer", r.v2_infer),
        ("POST", f"/v1/models/{name}:predict", r.v1_predict),
        ("POST", f"/v1/models/{name}{ver}:predict", r.v1_predict),
        ("GET", f"/v1/models/{name}", r.v1_status),
        ("GET", f"/v1/models/{name}{ver}", r.v1_status),
        ("GET", f"/v1/models/{name}/metadata", r.v1_metadata),
        ("GET", f"/v1/models/{name}{ver}/metadata", r.v1_metadata),
        ("GET", "/v2", r.v2_server),
        ("GET", "/v2/health/live", r.v2_live),
        ("GET", "/v2/health/ready", r.v2_ready),
        ("GET", "/v2/models/stats", r.v2_stats),  # before /v2/models/{name}, as in Triton
        ("GET", f"/v2/models/{name}/stats", r.v2_stats),
        ("GET", f"/v2/models/{name}{ver}/stats", r.v2_stats),
        ("GET", f"/v2/models/{name}", r.v2_model),
        ("GET", f"/v2/models/{name}{ver}", r.v2_model),
        ("GET", f"/v2/models/{name}/ready", r.v2_model_ready),
        ("GET", f"/v2/models/{name}{ver}/ready", r.v2_model_ready),
        ("GET", "/metrics", r.metrics_text),
        # Triton's system shared memory: over TCP only with api.tcp_shared_memory (``Routes._shm``)
        ("POST", f"/v2/systemsharedmemory/region/{region}/register", r.shm_register),
        ("POST", f"/v2/systemsharedmemory/region/{region}/unregister", r.shm_unregister),
        ("POST", "/v2/systemsharedmemory/unregister", r.shm_unregister),
        ("GET", f"/v2/systemsharedmemory/region/{region}/status", r.shm_status),
        ("GET", "/v2/systemsharedmemory/status", r.shm_status),
    ]
    # The agent's own endpoints: over TCP only with the bearer token (docs/api.md, "TCP").
    control = [
        ("GET", "/v1/agent/status", r.agent_status),
        ("POST", "/v1/agent/results/{stream:[A-Za-z0-9][A-Za-z0-9_.-]*}", r.agent_result),
        ("GET", "/v1/agent/streams", r.streams),
        ("POST", "/v1/agent/models:reload", r.reload),
        ("POST", f"/v1/agent/streams/{name}:start", r.stream_start),
        ("POST", f"/v1/agent/streams/{name}:stop", r.stream_stop),
        ("GET", f"/v1/agent/streams/{name}/results", r.stream_results),
        ("POST", f"/v1/agent/models/{name}:deploy", r.deploy),
        ("POST", f"/v1/agent/models/{name}:rollback", r.rollback),
        ("GET", f"/v1/agent/deployments/{name}", r.deployment),
        ("GET", "/v1/agent/shadows", r.shadows),
        ("POST", f"/v1/agent/models/{name}:promote", r.promote),
        ("POST", f"/v1/agent/models/{name}:discard", r.discard),
    ]
    for method, path, handler in data_plane:
        router.add(method, path, _guard(handler))
    for method, path, handler in control:
        router.add(method, path, _guard(handler), control=True)
    token = read_token(settings.tcp_token_file) if settings.tcp_token_file is not None else None
    return HTTPServer(router, limits(settings), token=token, on_stop=r.close)


def limits(settings: ApiSection) -> Limits:
    return Limits(max_body=settings.max_body_bytes, max_buffered=settings.max_buffered_bytes,
                  max_url=settings.max_url_bytes, max_head=settings.max_header_bytes,
                  max_headers=settings.max_headers, max_connections=settings.max_connections,
                  header_timeout=settings.header_timeout_s, body_timeout=settings.body_timeout_s,
                  keep_alive=settings.keep_alive_s, send_timeout=settings.send_timeout_s,
                  max_unsent=settings.max_unsent_bytes)


MIN_TOKEN_CHARS = 16


def read_token(path: Path) -> bytes:
    """The TCP bearer token: the file's content, stripped; the file must be the service's alone.

    Raises:
        ConfigError: unreadable, a symlink or not a regular file, owned by another user, readable
            or writable by group or others, or a token under 16 characters.
    """
    key = "api.tcp_token_file"
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is not a regular file", key=key)
        if info.st_mode & 0o077:
            raise ConfigError(f"{path} has mode {stat.S_IMODE(info.st_mode):o}: it must be readable by the "
                              "service only (chmod 600)", key=key)
        if info.st_uid != os.geteuid():
            raise ConfigError(f"{path} must be owned by the service's user (uid {os.geteuid()})", key=key)
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key=key) from None
    if len(token) < MIN_TOKEN_CHARS or any(c <= 0x20 or c >= 0x7F for c in token):
        raise ConfigError(f"{path}: the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                          "without spaces", key=key)
    return token


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind ``path`` with ``mode``, replacing a stale socket but never a live agent's.

    Raises:
        AgentError: another process is listening on ``path``, or it is not a socket.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise AgentError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise AgentError(f"cannot check socket {path}: {exc}") from exc
            path.unlink(missing_ok=True)
            log.info("api.stale_socket_removed", socket=str(path))
        else:
            raise AgentError(f"another process is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window where the socket is wider than ``mode``
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(mode)
    return sock


def remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
