"""A small synchronous client for the agent's local API (Unix socket or TCP).

One kept-alive connection, requests written by hand and answers parsed by ``httptools``
(a dependency of the agent already), so a local application pays no per-request connection
cost and little Python per call.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import numpy as np
import orjson

from agent.api.datatypes import DATATYPES, datatype
from agent.errors import ClientError

_BINARY_HEADER = "Inference-Header-Content-Length"


class _ClosedError(ConnectionError):
    pass


@dataclass(frozen=True)
class ShmInput:
    """An input tensor the agent reads from a registered shared-memory region (``infer_shm``)."""

    region: str
    shape: tuple[int, ...]
    datatype: str  # "FP32", "UINT8", ... (``agent.api.datatypes``)
    offset: int = 0

    @property
    def byte_size(self) -> int:
        return math.prod(self.shape) * DATATYPES[self.datatype].itemsize


@dataclass(frozen=True)
class ShmOutput:
    """Where the agent writes an output: ``byte_size`` bytes set aside at ``offset`` of ``region``."""

    region: str
    byte_size: int
    offset: int = 0


def _shm_parameters(region: str, offset: int, byte_size: int) -> dict[str, Any]:
    return {"shared_memory_region": region, "shared_memory_offset": offset, "shared_memory_byte_size": byte_size}


def _input_entry(name: str, value: ShmInput | np.ndarray) -> dict[str, Any]:
    """An input's JSON in a binary infer request: in a region, or sent after the header."""
    if isinstance(value, ShmInput):
        return {"name": name, "shape": list(value.shape), "datatype": value.datatype,
                "parameters": _shm_parameters(value.region, value.offset, value.byte_size)}
    return {"name": name, "shape": list(value.shape), "datatype": datatype(value.dtype),
            "parameters": {"binary_data_size": value.nbytes}}


class _Response:
    """httptools callbacks for one response; ``done`` once the body is complete.

    ``keep_alive`` is read when the message completes: once ``feed_data`` returns, httptools has
    reset its state for the next message and ``should_keep_alive()`` says False even for an
    HTTP/1.1 answer that keeps the connection (the client then reconnected for every request).
    """

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.done = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True


