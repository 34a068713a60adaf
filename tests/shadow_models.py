"""Real candidate pairs for shadow tests and benchmarks: a float ONNX classifier, its int8 dynamic
quantization (``onnxruntime.quantization.quantize_dynamic``) and a deliberately wrong copy whose
input features are shuffled (same shapes, same speed, unrelated answers)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

FEATURES, HIDDEN, CLASSES = 64, 256, 10


def classifier(path: Path, *, seed: int = 0, shuffle_inputs: bool = False) -> Path:
    """A 64 → 256 → 10 MLP with softmax ``probabilities``, dynamic batch; ``shuffle_inputs`` permutes
    the first layer's input rows (the model reads its features in the wrong order)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN) * 3).astype(np.float32)
    b2 = np.zeros(CLASSES, np.float32)
    if shuffle_inputs:
        w1 = w1[np.random.default_rng(seed + 1).permutation(FEATURES)]
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
             helper.make_node("Add", ["l0", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def quantized(source: Path, path: Path) -> Path:
    """``source`` with int8 weights (dynamic quantization of its MatMuls)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8)
    return path


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, FEATURES)).astype(np.float32)


def onnx_runner(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def top1_agreement(a: Path, b: Path, n: int = 2000) -> float:
    """Offline: how often two classifiers' top-1 agree on ``n`` random inputs (the figure a shadow should find)."""
    x = inputs(n, seed=99).reshape(n, FEATURES)
    pa = onnx_runner(a, {"input": x})["probabilities"]
    pb = onnx_runner(b, {"input": x})["probabilities"]
    return float((pa.argmax(1) == pb.argmax(1)).mean())
