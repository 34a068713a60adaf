"""Fuzz the socket API of a real daemon with malformed requests: raw bytes over the Unix socket.

Every case must be answered with a 4xx (503 ``overloaded`` for a capacity limit, 505 for an HTTP
version the agent does not speak) or have its connection closed, never a 2xx or another 5xx; after
each case the agent must still be live and answer a real predict exactly as the runtime does; and
its memory must stay bounded over the whole run. ``bench/api_abuse.py`` runs the same cases
concurrently and reports how long health checks stall meanwhile; this test checks behaviour only.

The cases, in ``CASES`` (also used by the bench): broken request lines, huge and many headers,
bad chunking, bad JSON and binary bodies, every field of v1 and v2 requests given each wrong type,
pipelining abuse, slow clients (slowloris heads and bodies), connection floods, HEAD, OPTIONS and
odd methods.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: The daemon's [api] settings for the fuzz: short timeouts and small limits so that every slow or
#: oversized case ends in seconds (the defaults are in docs/api.md).
API_CONFIG = """\
[api]
max_body_bytes = 4194304
max_buffered_bytes = 8388608
max_connections = 64
header_timeout_s = 1.0
body_timeout_s = 2.0
keep_alive_s = 2.0
send_timeout_s = 3.0
max_unsent_bytes = 262144
"""
MODELS = ("silero_vad", "face_detection", "okay_nabu")
READ_TIMEOUT = 30.0  # how long a case waits for an answer or the end: above every timeout in API_CONFIG


# -- outcomes -------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one connection of a case got: its answers' statuses, and whether it ended closed."""

    statuses: list[int]
    closed: bool
    note: str = ""


def acceptable(status: int) -> bool:
    return 400 <= status < 500 or status in (503, 505)


def judge(outcomes: list[Outcome], allow_ok: int = 0) -> list[str]:
    """Problems with a case's outcomes: each malformed request is refused (4xx, 503, 505) or its
    connection closed; ``allow_ok`` answers may be 2xx (the valid requests a case mixes in)."""
    problems = []
    oks = 0
    for i, o in enumerate(outcomes):
        for status in o.statuses:
            if 200 <= status < 300:
                oks += 1
            elif not acceptable(status):
                problems.append(f"connection {i}: status {status} {o.note}")
        if not o.statuses and not o.closed:
            problems.append(f"connection {i}: neither answered nor closed {o.note}")
    if oks > allow_ok:
        problems.append(f"{oks} answers were 2xx (at most {allow_ok} expected)")
    return problems


