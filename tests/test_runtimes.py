"""Runtime backends against the real sample models: metadata, parity with the bare runtimes,
quantization, delegate fallback, load errors, and request checks (``check_feeds``)."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from agent.errors import InferenceError, ModelLoadError, RequestError, RuntimeUnavailableError
from agent.hardware import DelegateSpec
from agent.models.tensors import check_feeds
from agent.runtimes import Session, backend_for_file, get_backend
from agent.runtimes.litert import LiteRTBackend
from agent.runtimes.onnx import OnnxBackend

NABU_IN = "serving_default_input_audio:0"
NABU_OUT = "StatefulPartitionedCall:0"


# -- helpers ---------------------------------------------------------------------------------
def vad_feeds(rows: int, seed: int = 0, sr: int = 16000) -> dict[str, np.ndarray]:
    """Sine tones plus noise, 64 context + 512 new samples per row (16 kHz), and a random state."""
    rng = np.random.default_rng(seed)
    t = np.arange(576) / sr
    freqs = rng.uniform(150, 900, size=(rows, 1))
    audio = 0.4 * np.sin(2 * np.pi * freqs * t) + 0.05 * rng.standard_normal((rows, 576))
    return {
        "input": audio.astype(np.float32),
        "state": (0.1 * rng.standard_normal((2, rows, 128))).astype(np.float32),
        "sr": np.array(sr, np.int64),
    }


def photo(path: Path) -> np.ndarray:
    """The photo as face detection wants it: [1, 128, 128, 3] float32 in [-1, 1]."""
    img = Image.open(path).convert("RGB").resize((128, 128), Image.Resampling.BILINEAR)
    return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


def nabu_frames() -> list[np.ndarray]:
    """80 feature frames that drive okay_nabu's (stateful, streaming) output well above zero."""
    rng = np.random.default_rng(0)
    blocks = [(0, 25), (0, 5), (-10, 10), (0, 1)]
    return [rng.uniform(lo, hi, (1, 3, 40)).astype(np.float32) for lo, hi in blocks for _ in range(20)]


def invoke(interp: Interpreter, value: np.ndarray) -> np.ndarray:
    interp.set_tensor(interp.get_input_details()[0]["index"], value)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


@pytest.fixture(scope="module")
def silero(samples: dict[str, Path]) -> Session:
    return OnnxBackend().load(samples["silero_vad"], [])


@pytest.fixture(scope="module")
def faces(samples: dict[str, Path]) -> Session:
    return LiteRTBackend().load(samples["face_detection"], [])


def load_nabu(samples: dict[str, Path]) -> Session:
    """A fresh okay_nabu session: the model keeps streaming state between invocations."""
    return LiteRTBackend().load(samples["okay_nabu"], [])


# -- metadata --------------------------------------------------------------------------------
def test_onnx_metadata_of_silero(silero: Session) -> None:
    inputs = {s.name: s for s in silero.inputs}
    outputs = {s.name: s for s in silero.outputs}
    assert [s.name for s in silero.inputs] == ["input", "state", "sr"]
    assert [s.name for s in silero.outputs] == ["output", "stateN"]
    assert inputs["input"].dtype == np.float32
    assert inputs["input"].shape == (None, None)
    assert inputs["state"].shape == (2, None, 128)
    assert inputs["state"].shape_list() == [2, -1, 128]
    assert inputs["sr"].dtype == np.int64
    assert inputs["sr"].shape == ()
    assert outputs["output"].shape == (None, 1)
    assert outputs["stateN"].shape == (None, None, None)
    assert all(s.quantization is None for s in (*silero.inputs, *silero.outputs))
    assert inputs["state"].to_dict() == {"name": "state", "dtype": "float32", "shape": [2, -1, 128]}
    assert silero.delegate == "CPUExecutionProvider"
    assert silero.report.fallbacks == []


def test_litert_metadata_of_face_detection(faces: Session) -> None:
    (inp,) = faces.inputs
    assert (inp.name, inp.dtype, inp.shape, inp.quantization) == ("input", np.float32, (1, 128, 128, 3), None)
    assert inp.dynamic_axes == ()
    assert {s.name: s.shape for s in faces.outputs} == {
        "regressors": (1, 896, 16),
        "classificators": (1, 896, 1),
    }
    assert faces.delegate == "xnnpack"


