"""The NPU runtimes ``hef`` (HailoRT) and ``rknn`` (Rockchip), on a machine that has neither.

What runs here: registration, model file names, the manifest, selection, and every error path with
the real packages absent (the errors name the package). Fake ``hailo_platform`` / ``rknnlite``
modules are injected only to drive the import, selection, load-error and fallback paths; no
inference runs through them and nothing here shows that inference works on the hardware.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import orjson
import pytest

from agent.config import RuntimeSection
from agent.core.metrics import Metrics
from agent.errors import ModelLoadError, RuntimeUnavailableError
from agent.hardware import DelegateSpec, load_profiles
from agent.models.registry import ModelRegistry
from agent.models.store import scan
from agent.runtimes import BACKENDS, MODEL_FILES, backend_for_file, get_backend
from agent.runtimes.hailo import HailoBackend
from agent.runtimes.rknn import RknnBackend
from cloud_sync.bundles.manifest import Manifest
from cloud_sync.errors import ManifestError

MANIFEST = {"schema_version": 1, "name": "det", "version": 1, "runtime": "rknn", "model": "model.rknn",
            "inputs": [{"name": "images", "dtype": "uint8", "shape": [1, 640, 640, 3]}],
            "outputs": [{"name": "boxes", "dtype": "float32", "shape": [1, 8400, 84]}]}


@pytest.fixture(autouse=True)
def _packages_absent(monkeypatch):
    """Make sure the real packages are absent even on a machine that has them."""
    for name in ("hailo_platform", "rknnlite", "rknnlite.api"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "import X" raises ImportError


def model_file(tmp_path: Path, name: str, manifest: dict | None = None) -> Path:
    path = tmp_path / "models" / "det" / "1" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"compiled model bytes")
    if manifest is not None:
        (path.parent / "manifest.json").write_bytes(orjson.dumps(manifest))
    return path


# -- registration ------------------------------------------------------------------------------
def test_registered_with_their_model_files():
    assert BACKENDS["hef"] is HailoBackend and BACKENDS["rknn"] is RknnBackend
    assert MODEL_FILES["model.hef"] == "hef" and MODEL_FILES["model.rknn"] == "rknn"
    assert isinstance(backend_for_file(Path("x/model.hef")), HailoBackend)
    assert isinstance(backend_for_file(Path("x/model.rknn")), RknnBackend)
    assert HailoBackend.cpu_delegate is None and RknnBackend.cpu_delegate is None


def test_store_finds_npu_models(tmp_path):
    model_file(tmp_path, "model.hef")
    (found,) = scan(tmp_path / "models")["det"]
    assert (found.runtime, found.file.name) == ("hef", "model.hef")


def test_manifest_accepts_npu_runtimes():
    assert Manifest.from_dict(MANIFEST).runtime == "rknn"
    assert Manifest.from_dict({**MANIFEST, "runtime": "hef", "model": "model.hef"}).runtime == "hef"
    with pytest.raises(ManifestError, match=r"needs a \.hef model file"):
        Manifest.from_dict({**MANIFEST, "runtime": "hef"})


# -- packages absent: unavailable, with the package named ----------------------------------------
@pytest.mark.parametrize(("runtime", "package"), [("hef", "hailo_platform"), ("rknn", "rknnlite")])
def test_absent_package_is_named(tmp_path, runtime, package):
    backend = get_backend(runtime)
    with pytest.raises(RuntimeUnavailableError, match=f"Python package {package} .* is not importable"):
        backend.version()
    reason = backend.probe(DelegateSpec(backend.default_delegate or ""))
    assert reason is not None and package in reason
    with pytest.raises(RuntimeUnavailableError, match=package):
        backend.load(model_file(tmp_path, f"model.{runtime}", MANIFEST), [])
    with pytest.raises(RuntimeUnavailableError, match=f"no usable delegate .*{package}"):
        backend.choose([])


async def test_registry_records_the_missing_package(tmp_path):
    model_file(tmp_path, "model.hef")
    profile = next(p for p in load_profiles() if p.name == "raspberry-pi-5-hailo")
    registry = ModelRegistry(tmp_path / "models", model_options={}, versions_policy="latest",
                             runtime=RuntimeSection(), delegates=profile.runtimes, threads=1, metrics=Metrics())
    await registry.load_all()
    (failure,) = registry.failures()
    assert "hailo_platform" in failure.reason
    assert registry.served() == ()


def test_unknown_delegates_and_options_are_refused_by_probe():
    assert "only one is 'hailo'" in str(HailoBackend().probe(DelegateSpec("gpu")))
    assert "only one is 'npu'" in str(RknnBackend().probe(DelegateSpec("hailo")))
    assert "unknown core_mask" in str(RknnBackend().probe(DelegateSpec("npu", None, {"core_mask": "7"})))


def test_npu_runtimes_do_not_fall_back_to_a_cpu():
    assert HailoBackend()._with_cpu([]) == [DelegateSpec("hailo")]
    listed = [DelegateSpec("npu", None, {"core_mask": "0_1_2"}), DelegateSpec("npu", None, {"core_mask": "auto"})]
    assert RknnBackend()._with_cpu(listed) == listed


# -- fake modules: import, selection, load errors and fallback only ------------------------------
def fake_hailo(vdevice_error: str) -> types.ModuleType:
    module = types.ModuleType("hailo_platform")
    module.__version__ = "4.20.0"  # type: ignore[attr-defined]

    class VDevice:
        def __init__(self, params):
            raise RuntimeError(vdevice_error)

        @staticmethod
        def create_params():
            return types.SimpleNamespace(scheduling_algorithm=None)

    module.VDevice = VDevice  # type: ignore[attr-defined]
    module.HailoSchedulingAlgorithm = types.SimpleNamespace(ROUND_ROBIN=1, NONE=0)  # type: ignore[attr-defined]
    return module


def test_hailo_selected_when_importable_and_load_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hailo_platform", fake_hailo("HAILO_OUT_OF_PHYSICAL_DEVICES(74)"))
    backend = HailoBackend()
    assert backend.version() == "4.20.0"
    spec, skipped = backend.choose(next(p for p in load_profiles() if p.name == "x86-cpu").runtimes["hef"])
    assert (spec.name, skipped) == ("hailo", [])
    with pytest.raises(ModelLoadError, match="HAILO_OUT_OF_PHYSICAL_DEVICES") as err:
        backend.load(model_file(tmp_path, "model.hef"), [spec])
    assert err.value.path.endswith("model.hef")


def fake_rknnlite(init_results: dict[int | None, int], load_result: int = 0) -> types.ModuleType:
    """``rknnlite.api`` whose RKNNLite returns the given codes; records what was called."""
    api = types.ModuleType("rknnlite.api")

    class RKNNLite:
        NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2 = 0, 1, 2, 4
        NPU_CORE_0_1, NPU_CORE_0_1_2, NPU_CORE_ALL = 3, 7, 0xFFFF
        calls: list[str] = []

        def load_rknn(self, path):
            self.calls.append(f"load_rknn {Path(path).name}")
            return load_result

        def init_runtime(self, core_mask=None):
            self.calls.append(f"init_runtime {core_mask}")
            return init_results.get(core_mask, 0)

        def release(self):
            self.calls.append("release")

    api.RKNNLite = RKNNLite  # type: ignore[attr-defined]
    return api


def test_rknn_falls_back_from_three_cores_to_auto(tmp_path, monkeypatch):
    api = fake_rknnlite({7: -1})  # RK3568 has one core: NPU_CORE_0_1_2 fails, auto works
    monkeypatch.setitem(sys.modules, "rknnlite", types.ModuleType("rknnlite"))
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    profile = next(p for p in load_profiles() if p.name == "rockchip-rk3588")
    session = RknnBackend().load(model_file(tmp_path, "model.rknn", MANIFEST), profile.runtimes["rknn"])
    assert session.delegate == "npu"
    assert session.report.fallbacks == ["npu: failed to load: init_runtime(core_mask=0_1_2) returned -1 (a model "
                                        "converted for another SoC, a core this SoC lacks, or no RKNPU driver)"]
    assert [(s.name, s.dtype.name, s.shape) for s in session.inputs] == [("images", "uint8", (1, 640, 640, 3))]
    assert api.RKNNLite.calls == ["load_rknn model.rknn", "init_runtime 7", "release", "load_rknn model.rknn",
                                  "init_runtime None"]
    session.close()
    assert api.RKNNLite.calls[-1] == "release"


@pytest.mark.parametrize(("manifest", "fragment"), [
    (None, "needs manifest.json beside it"),
    ({**MANIFEST, "outputs": []}, "declares no outputs"),
])
def test_rknn_needs_declared_tensors(tmp_path, monkeypatch, manifest, fragment):
    monkeypatch.setitem(sys.modules, "rknnlite", types.ModuleType("rknnlite"))
    monkeypatch.setitem(sys.modules, "rknnlite.api", fake_rknnlite({}))
    with pytest.raises(ModelLoadError, match=fragment):
        RknnBackend().load(model_file(tmp_path, "model.rknn", manifest), [])


def test_rknn_model_for_another_soc_fails_to_load(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rknnlite", types.ModuleType("rknnlite"))
    monkeypatch.setitem(sys.modules, "rknnlite.api", fake_rknnlite({}, load_result=-1))
    with pytest.raises(ModelLoadError, match="load_rknn returned -1"):
        RknnBackend().load(model_file(tmp_path, "model.rknn", MANIFEST), [])