# -- a raw client ---------------------------------------------------------------------------------------------------
class Conn:
    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))  # blocking: a full listen backlog makes it wait, not fail
        self.sock.settimeout(timeout or READ_TIMEOUT)
        self.buffer = b""
        self.eof = False

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:  # closed by the agent meanwhile: what it answered is still readable
            return False
        return True

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except TimeoutError:
            raise AssertionError("the agent neither answered nor closed the connection") from None
        if not chunk:
            self.eof = True
        self.buffer += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> int | None:
        """The next response's status (its body skipped), or None when the connection ends first."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                if not self._fill():
                    return None
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            try:
                status = int(lines[0].split()[1])
            except (IndexError, ValueError):
                raise AssertionError(f"not an HTTP response: {head[:200]!r}") from None
            if status != 100:
                break
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if head_only:
            return status
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                if not self._fill():
                    return status  # cut short, but the status was sent
            self.buffer = self.buffer[length:]
        else:
            while self._fill():
                pass
            self.buffer = b""
        return status

    def outcome(self, count: int = 1, head_only: bool = False, note: str = "") -> Outcome:
        statuses = []
        for _ in range(count):
            status = self.response(head_only)
            if status is None:
                break
            statuses.append(status)
        closed = self.eof or self._closed_now()
        self.close()
        return Outcome(statuses, closed, note)

    def _closed_now(self) -> bool:
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, OSError):
            return False
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def raw(path: Path, data: bytes, expect: int = 1) -> list[Outcome]:
    c = Conn(path)
    c.send(data)
    return [c.outcome(expect, head_only=data.startswith(b"HEAD "))]


# -- building requests ------------------------------------------------------------------------------------------------
def http(method: str = "GET", target: str = "/v2/health/live", body: bytes | None = None,
         headers: tuple[tuple[str, str], ...] = (), version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: localhost"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def silero_v2(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "r1",
        "inputs": [{"name": "input", "shape": [1, 576], "datatype": "FP32", "data": [0.01] * 576},
                   {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0.0] * 256},
                   {"name": "sr", "shape": [], "datatype": "INT64", "data": 16000}],
        "outputs": [{"name": "output"}],
        "parameters": {"binary_data_output": False},
    }
    return body | changes


def infer(body: Any, model: str = "silero_vad", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", f"/v2/models/{model}/infer", data, headers)


def predict(body: Any, model: str = "face_detection") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", f"/v1/models/{model}:predict", data)


WRONG = [None, 5, -1, 1.5, "x", [], {}, True, [None], {"a": 1}]


def _v2_field_cases() -> Iterator[tuple[str, bytes]]:
    """Each field of a v2 request given each wrong type (only the values that are wrong for it)."""
    top_valid = {"id": (None, "x"), "parameters": (None, {}, {"a": 1}), "outputs": (None, [])}
    for field in ("id", "parameters", "inputs", "outputs"):
        for value in WRONG:
            if value in top_valid.get(field, ()):
                continue
            yield f"v2.{field}={json.dumps(value)}", infer(silero_v2(**{field: value}))
    for key in ("binary_data_output", "raw_output"):
        for value in (None, 5, "yes", [], {}):
            yield f"v2.parameters.{key}={json.dumps(value)}", infer(silero_v2(parameters={key: value}))
    for field, values in {
        "name": (None, 5, [], {}, True, "nope", ""),
        "shape": (None, 5, "x", {}, [-1, 576], [1.5, 576], ["1", 576], [True, 576], [1, 577], [0, 576],
                  [2**63, 576], [1] * 40, [1, 576, 1]),
        "datatype": (None, 5, "FP33", "BYTES", [], "fp32", "INT64", "FP16"),
        "data": (None, 5, "x", {}, [None] * 576, ["1"] * 576, [[1]], [True] * 576, [[0.0] * 575, [0.0]],
                 [0.0] * 575),
        "parameters": (5, "x", [], True, {"binary_data_size": 5}, {"binary_data_size": "5"},
                       {"binary_data_size": -1}, {"binary_data_size": None}),
    }.items():
        for value in values:
            body = silero_v2()
            body["inputs"][0][field] = value
            yield f"v2.inputs[0].{field}={json.dumps(value)[:40]}", infer(body)
    for value in (5, "x", {}, True, [5], [None], [{}], [{"name": 5}], [{"name": "nope"}],
                  [{"name": "output", "parameters": 5}], [{"name": "output", "parameters": {"binary_data": 5}}],
                  [{"name": "output", "parameters": {"classification": 2}}]):
        yield f"v2.outputs={json.dumps(value)[:40]}", infer(silero_v2(outputs=value))


def _v1_field_cases() -> Iterator[tuple[str, bytes]]:
    image = [[[[0.0, 0.0, 0.0]] * 2] * 2]
    for name, body in [
        ("v1.no-inputs", {}), ("v1.both", {"inputs": image, "instances": image}),
        ("v1.inputs=null", {"inputs": None}), ("v1.inputs=str", {"inputs": "x"}),
        ("v1.inputs={}", {"inputs": {}}), ("v1.inputs.unknown", {"inputs": {"nope": [1]}}),
        ("v1.inputs.str", {"inputs": {"input": "x"}}), ("v1.instances=null", {"instances": None}),
        ("v1.instances=[]", {"instances": []}), ("v1.instances={}", {"instances": {}}),
        ("v1.instances=[null]", {"instances": [None]}), ("v1.instances.mixed", {"instances": [1, {"input": 1}]}),
        ("v1.instances.obj-null", {"instances": [{"input": None}]}),
        ("v1.raw_output=5", {"inputs": image, "raw_output": 5}), ("v1.raw_output=str", {"inputs": image,
                                                                                       "raw_output": "yes"}),
        ("v1.signature=5", {"inputs": image, "signature_name": 5}),
        ("v1.signature=other", {"inputs": image, "signature_name": "other"}),
        ("v1.wrong-shape", {"inputs": image}), ("v1.top=list", [image]), ("v1.top=number", 5),
    ]:
        yield name, predict(body)


def _binary(header: dict[str, Any], payload: bytes, length: str | None = None) -> bytes:
    head = json.dumps(header).encode()
    return infer(head + payload, "face_detection",
                 (("Inference-Header-Content-Length", length if length is not None else str(len(head))),))


def _binary_cases() -> Iterator[tuple[str, bytes]]:
    def header(size: int, shape: list[int] | None = None, datatype: str = "FP32") -> dict[str, Any]:
        return {"inputs": [{"name": "input", "shape": shape or [1, 128, 128, 3], "datatype": datatype,
                            "parameters": {"binary_data_size": size}}]}

    full = 196608
    yield "bin.truncated", _binary(header(full), b"\0" * 100)
    yield "bin.extra-bytes", _binary(header(full), b"\0" * (full + 7))
    yield "bin.size-mismatch", _binary(header(12), b"\0" * 12)
    yield "bin.length-zero", _binary(header(full), b"\0" * full, "0")
    yield "bin.length-negative", _binary(header(full), b"\0" * full, "-5")
    yield "bin.length-huge", _binary(header(full), b"\0" * full, "99999999999999999999")
    yield "bin.length-text", _binary(header(full), b"\0" * full, "twelve")
    yield "bin.length-superscript", _binary(header(full), b"\0" * full, "\u00b2")
    yield "bin.header-not-json", infer(b"{not json" + b"\0" * 16, "face_detection",
                                       (("Inference-Header-Content-Length", "9"),))
    yield "bin.overflowing-shape", _binary(header(0, [0, 3, 4611686018427387904, 1]), b"")
    yield "bin.empty-tensor", _binary(header(0, [1, 0, 128, 3]), b"")
    yield "bin.wrong-dtype", _binary(header(full // 2, datatype="FP16"), b"\0" * (full // 2))
    yield "bin.nan-header", infer(b'{"inputs": NaN}', "face_detection", (("Inference-Header-Content-Length", "15"),))


def _frame_cases() -> Iterator[tuple[str, bytes]]:
    """Frames through the manifest's pre-processing (agent.api.frames): every field wrong in turn."""
    def frame(shape: list[int], datatype: str = "UINT8", size: int | None = None, model: str = "face_frame",
              params: Any = None, name: str = "frame", extra: list[dict[str, Any]] | None = None) -> bytes:
        count = 1
        for d in shape:
            count *= d
        nbytes = size if size is not None else count * (4 if datatype == "FP32" else 1)
        header = {"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                              "parameters": {"binary_data_size": nbytes}}, *(extra or [])],
                  "parameters": {"preprocess": True} if params is None else params}
        head = json.dumps(header).encode()
        return infer(head + b"\x80" * nbytes, model, (("Inference-Header-Content-Length", str(len(head))),))

    ok = [48, 64, 3]
    for value in (5, "yes", None, [], {}, 1):
        yield f"frame.preprocess={json.dumps(value)}", frame(ok, params={"preprocess": value})
    for value in (5, "RGB", "", None, [], "bgra", True):
        yield f"frame.frame_color={json.dumps(value)}", frame(ok, params={"preprocess": True, "frame_color": value})
    yield "frame.color-without-preprocess", frame(ok, params={"frame_color": "rgb"})
    for shape in ([48, 64, 5], [48, 64, 2], [2, 48, 64, 3], [1, 1, 48, 64, 3], [48], [], [0, 64, 3], [48, 0, 3],
                  [16385, 1, 3], [1, 16385], [1, 1, 1, 7]):
        yield f"frame.shape={shape}", frame(shape)
    for datatype in ("FP32", "INT8", "UINT16", "BOOL"):
        yield f"frame.datatype={datatype}", frame(ok, datatype)
    yield "frame.truncated", frame(ok, size=48 * 64 * 3 - 1)
    yield "frame.two-inputs", frame(ok, extra=[{"name": "other", "shape": [1], "datatype": "UINT8", "data": [1]}])
    yield "frame.no-manifest", frame(ok, model="face_detection")
    yield "frame.audio-model", frame(ok, model="silero_vad")
    yield "frame.json-nested-wrong", infer({"inputs": [{"name": "f", "shape": [2, 2, 3], "datatype": "UINT8",
                                                        "data": [[[1, 2, 3]] * 2, [[1, 2]] * 2]}],
                                            "parameters": {"preprocess": True}}, "face_frame")
    yield "frame.json-out-of-range", infer({"inputs": [{"name": "f", "shape": [1, 1, 3], "datatype": "UINT8",
                                                        "data": [256, -1, 3]}],
                                            "parameters": {"preprocess": True}}, "face_frame")