def test_litert_metadata_of_quantized_okay_nabu(samples: dict[str, Path]) -> None:
    nabu = load_nabu(samples)
    (inp,) = nabu.inputs
    (out,) = nabu.outputs
    assert (inp.name, inp.dtype, inp.shape) == (NABU_IN, np.int8, (1, 3, 40))
    assert (out.name, out.dtype, out.shape) == (NABU_OUT, np.uint8, (1, 1))
    assert inp.quantization is not None
    assert inp.quantization.zero_point == -128
    assert inp.quantization.scale == pytest.approx(0.10196078)
    assert out.quantization is not None
    assert (out.quantization.scale, out.quantization.zero_point) == (1 / 256, 0)
    assert inp.to_dict()["quantization"] == {"scale": inp.quantization.scale, "zero_point": -128}


# -- parity with the bare runtimes -----------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 4])
def test_silero_run_equals_onnxruntime(silero: Session, samples: dict[str, Path], rows: int) -> None:
    feeds = vad_feeds(rows, seed=rows)
    direct = ort.InferenceSession(str(samples["silero_vad"]), providers=["CPUExecutionProvider"])
    want_out, want_state = direct.run(["output", "stateN"], feeds)

    got = silero.run(feeds)

    assert set(got) == {"output", "stateN"}
    assert got["output"].shape == (rows, 1)
    assert got["stateN"].shape == (2, rows, 128)
    np.testing.assert_allclose(got["output"], want_out, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["stateN"], want_state, rtol=0, atol=1e-6)
    assert np.all((got["output"] > 0) & (got["output"] < 1))


def test_face_detection_run_equals_litert(faces: Session, samples: dict[str, Path]) -> None:
    image = photo(samples["astronaut"])
    interp = Interpreter(model_path=str(samples["face_detection"]))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], image)
    interp.invoke()
    want = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}

    got = faces.run({"input": image})

    assert set(got) == {"regressors", "classificators"}
    np.testing.assert_allclose(got["regressors"], want["regressors"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["classificators"], want["classificators"], rtol=0, atol=1e-5)
    # The astronaut's face is found; the coffee cup has none.
    assert 1 / (1 + np.exp(-got["classificators"].max())) > 0.8
    coffee = faces.run({"input": photo(samples["coffee"])})
    assert 1 / (1 + np.exp(-coffee["classificators"].max())) < 0.5


def test_fixed_batch_litert_model_refuses_another_batch_size(faces: Session, samples: dict[str, Path]) -> None:
    """LiteRT must not resize a batch-1 model (it would answer with wrong shapes); it stays usable."""
    image = photo(samples["astronaut"])
    before = faces.run({"input": image})["classificators"]
    with pytest.raises(InferenceError, match="tflite inference failed"):
        faces.run({"input": np.concatenate([image, image])})
    np.testing.assert_array_equal(faces.run({"input": image})["classificators"], before)


# -- quantization ----------------------------------------------------------------------------
def test_float_input_is_quantized_like_a_manual_invoke(samples: dict[str, Path]) -> None:
    nabu = load_nabu(samples)
    q_in, q_out = nabu.inputs[0].quantization, nabu.outputs[0].quantization
    assert q_in is not None and q_out is not None
    interp = Interpreter(model_path=str(samples["okay_nabu"]))
    interp.allocate_tensors()

    got, want = [], []
    for frame in nabu_frames():
        manual = np.clip(np.round(frame / q_in.scale) + q_in.zero_point, -128, 127).astype(np.int8)
        raw = invoke(interp, manual)
        want.append((raw.astype(np.float32) - q_out.zero_point) * q_out.scale)
        result = nabu.run({NABU_IN: frame})[NABU_OUT]
        assert result.dtype == np.float32
        got.append(result)

    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))
    assert np.concatenate(got).max() > 0.02  # the frames really drive the model


