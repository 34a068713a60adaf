"""A small synchronous client for the agent's local API (Unix socket or TCP).

Uses only the standard library's ``http.client`` with one kept-alive connection, so a
local application adds no dependency and no per-request connection cost.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agent.errors import ClientError

_BINARY_HEADER = "Inference-Header-Content-Length"
_DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64,
}
_NAMES = {np.dtype(t): n for n, t in _DATATYPES.items()}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    """Talk to a running agent. Every method raises ClientError on transport or API errors."""

    def __init__(self, socket_path: str | Path | None = None, *, tcp: str | None = None,
                 timeout: float = 30.0) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path or tcp")
        self.target = f"unix:{socket_path}" if socket_path is not None else f"tcp:{tcp}"
        self._factory: Any
        if socket_path is not None:
            path = str(socket_path)
            self._factory = lambda: _UnixConnection(path, timeout)
        else:
            host, _, port = str(tcp).rpartition(":")
            self._factory = lambda: http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request; reconnects once if a kept-alive connection was closed by the agent."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = self._factory()
            try:
                self._conn.request(method, path, body=body, headers=dict(headers or {}))
                response = self._conn.getresponse()
                return response.status, response.headers, response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest,
                    BrokenPipeError) as exc:
                self.close()
                if attempt or isinstance(exc, ConnectionRefusedError):
                    raise ClientError(f"cannot reach the agent at {self.target}: {exc}") from exc
            except FileNotFoundError as exc:
                self.close()
                raise ClientError(f"cannot reach the agent at {self.target}: socket not found") from exc
            except OSError as exc:
                self.close()
                raise ClientError(f"cannot reach the agent at {self.target}: {exc}") from exc
        raise AssertionError("unreachable")

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

    def infer(self, name: str, inputs: Mapping[str, np.ndarray], *, version: int | None = None,
              binary: bool = True, outputs: list[str] | None = None, raw_output: bool = False,
              ) -> dict[str, np.ndarray]:
        """Open Inference Protocol infer; ``binary`` uses the binary tensor data extension both ways."""
        entries, chunks = [], []
        for input_name, value in inputs.items():
            array = np.require(value, requirements="C")
            entry: dict[str, Any] = {"name": input_name, "shape": list(array.shape),
                                     "datatype": _NAMES[array.dtype]}
            if binary:
                raw = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = array.reshape(-1)
            entries.append(entry)
        header: dict[str, Any] = {"inputs": entries,
                                  "parameters": {"binary_data_output": binary, "raw_output": raw_output}}
        if outputs:
            header["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
        head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if binary:
            headers[_BINARY_HEADER] = str(len(head))
        status, resp_headers, data = self.request("POST", self._path("/v2", name, version) + "/infer",
                                                  b"".join([head, *chunks]), headers)
        hlen = resp_headers.get(_BINARY_HEADER)
        if status >= 400 or hlen is None:
            result = self._decode(status, data)
            blob = b""
        else:
            result = self._decode(status, data[: int(hlen)])
            blob = data[int(hlen):]
        return _decode_outputs(result["outputs"], blob)


def _decode_outputs(entries: list[dict[str, Any]], blob: bytes) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        dtype = np.dtype(_DATATYPES[entry["datatype"]])
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[entry["name"]] = np.frombuffer(blob, dtype, count=size // dtype.itemsize,
                                               offset=offset).reshape(entry["shape"])
            offset += size
        else:
            out[entry["name"]] = np.asarray(entry["data"], dtype=dtype).reshape(entry["shape"])
    return out