class AgentClient:
    """Talk to a running agent. Every method raises ClientError on transport or API errors.

    A minimal HTTP/1.1 client over one kept-alive socket: the standard library's http.client
    alone costs ~120 µs per call here, most of the agent's whole latency budget.
    """

    def __init__(self, socket_path: str | Path | None = None, *, tcp: str | None = None,
                 timeout: float = 30.0, token: str | None = None) -> None:
        """``token``: the bearer token the agent's control endpoints need over TCP (``api.tcp_token_file``)."""
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path or tcp")
        self.timeout = timeout
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.address: str | tuple[str, int]
        if socket_path is not None:
            self.target, self.address, self._family = f"unix:{socket_path}", str(socket_path), socket.AF_UNIX
        else:
            host, _, port = str(tcp).rpartition(":")
            host = host.strip("[]")
            self.target, self.address = f"tcp:{tcp}", (host, int(port))
            self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock: socket.socket | None = None
        self._prefixes: dict[tuple[Any, ...], bytes] = {}  # binary infer: HTTP head + JSON header per signature
        self._layouts: dict[bytes, list[tuple[str, np.dtype[Any], tuple[int, ...], int]]] = {}  # by answer header

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
            # Kernel timeouts on a blocking socket: Python's own timeout mode polls before every call.
            sock.settimeout(None)
            timeval = struct.pack("ll", int(self.timeout), int(self.timeout % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except FileNotFoundError as exc:
            sock.close()
            raise ClientError(f"cannot reach the agent at {self.target}: socket not found") from exc
        except OSError as exc:
            sock.close()
            raise ClientError(f"cannot reach the agent at {self.target}: {exc}") from exc
        if self._family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send one request; reconnects once if the agent closed an idle kept-alive connection.

        Returns (status, headers with lower-case names, body).
        """
        if self._auth:
            headers = {**self._auth, **(headers or {})}
        return self._roundtrip([_head(method, path, len(body or b""), headers), body or b""])

    def _roundtrip(self, message: list[bytes | memoryview]) -> tuple[int, dict[str, str], bytes]:
        """Send ``message`` (HTTP head and body parts) and read the answer; see ``request``."""
        for attempt in (0, 1):
            fresh = self._sock is None
            if self._sock is None:
                self._sock = self._connect()
            try:
                status, resp_headers, data, keep_alive = self._exchange(self._sock, message)
            except BlockingIOError as exc:
                self.close()
                raise ClientError(f"the agent at {self.target} did not answer within {self.timeout:g} s") from exc
            except (ConnectionError, _ClosedError) as exc:
                self.close()
                if attempt or fresh:
                    raise ClientError(f"cannot reach the agent at {self.target}: {exc}") from exc
                continue  # the agent closed a kept-alive connection: once more on a new one
            except (OSError, httptools.HttpParserError) as exc:
                self.close()
                raise ClientError(f"request to the agent at {self.target} failed: {exc}") from exc
            if not keep_alive:
                self.close()
            return status, resp_headers, data
        raise AssertionError("unreachable")

    @staticmethod
    def _exchange(sock: socket.socket, message: list[bytes | memoryview]) -> tuple[int, dict[str, str], bytes, bool]:
        with contextlib.suppress(BrokenPipeError):  # the agent may have answered early (413): read it
            sent, total = sock.sendmsg(message), sum(len(part) for part in message)  # no copy into one buffer
            if sent < total:
                sock.sendall(b"".join(message)[sent:])
        response = _Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        try:
            while not response.done:
                data = sock.recv(262144)
                if not data:
                    raise _ClosedError("connection closed by the agent")
                parser.feed_data(data)
        finally:
            response.parser = None  # no cycle: the response and its parser are freed at once
        return parser.get_status_code(), response.headers, b"".join(response.body), response.keep_alive

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        status, _, data = self.request(method, path, payload, headers)
        return self._decode(status, data)

    @staticmethod
    def _decode(status: int, data: bytes) -> Any:
        try:
            value = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            value = None
        if status >= 400:
            message = value.get("error") if isinstance(value, dict) else data[:200].decode(errors="replace")
            raise ClientError(f"HTTP {status}: {message}", status=status)
        return value

    # -- agent -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/agent/status"))

    def metrics(self) -> str:
        status, _, data = self.request("GET", "/metrics")
        self._decode(status, data)
        return data.decode()

    # -- TF Serving v1 -----------------------------------------------------------------------
    @staticmethod
    def _path(prefix: str, name: str, version: int | None) -> str:
        return f"{prefix}/models/{name}" + (f"/versions/{version}" if version is not None else "")

    def predict(self, name: str, inputs: Any, *, version: int | None = None, rows: bool = False) -> Any:
        """TF Serving predict; ``inputs`` is an array (single input) or a dict by input name."""
        body = {"instances": inputs} if rows else {"inputs": inputs}
        result = self._json("POST", self._path("/v1", name, version) + ":predict", body)
        return result["predictions"] if rows else result["outputs"]

    # -- Open Inference Protocol v2 ----------------------------------------------------------
    def model_metadata(self, name: str, version: int | None = None) -> dict[str, Any]:
        return dict(self._json("GET", self._path("/v2", name, version)))

    def stats(self, name: str | None = None, version: int | None = None) -> list[dict[str, Any]]:
        """Triton-style inference statistics, one entry per model version (all models without ``name``)."""
        path = "/v2/models/stats" if name is None else self._path("/v2", name, version) + "/stats"
        return list(self._json("GET", path)["model_stats"])

    def infer(self, name: str, inputs: Mapping[str, np.ndarray], *, version: int | None = None,
              binary: bool = True, outputs: list[str] | None = None, raw_output: bool = False,
              ) -> dict[str, np.ndarray]:
        """Open Inference Protocol infer; ``binary`` uses the binary tensor data extension both ways.

        With ``binary``, the HTTP head and JSON header are built once per model, input shapes and
        dtypes, and the tensors' own buffers are sent after them, uncopied.
        """
        if binary:
            return self._infer_binary(name, inputs, version, outputs, raw_output)
        entries = []
        for input_name, value in inputs.items():
            array = np.require(value, requirements="C")
            entries.append({"name": input_name, "shape": list(array.shape), "datatype": datatype(array.dtype),
                            "data": array.reshape(-1)})
        body = orjson.dumps(_infer_header(entries, outputs, False, raw_output), option=orjson.OPT_SERIALIZE_NUMPY)
        status, _, data = self.request("POST", self._path("/v2", name, version) + "/infer", body,
                                       {"Content-Type": "application/json"})
        return _decode_outputs(self._decode(status, data)["outputs"], b"")

    def _infer_binary(self, name: str, inputs: Mapping[str, np.ndarray], version: int | None,
                      outputs: list[str] | None, raw_output: bool) -> dict[str, np.ndarray]:
        arrays = [(input_name, np.require(value, requirements="C")) for input_name, value in inputs.items()]
        key = (name, version, tuple((n, a.shape, a.dtype.str) for n, a in arrays), tuple(outputs or ()), raw_output)
        prefix = self._prefix(key, name, version, lambda: (_infer_header(
            [_input_entry(n, a) for n, a in arrays], outputs, True, raw_output), sum(a.nbytes for _, a in arrays)))
        parts = [prefix, *(a.data.cast("B") if a.size else b"" for _, a in arrays)]  # bytes views, no copies
        status, resp_headers, data = self._roundtrip(parts)
        hlen = resp_headers.get(_BINARY_HEADER.lower())
        if status >= 400 or hlen is None:
            return _decode_outputs(self._decode(status, data)["outputs"], b"")
        return self._decode_binary(data, int(hlen))

    # -- Triton's system shared-memory extension ----------------------------------------------
    def register_shm(self, region: str, key: str, byte_size: int, offset: int = 0) -> None:
        """Register ``byte_size`` bytes at ``offset`` of the POSIX shared-memory object ``key`` (``/name``)."""
        self._json("POST", f"/v2/systemsharedmemory/region/{_quote(region)}/register",
                   {"key": key, "offset": offset, "byte_size": byte_size})

    def unregister_shm(self, region: str | None = None) -> None:
        """Unregister ``region``, or every region."""
        where = "" if region is None else f"/region/{_quote(region)}"
        self._json("POST", f"/v2/systemsharedmemory{where}/unregister")

    def shm_status(self, region: str | None = None) -> list[dict[str, Any]]:
        """The registered regions: ``{"name", "key", "offset", "byte_size"}`` each."""
        where = "" if region is None else f"/region/{_quote(region)}"
        return list(self._json("GET", f"/v2/systemsharedmemory{where}/status"))

    def infer_shm(self, name: str, inputs: Mapping[str, ShmInput | np.ndarray],
                  outputs: Mapping[str, ShmOutput | None] | None = None, *, version: int | None = None,
                  raw_output: bool = False) -> dict[str, Any]:
        """Infer with inputs read from shared-memory regions (``ShmInput``) or sent (arrays), and
        outputs written into regions (``ShmOutput``) or answered (None; every output without ``outputs``).

        Returns each output: an array when answered, or its metadata (``datatype``, ``shape``,
        ``parameters``) when written into a region.
        """
        arrays = [(n, np.require(v, requirements="C")) for n, v in inputs.items() if not isinstance(v, ShmInput)]
        # The HTTP head and JSON header are built once per signature, as for ``infer``.
        key = ("shm", name, version, tuple(v if isinstance(v, ShmInput) else (n, v.shape, v.dtype.str)
                                           for n, v in inputs.items()),
               None if outputs is None else tuple(outputs.items()), raw_output)
        sent = dict(arrays)

        def header() -> tuple[dict[str, Any], int]:
            made: dict[str, Any] = {"inputs": [_input_entry(n, sent.get(n, v)) for n, v in inputs.items()],
                                    "parameters": {"binary_data_output": True, "raw_output": raw_output}}
            if outputs is not None:
                made["outputs"] = [{"name": o, "parameters": {"binary_data": True} if where is None
                                    else _shm_parameters(where.region, where.offset, where.byte_size)}
                                   for o, where in outputs.items()]
            return made, sum(a.nbytes for _, a in arrays)

        prefix = self._prefix(key, name, version, header)
        message: list[bytes | memoryview] = [prefix, *(a.data.cast("B") for _, a in arrays if a.size)]
        answer, blob = self._answer(*self._roundtrip(message))
        shared = {e["name"]: e for e in answer["outputs"] if "shared_memory_region" in (e.get("parameters") or {})}
        result: dict[str, Any] = _decode_outputs([e for e in answer["outputs"] if e["name"] not in shared], blob)
        result.update(shared)
        return result

    def infer_frame(self, name: str, frame: np.ndarray | ShmInput, *, color: str = "bgr",
                    version: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Infer on a camera frame (uint8 HxWx3, or a region holding one) through the pre-processing
        the model's manifest declares (docs/api.md, "Frames").

        Returns the outputs and where the frame went in the model's input: ``scale`` and ``pad``
        (model pixels), ``input_size`` and ``source_size`` (width, height), to map boxes back.
        """
        arrays = [] if isinstance(frame, ShmInput) else [np.require(frame, requirements="C")]
        key = ("frame", name, version, color, frame if isinstance(frame, ShmInput) else (frame.shape, frame.dtype.str))
        prefix = self._prefix(key, name, version, lambda: ({
            "inputs": [_input_entry("frame", arrays[0] if arrays else frame)],
            "parameters": {"binary_data_output": True, "preprocess": True, "frame_color": color}},
            sum(a.nbytes for a in arrays)))
        answer, blob = self._answer(*self._roundtrip([prefix, *(a.data.cast("B") for a in arrays if a.size)]))
        where = dict((answer.get("parameters") or {}).get("preprocess") or {})
        return _decode_outputs(answer["outputs"], blob), where

    def _prefix(self, key: tuple[Any, ...], name: str, version: int | None,
                header: Callable[[], tuple[dict[str, Any], int]]) -> bytes:
        """The HTTP head and JSON header of a binary infer request, built once per signature ``key``
        (``header`` makes the JSON, and the bytes of the tensors sent after it, the first time)."""
        prefix = self._prefixes.get(key)
        if prefix is None:
            made, body_bytes = header()
            head = orjson.dumps(made)
            prefix = _head("POST", self._path("/v2", name, version) + "/infer", len(head) + body_bytes,
                           {"Content-Type": "application/octet-stream", _BINARY_HEADER: str(len(head))}) + head
            if len(self._prefixes) >= 64:
                self._prefixes.clear()
            self._prefixes[key] = prefix
        return prefix

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> tuple[dict[str, Any], bytes]:
        """A binary infer answer's JSON (an error status raises ClientError) and the data after it."""
        hlen = headers.get(_BINARY_HEADER.lower())
        split = int(hlen) if hlen is not None and status < 400 else len(data)
        return self._decode(status, data[:split]), data[split:]

    def _decode_binary(self, data: bytes, hlen: int) -> dict[str, np.ndarray]:
        """Outputs behind a JSON header; a header seen before is not parsed again."""
        header = data[:hlen]
        layout = self._layouts.get(header)
        if layout is None:
            entries = self._decode(200, header)["outputs"]
            if not all("binary_data_size" in (e.get("parameters") or {}) for e in entries):
                return _decode_outputs(entries, data[hlen:])
            layout = [(e["name"], DATATYPES[e["datatype"]], tuple(e["shape"]), e["parameters"]["binary_data_size"])
                      for e in entries]
            if len(self._layouts) >= 64:
                self._layouts.clear()
            self._layouts[header] = layout
        out, offset = {}, hlen
        for output_name, dtype, shape, size in layout:
            out[output_name] = np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
            offset += size
        return out


def _quote(region: str) -> str:
    return urllib.parse.quote(region, safe="")


def _head(method: str, path: str, length: int, headers: Mapping[str, str] | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {length}"]
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _infer_header(entries: list[dict[str, Any]], outputs: list[str] | None, binary: bool,
                  raw_output: bool) -> dict[str, Any]:
    header: dict[str, Any] = {"inputs": entries,
                              "parameters": {"binary_data_output": binary, "raw_output": raw_output}}
    if outputs:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    return header


def _decode_outputs(entries: list[dict[str, Any]], blob: bytes) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        dtype = DATATYPES[entry["datatype"]]
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[entry["name"]] = np.frombuffer(blob, dtype, count=size // dtype.itemsize,
                                               offset=offset).reshape(entry["shape"])
            offset += size
        else:
            out[entry["name"]] = np.asarray(entry["data"], dtype=dtype).reshape(entry["shape"])
    return out