def test_raw_int8_input_passes_through(samples: dict[str, Path]) -> None:
    q_in = load_nabu(samples).inputs[0].quantization
    assert q_in is not None
    frames = nabu_frames()
    as_float, as_int8 = load_nabu(samples), load_nabu(samples)

    from_float = [as_float.run({NABU_IN: f})[NABU_OUT] for f in frames]
    from_int8 = [as_int8.run({NABU_IN: q_in.quantize(f, np.dtype(np.int8))})[NABU_OUT] for f in frames]

    np.testing.assert_array_equal(np.concatenate(from_int8), np.concatenate(from_float))
    assert np.concatenate(from_float).max() > 0.02


def test_raw_outputs_stay_uint8(samples: dict[str, Path]) -> None:
    nabu = load_nabu(samples)
    interp = Interpreter(model_path=str(samples["okay_nabu"]))
    interp.allocate_tensors()
    q_in = nabu.inputs[0].quantization
    assert q_in is not None

    raws = []
    for frame in nabu_frames():
        raw = nabu.run({NABU_IN: frame}, raw_outputs=True)[NABU_OUT]
        assert raw.dtype == np.uint8
        assert raw.shape == (1, 1)
        np.testing.assert_array_equal(raw, invoke(interp, q_in.quantize(frame, np.dtype(np.int8))))
        raws.append(int(raw[0, 0]))
    assert max(raws) > 5


def test_wrong_dtype_for_quantized_input_is_a_request_error(samples: dict[str, Path]) -> None:
    nabu = load_nabu(samples)
    with pytest.raises(RequestError, match=f"input '{NABU_IN}'.*int32"):
        nabu.run({NABU_IN: np.zeros((1, 3, 40), np.int32)})


def test_wrong_dtype_for_float_input_is_a_request_error(silero: Session) -> None:
    feeds = vad_feeds(1)
    feeds["input"] = feeds["input"].astype(np.float64)
    with pytest.raises(RequestError, match="input 'input': expected dtype float32, got float64"):
        silero.run(feeds)
    with pytest.raises(RequestError, match="missing input 'sr'"):
        silero.run({"input": vad_feeds(1)["input"], "state": vad_feeds(1)["state"]})


def test_quantize_clips_to_the_integer_range(samples: dict[str, Path]) -> None:
    q = load_nabu(samples).inputs[0].quantization
    assert q is not None
    values = np.array([-1.0, 0.0, 0.102, 12.9, 1000.0], np.float32)
    np.testing.assert_array_equal(q.quantize(values, np.dtype(np.int8)), [-128, -128, -127, -1, 127])
    np.testing.assert_allclose(q.dequantize(np.array([-128, 127], np.int8)), [0.0, 255 * q.scale], rtol=1e-6)


# -- delegate fallback -----------------------------------------------------------------------
def test_litert_falls_back_from_a_missing_edge_tpu(samples: dict[str, Path]) -> None:
    if ctypes.util.find_library("edgetpu"):
        pytest.skip("this machine has an Edge TPU runtime")
    specs = [DelegateSpec("edgetpu", library="libedgetpu.so.1"), DelegateSpec("xnnpack")]

    session = LiteRTBackend().load(samples["face_detection"], specs)

    assert session.delegate == "xnnpack"
    assert session.report.fallbacks == ["edgetpu: library libedgetpu.so.1 not found"]
    chosen, skipped = LiteRTBackend().choose(specs)
    assert chosen.name == "xnnpack"
    assert skipped == session.report.fallbacks


# ai_edge_litert's Delegate.__del__ trips over its own half-built object after a failed load.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_litert_falls_back_when_a_delegate_library_does_not_load(samples: dict[str, Path], tmp_path: Path) -> None:
    """A library that exists but is no shared object passes the probe and fails at load."""
    fake = tmp_path / "libtensorflowlite_gpu_delegate.so"
    fake.write_bytes(b"not an ELF file")
    missing = tmp_path / "libhailo_tflite_delegate.so"
    specs = [DelegateSpec("hailo", library=str(missing)), DelegateSpec("gpu", library=str(fake))]

    session = LiteRTBackend().load(samples["face_detection"], specs)

    assert session.delegate == "xnnpack"
    assert len(session.report.fallbacks) == 2
    assert session.report.fallbacks[0] == f"hailo: library {missing} not found"
    assert session.report.fallbacks[1].startswith(f"gpu: failed to load: {fake}")
    # choose() only probes, so the broken-but-present library looks usable to it.
    chosen, skipped = LiteRTBackend().choose(specs)
    assert chosen.name == "gpu"
    assert skipped == [f"hailo: library {missing} not found"]
    assert LiteRTBackend().probe(DelegateSpec("coral")) == "no delegate library configured"


