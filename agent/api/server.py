"""The HTTP server: routes, error mapping, and the Unix-socket / TCP listeners.

Errors are mapped to status codes here and only here (``AgentError.http_status``); a
handler never lets an exception reach aiohttp, so one bad request cannot disturb others.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from agent.api import oip, tfserving
from agent.api.codec import dumps
from agent.errors import AgentError, PayloadTooLargeError, RequestError

if TYPE_CHECKING:
    from agent.daemon import Agent

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = "application/json"
_AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(value), status=status, content_type=_JSON)


def _error(exc: AgentError) -> web.Response:
    return _json({"error": str(exc)}, exc.http_status)


def _version(request: web.Request) -> int | None:
    raw = request.match_info.get("version")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise RequestError(f"version must be a positive integer, got {raw!r}")
    return int(raw)


async def _body(request: web.Request) -> bytes:
    limit = request.app[_AGENT_KEY].config.api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes") from None


def _guard(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except AgentError as exc:
            return _error(exc)
        except Exception as exc:
            log.exception("api.unhandled", path=request.path)
            return _json({"error": f"internal error: {type(exc).__name__}"}, 500)

    return wrapped


class Routes:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.metrics = agent.metrics

    # -- TF Serving v1 --------------------------------------------------------------------
    async def v1_status(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], _version(request)
        reg = self.agent.registry
        if not reg.known(name) or (version is not None and (name, version) not in reg.failures):
            reg.get(name, version)  # raises the 404 for an unknown name or version
        states = [s for s in reg.version_states(name) if version is None or s["version"] == version]
        return _json(tfserving.version_status(states))

    async def v1_metadata(self, request: web.Request) -> web.Response:
        model = self.agent.registry.get(request.match_info["name"], _version(request))
        return _json(tfserving.metadata(model))

    async def v1_predict(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        model = self.agent.registry.get(request.match_info["name"], _version(request))
        code = "400"
        try:
            feeds, fmt, raw = tfserving.parse_predict(await _body(request), model)
            outputs = await model.infer(feeds, raw_outputs=raw)
            response = _json(tfserving.format_predict(outputs, fmt))
            code = "200"
            return response
        except AgentError as exc:
            code = str(exc.http_status)
            raise
        finally:
            self._observe(model, "v1", code, started)

    # -- Open Inference Protocol v2 -------------------------------------------------------
    async def v2_server(self, _request: web.Request) -> web.Response:
        return _json({"name": "edge-agent", "version": self.agent.version,
                      "extensions": ["binary_tensor_data", "model_repository"]})

    async def v2_live(self, _request: web.Request) -> web.Response:
        return _json({"live": True})

    async def v2_ready(self, _request: web.Request) -> web.Response:
        ready = self.agent.registry.ready and not self.agent.stopping
        return _json({"ready": ready}, 200 if ready else 503)

    async def v2_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        model = self.agent.registry.get(name, _version(request))
        versions = sorted(self.agent.registry.models.get(name, {}))
        return _json(oip.metadata(model, versions))

    async def v2_model_ready(self, request: web.Request) -> web.Response:
        model = self.agent.registry.get(request.match_info["name"], _version(request))
        return _json({"name": model.name, "version": str(model.version), "ready": True})

    async def v2_infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        model = self.agent.registry.get(request.match_info["name"], _version(request))
        code = "400"
        try:
            parsed = oip.parse_infer(await _body(request), request.headers.get(oip.HEADER), model)
            outputs = await model.infer(parsed.feeds, raw_outputs=parsed.raw_output)
            body, header_length = oip.format_infer(model, parsed, outputs)
            code = "200"
        except AgentError as exc:
            code = str(exc.http_status)
            raise
        finally:
            self._observe(model, "v2", code, started)
        if header_length is None:
            return web.Response(body=body, content_type=_JSON)
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={oip.HEADER: str(header_length)})

    # -- agent ------------------------------------------------------------------------------
    async def metrics_text(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def agent_status(self, _request: web.Request) -> web.Response:
        return _json(self.agent.status())

    def _observe(self, model: Any, protocol: str, code: str, started: float) -> None:
        version = str(model.version)
        self.metrics.requests.labels(model.name, version, protocol, code).inc()
        if code == "200":
            self.metrics.request_latency.labels(model.name, version).observe(time.perf_counter() - started)


def build_app(agent: Agent) -> web.Application:
    app = web.Application(client_max_size=agent.config.api.max_body_bytes + 1)
    app[_AGENT_KEY] = agent
    r = Routes(agent)
    name = "{name:[A-Za-z0-9][A-Za-z0-9_.-]*}"
    ver = "/versions/{version:[^/:]+}"
    routes = [
        ("GET", f"/v1/models/{name}", r.v1_status),
        ("GET", f"/v1/models/{name}{ver}", r.v1_status),
        ("GET", f"/v1/models/{name}/metadata", r.v1_metadata),
        ("GET", f"/v1/models/{name}{ver}/metadata", r.v1_metadata),
        ("POST", f"/v1/models/{name}:predict", r.v1_predict),
        ("POST", f"/v1/models/{name}{ver}:predict", r.v1_predict),
        ("GET", "/v2", r.v2_server),
        ("GET", "/v2/health/live", r.v2_live),
        ("GET", "/v2/health/ready", r.v2_ready),
        ("GET", f"/v2/models/{name}", r.v2_model),
        ("GET", f"/v2/models/{name}{ver}", r.v2_model),
        ("GET", f"/v2/models/{name}/ready", r.v2_model_ready),
        ("GET", f"/v2/models/{name}{ver}/ready", r.v2_model_ready),
        ("POST", f"/v2/models/{name}/infer", r.v2_infer),
        ("POST", f"/v2/models/{name}{ver}/infer", r.v2_infer),
        ("GET", "/metrics", r.metrics_text),
        ("GET", "/v1/agent/status", r.agent_status),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _guard(handler))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


async def _not_found(request: web.Request) -> web.Response:
    return _json({"error": f"no such endpoint: {request.method} {request.path}"}, 404)


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
