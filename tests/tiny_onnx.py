"""Tiny ONNX models written as protobuf bytes by hand (the ``onnx`` package is not a dependency).

``broken_vad`` has Silero VAD's inputs and outputs (so the deploy tests' Silero clients can call
it) but answers NaN or infinity in ``output``; ``stateN`` is its ``state`` input, unchanged.
Only the few fields ONNX Runtime needs are written.
"""

from __future__ import annotations

import struct
from pathlib import Path

FLOAT, INT64 = 1, 7  # TensorProto.DataType
ATTR_INT, ATTR_INTS = 2, 7  # AttributeProto.AttributeType


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(field, 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, elem_type) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _node(op: str, inputs: list[str], outputs: list[str], *attrs: bytes) -> bytes:
    body = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    return body + _bytes(3, f"{op}_{outputs[0]}") + _bytes(4, op) + b"".join(_bytes(5, a) for a in attrs)


def _ints_attr(name: str, values: list[int]) -> bytes:
    return _bytes(1, name) + _int(20, ATTR_INTS) + b"".join(_int(8, v) for v in values)


def _int_attr(name: str, value: int) -> bytes:
    return _bytes(1, name) + _int(20, ATTR_INT) + _int(3, value)


def _scalar(name: str, value: float) -> bytes:
    return _int(2, FLOAT) + _bytes(8, name) + _bytes(9, struct.pack("<f", value))


def broken_vad(path: Path, kind: str = "nan") -> Path:
    """Write a Silero-shaped model whose ``output`` is NaN (``kind="nan"``) or +inf (``"inf"``)."""
    # nan: sqrt(-|x| - 1); inf: 1 / (0 * x)
    if kind == "nan":
        nodes = [_node("Abs", ["input"], ["a"]), _node("Neg", ["a"], ["b"]), _node("Sub", ["b", "one"], ["c"]),
                 _node("Sqrt", ["c"], ["d"])]
    else:
        nodes = [_node("Mul", ["input", "zero"], ["c"]), _node("Abs", ["c"], ["c2"]),
                 _node("Div", ["one", "c2"], ["d"])]
    nodes += [_node("ReduceMean", ["d"], ["output"], _ints_attr("axes", [1]), _int_attr("keepdims", 1)),
              _node("Identity", ["state"], ["stateN"])]
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, f"broken_{kind}")
    graph += _bytes(5, _scalar("one", 1.0)) + (_bytes(5, _scalar("zero", 0.0)) if kind != "nan" else b"")
    graph += _bytes(11, _value_info("input", FLOAT, ["batch", 576]))
    graph += _bytes(11, _value_info("state", FLOAT, [2, "batch", 128]))
    graph += _bytes(11, _value_info("sr", INT64, []))
    graph += _bytes(12, _value_info("output", FLOAT, ["batch", 1]))
    graph += _bytes(12, _value_info("stateN", FLOAT, [2, "batch", 128]))
    model = _int(1, 8) + _bytes(8, _bytes(1, "") + _int(2, 13)) + _bytes(2, "edge-agent-tests") + _bytes(7, graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    return path