def test_onnx_falls_back_from_an_ep_missing_in_this_build(samples: dict[str, Path]) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()
    specs = [DelegateSpec("CUDAExecutionProvider"), DelegateSpec("CPUExecutionProvider")]

    session = OnnxBackend().load(samples["silero_vad"], specs)

    assert session.delegate == "CPUExecutionProvider"
    (reason,) = session.report.fallbacks
    assert reason.startswith("CUDAExecutionProvider: not in this onnxruntime build (has ")
    assert "CPUExecutionProvider" in reason
    chosen, skipped = OnnxBackend().choose(specs)
    assert chosen.name == "CPUExecutionProvider"
    assert skipped == [reason]
    np.testing.assert_allclose(
        session.run(vad_feeds(1))["output"], OnnxBackend().load(samples["silero_vad"], []).run(vad_feeds(1))["output"]
    )


def test_cpu_is_appended_when_the_profile_omits_it() -> None:
    chosen, skipped = OnnxBackend().choose([DelegateSpec("TensorrtExecutionProvider")])
    assert chosen.name == "CPUExecutionProvider"
    assert [s.split(":")[0] for s in skipped] == ["TensorrtExecutionProvider"]


# -- load errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["silero_vad", "face_detection"])
@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_model_is_a_load_error_naming_the_path(
    samples: dict[str, Path], tmp_path: Path, model: str, damage: str
) -> None:
    source = samples[model]
    bad = tmp_path / f"model{source.suffix}"
    data = source.read_bytes()
    bad.write_bytes(np.random.default_rng(7).bytes(4096) if damage == "random" else data[: len(data) // 2])

    with pytest.raises(ModelLoadError) as info:
        backend_for_file(bad).load(bad, [])

    assert str(bad) in str(info.value)
    assert info.value.path == str(bad)
    assert info.value.reason  # the runtime's own words, not empty


def test_missing_model_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tmp_path / "model.onnx")):
        OnnxBackend().load(tmp_path / "model.onnx", [])


def test_backend_lookup() -> None:
    assert isinstance(backend_for_file(Path("m/1/model.onnx")), OnnxBackend)
    assert isinstance(backend_for_file(Path("m/1/model.tflite")), LiteRTBackend)
    assert isinstance(get_backend("onnx"), OnnxBackend)
    assert isinstance(get_backend("tflite"), LiteRTBackend)
    with pytest.raises(RuntimeUnavailableError, match=r"model\.pt"):
        backend_for_file(Path("m/1/model.pt"))
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime 'nope'"):
        get_backend("nope")


# -- threads ---------------------------------------------------------------------------------
def test_onnx_threads_setting_reaches_the_session(samples: dict[str, Path]) -> None:
    session = OnnxBackend().load(samples["silero_vad"], [], threads=2, options={"inter_op_threads": 3})
    opts = session._sess.get_session_options()  # type: ignore[attr-defined]
    assert opts.intra_op_num_threads == 2
    assert opts.inter_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = OnnxBackend().load(samples["silero_vad"], [])
    assert default._sess.get_session_options().inter_op_num_threads == 1  # type: ignore[attr-defined]


def test_litert_loads_with_one_thread(samples: dict[str, Path], faces: Session) -> None:
    single = LiteRTBackend().load(samples["face_detection"], [], threads=1)
    image = photo(samples["astronaut"])
    np.testing.assert_allclose(
        single.run({"input": image})["classificators"], faces.run({"input": image})["classificators"], rtol=0, atol=1e-5
    )