def _json_cases() -> Iterator[tuple[str, bytes]]:
    for name, body in [
        ("json.invalid", b"{not json"), ("json.empty", b""), ("json.null", b"null"), ("json.list", b"[1, 2]"),
        ("json.string", b'"text"'), ("json.nan", b'{"inputs": NaN}'), ("json.deep", b"[" * 100_000 + b"]" * 100_000),
        ("json.bignum", b'{"inputs": [{"name": "sr", "shape": [], "datatype": "INT64", "data": '
                        + b"9" * 5000 + b"}]}"),
        ("json.bad-utf8", b'{"inputs": "\xff\xfe"}'), ("json.trailing", json.dumps(silero_v2()).encode() + b"}"),
        ("json.deep-data", json.dumps(silero_v2()).encode().replace(b'"data": 16000', b'"data": ' + b"[" * 500
                                                                    + b"1" + b"]" * 500)),
    ]:
        yield name, infer(body)


def _line_cases() -> Iterator[tuple[str, bytes]]:
    yield from [
        ("line.garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), ("line.nul", b"GET /\x00 HTTP/1.1\r\n\r\n"),
        ("line.no-target", b"GET HTTP/1.1\r\n\r\n"), ("line.no-method", b" / HTTP/1.1\r\n\r\n"),
        ("line.lowercase", b"get / HTTP/1.1\r\n\r\n"), ("line.lf-only", b"GET / HTTP/1.1\nHost: x\n\n"),
        ("line.tabs", b"GET\t/\tHTTP/1.1\r\n\r\n"), ("line.extra-token", b"GET / HTTP/1.1 extra\r\n\r\n"),
        ("line.version-garbage", b"GET / HTTQ/1.1\r\n\r\n"), ("line.http09", b"GET /v2/health/live\r\n"),
        ("line.http09-blank", b"GET /v2/health/live\r\n\r\n"),
        ("line.http2-prior", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("line.http20", b"GET / HTTP/2.0\r\n\r\n"), ("line.http12", b"GET / HTTP/1.2\r\n\r\n"),
        ("line.long-method", b"G" * 10_000 + b" / HTTP/1.1\r\n\r\n"),
        ("line.long-target", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"),
        ("line.bad-url", b"GET /\xff\xfe HTTP/1.1\r\n\r\n"), ("line.authority", b"GET host:80 HTTP/1.1\r\n\r\n"),
        ("line.asterisk", b"GET * HTTP/1.1\r\n\r\n"), ("line.only-crlf", b"\r\n\r\n\r\n"),
        ("line.unicode-version", "GET /v2/models/silero_vad/versions/\u00b2 HTTP/1.1\r\n\r\n".encode()),
        ("line.huge-version", ("GET /v2/models/silero_vad/versions/" + "9" * 5000 + " HTTP/1.1\r\n\r\n").encode()),
    ]


def _header_cases() -> Iterator[tuple[str, bytes]]:
    base = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
    yield from [
        ("hdr.20KiB", base + b"X-A: " + b"a" * 20_000 + b"\r\n\r\n"),
        ("hdr.1MiB", base + b"X-A: " + b"a" * (1 << 20) + b"\r\n\r\n"),
        ("hdr.16MiB-no-end", base + b"X-A: " + b"a" * (16 << 20)),
        ("hdr.10000", base + b"".join(b"X-%d: y\r\n" % i for i in range(10_000)) + b"\r\n"),
        ("hdr.no-colon", base + b"NoColon\r\n\r\n"), ("hdr.nul", base + b"X-A: a\x00b\r\n\r\n"),
        ("hdr.space-before-colon", base + b"X-A : b\r\n\r\n"), ("hdr.obs-fold", base + b"X-A: b\r\n c\r\n\r\n"),
        ("hdr.cl-twice", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3"
                         b"\r\n\r\n{}"),
        ("hdr.cl-and-te", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: 2\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        ("hdr.cl-negative", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
        ("hdr.cl-text", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: ten\r\n\r\n"),
        ("hdr.cl-huge", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n"),
        ("hdr.cl-over-limit", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"),
        ("hdr.te-gzip", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nxx"),
        ("hdr.expect-too-large", b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: 999999999\r\n"
                                 b"Expect: 100-continue\r\n\r\n"),
        ("hdr.ihcl-dup", infer(json.dumps(silero_v2()).encode(), "silero_vad",
                               (("Inference-Header-Content-Length", "5"), ("Inference-Header-Content-Length", "x")))),
        ("hdr.websocket", b"GET /v2/health/live HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81"),
    ]


def _chunk_cases() -> Iterator[tuple[str, bytes]]:
    head = b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    yield from [
        ("chunk.bad-size", head + b"zz\r\n{}\r\n0\r\n\r\n"), ("chunk.no-crlf", head + b"2\r\n{}0\r\n\r\n"),
        ("chunk.overflow", head + b"ffffffffffffffffffff\r\nx\r\n"), ("chunk.negative", head + b"-2\r\n{}\r\n"),
        ("chunk.longer-than-size", head + b"2\r\n{}}}}\r\n0\r\n\r\n"),
        ("chunk.huge-extension", head + b"2;" + b"e" * 100_000 + b"\r\n{}\r\n0\r\n\r\n"),
        ("chunk.tiny", head + b"1\r\n{\r\n" * 50_000),
        ("chunk.huge-trailer", head + b"2\r\n{}\r\n0\r\nX-T: " + b"t" * 100_000 + b"\r\n\r\n"),
        ("chunk.over-limit", head + (b"100000\r\n" + b"[" * 0x100000 + b"\r\n") * 5),
        ("chunk.bad-json", head + b"9\r\n{not json\r\n0\r\n\r\n"),
    ]


def _method_cases() -> Iterator[tuple[str, bytes]]:
    for method, target in [("OPTIONS", "/v2/health/live"), ("OPTIONS", "*"), ("TRACE", "/v2/health/live"),
                           ("CONNECT", "localhost:443"), ("PATCH", "/v2/models/silero_vad/infer"),
                           ("DELETE", "/v2/models/silero_vad"), ("PUT", "/v1/agent/status"),
                           ("GET", "/v2/models/silero_vad/infer"), ("POST", "/v2/health/live"),
                           ("BREW", "/v2/health/live"), ("HEAD", "/v2/models/silero_vad/infer"),
                           ("GET", "/v1/models/nope:predict"), ("HEAD", "/v3/none")]:
        yield f"method.{method}.{target[:20]}", http(method, target, b"" if method in ("POST", "PATCH", "PUT") else
                                                    None)


# -- scenarios: several connections, or pacing ------------------------------------------------------------------------
def _slowloris(path: Path, clients: int = 40) -> list[Outcome]:
    """Heads dripped a byte at a time: each is answered 408 (or closed) by the header timeout."""
    conns = [Conn(path) for _ in range(clients)]
    for c in conns:
        c.send(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: ")
    for _ in range(6):
        for c in conns:
            c.send(b"a")
        time.sleep(0.25)
    return [c.outcome(note="slowloris") for c in conns]


def _slow_bodies(path: Path, clients: int = 10) -> list[Outcome]:
    conns = [Conn(path) for _ in range(clients)]
    for c in conns:
        c.send(b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{")
    return [c.outcome(note="slow body") for c in conns]


def _flood(path: Path, clients: int = 200) -> list[Outcome]:
    """More idle connections than the cap (64): a new client is still served (the idlest make room),
    and every idle one ends closed (made room, or its keep-alive timeout)."""
    conns = [Conn(path) for _ in range(clients)]
    ok = Conn(path)
    ok.send(http())
    assert ok.response() == 200
    ok.close()
    return [c.outcome(note="idle flood") for c in conns]


def _pipelined_unread(path: Path) -> list[Outcome]:
    """2,000 pipelined health checks and 400 predicts, never read, then closed."""
    a, b = Conn(path), Conn(path)
    t = threading.Thread(target=a.send, args=(http() * 2000,), daemon=True)
    t.start()
    body = json.dumps(silero_v2()).encode()
    u = threading.Thread(target=b.send, args=(infer(body) * 400,), daemon=True)
    u.start()
    time.sleep(0.5)
    a.close()
    b.close()
    return [Outcome([], True, "pipelined, unread")]


def _pipelined_mixture(path: Path) -> list[Outcome]:
    """Valid, malformed, valid on one connection: answered 200, 400, 200 in order."""
    c = Conn(path)
    c.send(http() + infer(b"{not json") + http())
    statuses = [c.response() for _ in range(3)]
    c.close()
    assert statuses == [200, 400, 200], statuses
    return [Outcome([400], True)]


def _pipelined_then_garbage(path: Path) -> list[Outcome]:
    c = Conn(path)
    c.send(http() + b"\x00\x01garbage\r\n\r\n" + http())
    first = c.response()
    assert first == 200
    return [c.outcome(2)]


def _head_in_step(path: Path) -> list[Outcome]:
    c = Conn(path)
    c.send(http("HEAD", "/v2/models/silero_vad") + http("HEAD", "/metrics")
           + http("HEAD", "/v1/models/silero_vad:predict") + http())
    assert c.response(head_only=True) == 200 and c.response(head_only=True) == 200
    refused = c.response(head_only=True)
    assert refused == 405, refused
    assert c.response() == 200  # still in step: no body after a HEAD's answer
    c.close()
    return [Outcome([405], True)]


def _bodies_over_budget(path: Path, clients: int = 6) -> list[Outcome]:
    """Six 3.9 MiB bodies at once against an 8 MiB budget: the ones over it are refused (503)."""
    conns = [Conn(path) for _ in range(clients)]
    size = 4_000_000
    for c in conns:
        c.send(b"POST /v2/models/silero_vad/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"[" * 1000)
    return [c.outcome(note="over budget") for c in conns]


Case = tuple[str, Callable[[Path], list[Outcome]], int]  # (id, run, 2xx answers allowed)


def _raw_case(name: str, data: bytes) -> Case:
    # An upgrade request may be answered as plain HTTP (then closed): one 2xx is allowed for it.
    return name, lambda path: raw(path, data), 1 if b"\r\nUpgrade:" in data.split(b"\r\n\r\n")[0] else 0


def _unique(cases: list[Case]) -> list[Case]:
    seen: dict[str, int] = {}
    out = []
    for name, run, allow_ok in cases:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", run, allow_ok))
    return out


CASES: list[Case] = _unique([
    *(_raw_case(n, d) for n, d in _line_cases()),
    *(_raw_case(n, d) for n, d in _header_cases()),
    *(_raw_case(n, d) for n, d in _chunk_cases()),
    *(_raw_case(n, d) for n, d in _json_cases()),
    *(_raw_case(n, d) for n, d in _binary_cases()),
    *(_raw_case(n, d) for n, d in _frame_cases()),
    *(_raw_case(n, d) for n, d in _v2_field_cases()),
    *(_raw_case(n, d) for n, d in _v1_field_cases()),
    *(_raw_case(n, d) for n, d in _method_cases()),
    ("control.deploy-list", lambda p: raw(p, http("POST", "/v1/agent/models/silero_vad:deploy", b"[1]")), 0),
    ("control.deploy-version-str", lambda p: raw(p, http("POST", "/v1/agent/models/silero_vad:deploy",
                                                         b'{"version": "2"}')), 0),
    ("control.stream-unknown", lambda p: raw(p, http("POST", "/v1/agent/streams/nope:start", b"")), 0),
    ("control.sse-unknown", lambda p: raw(p, http("GET", "/v1/agent/streams/nope/results")), 0),
    ("scenario.slowloris", _slowloris, 0),
    ("scenario.slow-bodies", _slow_bodies, 0),
    ("scenario.idle-flood", _flood, 0),
    ("scenario.pipelined-unread", _pipelined_unread, 0),
    ("scenario.pipelined-mixture", _pipelined_mixture, 0),
    ("scenario.pipelined-then-garbage", _pipelined_then_garbage, 0),
    ("scenario.head-in-step", _head_in_step, 0),
    ("scenario.bodies-over-budget", _bodies_over_budget, 0),
])


def start_fuzz_agent(work: Path, samples: dict[str, Path]) -> Any:
    from tests.conftest import install, start_daemon

    for name in MODELS:
        install(work / "models", samples, name)
    # Face detection again, with a manifest declaring its image pre-processing (frames are sent to it).
    path = install(work / "models", samples, "face_detection", as_name="face_frame")
    (path.parent / "manifest.json").write_text(json.dumps({
        "model": path.name, "runtime": "tflite",
        "preprocess": {"type": "image", "resize": "letterbox", "scale": 1 / 127.5, "offset": -1.0}}))
    (work / "agent.toml").write_text(API_CONFIG)
    return start_daemon(work, "--config", str(work / "agent.toml"), "--models-dir", str(work / "models"))


# -- the test -------------------------------------------------------------------------------------------------------
@dataclass
class Fuzz:
    daemon: Any
    reference: Any
    baseline_rss: int
    peak_rss: int = 0
    tried: int = 0


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, samples) -> Iterator[Fuzz]:
    import onnxruntime as ort
    import psutil

    daemon = start_fuzz_agent(tmp_path_factory.mktemp("fuzz"), samples)
    reference = ort.InferenceSession(str(samples["silero_vad"]), providers=["CPUExecutionProvider"])
    for _ in range(20):  # warm: first calls allocate
        daemon.client.infer("silero_vad", FEEDS)
    rss = psutil.Process(daemon.proc.pid).memory_info().rss
    state = Fuzz(daemon, reference, rss, rss)
    yield state
    assert daemon.stop() == 0


FEEDS = {"input": (0.1 * np.sin(np.arange(576, dtype=np.float32) / 7))[None].astype(np.float32),
         "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100, len(CASES)
    assert len({name for name, _, _ in CASES}) == len(CASES), "case ids are unique"


@pytest.mark.parametrize(("name", "run", "allow_ok"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_refused_and_the_agent_stays_right(fuzz, name, run, allow_ok):
    import psutil

    from agent.client import AgentClient

    outcomes = run(fuzz.daemon.socket)
    fuzz.tried += 1
    problems = judge(outcomes, allow_ok)
    assert not problems, problems
    assert fuzz.daemon.proc.poll() is None, f"the agent died:\n{fuzz.daemon.log_text()[-3000:]}"
    with AgentClient(fuzz.daemon.socket) as client:  # a fresh connection: the case's may be gone
        assert client.request("GET", "/v2/health/live")[0] == 200
        out = client.infer("silero_vad", FEEDS)
    np.testing.assert_allclose(out["output"], fuzz.reference.run(["output"], FEEDS)[0], rtol=1e-5, atol=1e-6)
    fuzz.peak_rss = max(fuzz.peak_rss, psutil.Process(fuzz.daemon.proc.pid).memory_info().rss)


def test_memory_stayed_bounded_over_the_fuzz(fuzz):
    assert fuzz.tried == len(CASES)
    growth = fuzz.peak_rss - fuzz.baseline_rss
    assert growth < 200 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert "api.unhandled" not in fuzz.daemon.log_text(), "a request reached a 500 internal"