# -- check_feeds -----------------------------------------------------------------------------
def test_check_feeds_accepts_good_requests(silero: Session, samples: dict[str, Path]) -> None:
    check_feeds(silero.inputs, vad_feeds(3))
    nabu = load_nabu(samples)
    check_feeds(nabu.inputs, {NABU_IN: np.zeros((1, 3, 40), np.float32)})  # quantized by the agent
    check_feeds(nabu.inputs, {NABU_IN: np.zeros((1, 3, 40), np.int8)})  # raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.update(extra=np.zeros(1, np.float32)), "unknown input 'extra'"),
        (lambda f: f.pop("state"), "missing input 'state'"),
        (lambda f: f.update(input=np.zeros(576, np.float32)), r"input 'input': expected 2 dimensions"),
        (lambda f: f.update(state=np.zeros((3, 1, 128), np.float32)), "input 'state': dimension 0 must be 2"),
        (lambda f: f.update(state=np.zeros((2, 1, 64), np.float32)), "input 'state': dimension 2 must be 128"),
        (lambda f: f.update(sr=np.array(16000, np.int32)), "input 'sr': expected dtype int64, got int32"),
        (lambda f: f.update(input=f["input"].astype(np.float64)), "input 'input': expected dtype float32"),
    ],
    ids=["unknown", "missing", "rank", "static-dim-0", "static-dim-2", "int32-sr", "float64-input"],
)
def test_check_feeds_rejects_bad_requests(silero: Session, change: object, message: str) -> None:
    feeds = vad_feeds(1)
    change(feeds)  # type: ignore[operator]
    with pytest.raises(RequestError, match=message):
        check_feeds(silero.inputs, feeds)


def test_check_feeds_rejects_int32_for_a_quantized_input(samples: dict[str, Path]) -> None:
    nabu = load_nabu(samples)
    with pytest.raises(RequestError, match=f"input '{NABU_IN}': expected dtype int8, got int32"):
        check_feeds(nabu.inputs, {NABU_IN: np.zeros((1, 3, 40), np.int32)})
    with pytest.raises(RequestError, match=f"input '{NABU_IN}': dimension 1 must be 3"):
        check_feeds(nabu.inputs, {NABU_IN: np.zeros((1, 4, 40), np.float32)})


def _silero_feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def test_onnx_optimized_cache_is_written_then_used_and_rebuilt_when_corrupt(samples: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """The first load writes the optimised graph in ONNX Runtime's format; later loads read it and
    answer exactly as the original; a corrupt entry is dropped and rebuilt, never fatal."""
    reference = OnnxBackend().load(samples["silero_vad"], [])
    options = {"cache_dir": tmp_path}
    first = OnnxBackend().load(samples["silero_vad"], [], options=options)
    [entry] = list((tmp_path / "onnx").glob("*.ort"))
    assert entry.stat().st_size > 0 and not list((tmp_path / "onnx").glob(".*.tmp"))
    written = entry.stat().st_mtime_ns
    second = OnnxBackend().load(samples["silero_vad"], [], options=options)
    assert entry.stat().st_mtime_ns == written  # read, not rewritten
    for seed in range(3):
        want = reference.run(_silero_feeds(seed))
        for session in (first, second):
            got = session.run(_silero_feeds(seed))
            assert all(np.array_equal(got[k], want[k]) for k in want)
    entry.write_bytes(b"\x00 not an ORT model")
    third = OnnxBackend().load(samples["silero_vad"], [], options=options)
    assert np.array_equal(third.run(_silero_feeds(7))["output"], reference.run(_silero_feeds(7))["output"])
    assert entry.stat().st_size > 100  # rebuilt


def test_onnx_optimized_cache_is_keyed_by_the_model_bytes(samples: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime

    from agent.runtimes.onnx import _cached_model

    copy = tmp_path / "m" / "model.onnx"
    copy.parent.mkdir()
    copy.write_bytes(samples["silero_vad"].read_bytes())
    OnnxBackend().load(samples["silero_vad"], [], options={"cache_dir": tmp_path / "c"})
    OnnxBackend().load(copy, [], options={"cache_dir": tmp_path / "c"})  # same bytes elsewhere: same entry
    assert len(list((tmp_path / "c" / "onnx").glob("*.ort"))) == 1
    changed = tmp_path / "other.onnx"
    changed.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 1]))
    assert _cached_model(onnxruntime, changed, tmp_path) != _cached_model(onnxruntime, copy, tmp_path)
    assert _cached_model(onnxruntime, copy, tmp_path) == _cached_model(onnxruntime, samples["silero_vad"], tmp_path)
