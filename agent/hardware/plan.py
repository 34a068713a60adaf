"""What a device would run each model format on, and why each accelerator is or is not used.

Pure: a function of the detected facts, the chosen profile, all profiles and, on the device
itself, the runtimes' own probes (injected as callables). It backs ``edge-agent detect``, whose
promise is that every accelerator found is either "used by runtime X" or comes with the exact
reason it is not: a missing package or library, no profile using it, a failed profile rule, a model
format it needs, or a driver problem found by detection.

Without probes (a tree copied from another device), the plan is a prediction from the tree: a
delegate is expected to work when the accelerator it needs was detected and the libraries it
loads are in the tree's library dirs. Python packages cannot be seen in a tree: the plan names the
one the device needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from agent.hardware.facts import KNOWN_LIBRARIES, Accelerator, HardwareInfo
from agent.hardware.profiles import CPU_FALLBACK, RUNTIMES, DelegateSpec, DeviceProfile, ProfileChoice

#: Model file suffix per runtime.
FORMATS = {"onnx": ".onnx", "tflite": ".tflite", "hef": ".hef", "rknn": ".rknn"}

_LIBRARY_NAMES = {
    "libnvinfer.so*": "TensorRT",
    "libcudart.so*": "the CUDA runtime",
    "libopenvino.so*": "OpenVINO",
    "libedgetpu.so.1*": "the Edge TPU runtime",
    "libtensorflowlite_gpu_delegate.so*": "LiteRT's GPU delegate",
    "librknnrt.so*": "Rockchip's RKNN runtime",
    "libhailort.so*": "HailoRT",
}
_PACKAGES = {
    "onnx": "onnxruntime",
    "tflite": "ai-edge-litert",
    "hef": "hailo_platform (HailoRT's Python wheel, the same version as the hailo_pci driver)",
    "rknn": "rknnlite (rknn-toolkit-lite2)",
}
_FORMAT_NOTES = {
    "edgetpu": "only *_edgetpu.tflite models (compiled by edgetpu_compiler) run on the Edge TPU; "
               "other .tflite models run on the CPU",
    "hailo": ".hef models compiled by Hailo's Dataflow Compiler for this Hailo chip",
    "npu": ".rknn models converted by rknn-toolkit2 for this SoC",
}
_NO_PROFILE = {
    "amd-gpu": "ONNX Runtime's ROCm / MIGraphX execution providers are not among edge-agent's profiles",
    "rpi-gpu": "VideoCore has no usable ML delegate (informational)",
}

Probe = Callable[[DelegateSpec], "str | None"]


@dataclass(frozen=True)
class Need:
    """What one profile entry needs: accelerators it runs on (and whether one must be present), libraries."""

    targets: tuple[str, ...] = ()
    needs_accelerator: bool = False
    libraries: tuple[str, ...] = ()
    package: str = ""


def need(runtime: str, spec: DelegateSpec) -> Need:
    """The accelerators a delegate / EP runs on and the libraries it loads (``()`` for the CPU)."""
    package = _PACKAGES.get(runtime, runtime)
    name = spec.name
    if runtime == "onnx":
        if name in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            libs = ("libnvinfer.so*", "libcudart.so*") if name.startswith("Tensorrt") else ("libcudart.so*",)
            return Need(("nvidia-gpu", "jetson-gpu"), True, libs, "onnxruntime-gpu (built with CUDA and TensorRT)")
        if name == "OpenVINOExecutionProvider":
            device = str(spec.options.get("device_type", "CPU")).upper()
            target = "intel-npu" if device.startswith("NPU") else "intel-gpu" if device.startswith("GPU") else None
            return Need((target,) if target else (), target is not None, ("libopenvino.so*",), "onnxruntime-openvino")
        return Need(package=package)
    if runtime == "tflite":
        if name == "edgetpu":
            device = str(spec.options.get("device", ""))
            kinds = {"usb": ("edgetpu-usb",), "pci": ("edgetpu-pcie",)}.get(device, ("edgetpu-usb", "edgetpu-pcie"))
            return Need(kinds, True, ("libedgetpu.so.1*",), package)
        if name in ("gpu", "external"):
            library = spec.library or ("libtensorflowlite_gpu_delegate.so" if name == "gpu" else "")
            pattern = next((k for k in KNOWN_LIBRARIES if fnmatchcase(library, k)), None)
            return Need(("jetson-gpu",) if name == "gpu" else (), False, (pattern,) if pattern else (), package)
        return Need(package=package)
    if runtime == "hef":
        return Need(("hailo",), True, (), package)
    if runtime == "rknn":
        return Need(("rockchip-npu",), True, ("librknnrt.so*",), package)
    return Need(package=package)


def label(spec: DelegateSpec) -> str:
    """``OpenVINOExecutionProvider (NPU)``, ``npu (core_mask 0_1_2)``: tells same-name entries apart."""
    for key, shown in (("device_type", "{}"), ("core_mask", "core_mask {}"), ("device", "{}")):
        if key in spec.options:
            return f"{spec.name} ({shown.format(spec.options[key])})"
    return spec.name


@dataclass(frozen=True)
class FormatPlan:
    """Where models of one format would run: the first usable entry of the runtime's list."""

    suffix: str
    runtime: str
    delegate: DelegateSpec | None
    skipped: tuple[str, ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.suffix, "runtime": self.runtime,
                "delegate": label(self.delegate) if self.delegate else None,
                "skipped": list(self.skipped), "note": self.note}


@dataclass(frozen=True)
class Verdict:
    """One accelerator: used (by which runtimes and delegates) or not, and why."""

    accelerator: Accelerator
    used: bool
    by: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.accelerator.to_dict(), "used": self.used, "by": list(self.by), "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    formats: tuple[FormatPlan, ...]
    accelerators: tuple[Verdict, ...]
    probed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"formats": [f.to_dict() for f in self.formats],
                "accelerators": [v.to_dict() for v in self.accelerators],
                "checked_by": "the runtimes on this device" if self.probed else "prediction from the tree"}


def plan(hw: HardwareInfo, choice: ProfileChoice, profiles: Sequence[DeviceProfile],
         probes: Mapping[str, Probe] | None = None) -> Plan:
    """The plan for ``hw`` with the chosen profile.

    ``probes`` (runtime -> ``Backend.probe``) are given only on the device itself: they replace the
    tree's library check with the runtime's own answer (package importable, EP in the build).
    """
    formats = tuple(_format(hw, rt, choice.profile.runtimes.get(rt, ()), probes) for rt in RUNTIMES)
    verdicts = tuple(_verdict(hw, a, choice.profile, formats, profiles)
                     for a in (*hw.accelerators, *hw.unavailable))
    return Plan(formats, verdicts, probes is not None)


def _format(hw: HardwareInfo, runtime: str, specs: Sequence[DelegateSpec],
            probes: Mapping[str, Probe] | None) -> FormatPlan:
    skipped: list[str] = []
    for spec in specs:
        reason = _unmet(hw, runtime, spec, probes)
        if reason is None:
            note = _FORMAT_NOTES.get(spec.name, "")
            package = need(runtime, spec).package
            if probes is None and package:
                note = "; ".join(p for p in (note, f"needs the Python package {package} on the device") if p)
            return FormatPlan(FORMATS[runtime], runtime, spec, tuple(skipped), note)
        skipped.append(f"{label(spec)}: {reason}")
    return FormatPlan(FORMATS[runtime], runtime, None, tuple(skipped),
                      f"{FORMATS[runtime]} models cannot run on this device")


def _unmet(hw: HardwareInfo, runtime: str, spec: DelegateSpec, probes: Mapping[str, Probe] | None) -> str | None:
    """Why ``spec`` would not be used on this device, or None."""
    if spec.name == CPU_FALLBACK.get(runtime) and probes is None:
        return None
    req = need(runtime, spec)
    if req.needs_accelerator and not any(hw.has(k) for k in req.targets):
        broken = next((a for a in hw.unavailable if a.kind in req.targets), None)
        if broken is not None:
            return f"{broken.kind} found but unusable: {broken.problem}"
        return f"no {' or '.join(req.targets)} accelerator detected"
    if probes is not None:
        probe = probes.get(runtime)
        return probe(spec) if probe is not None else f"runtime {runtime} is not known to this agent"
    missing = [p for p in req.libraries if not any(fnmatchcase(lib, p) for lib in hw.libraries)]
    if missing:
        return "; ".join(f"library {p} ({_LIBRARY_NAMES.get(p, 'its library')}) not found" for p in missing)
    return None


def _verdict(hw: HardwareInfo, acc: Accelerator, profile: DeviceProfile, formats: Sequence[FormatPlan],
             profiles: Sequence[DeviceProfile]) -> Verdict:
    if acc.problem is not None:
        return Verdict(acc, False, (), f"not usable: {acc.problem}")
    users = [f for f in formats if f.delegate is not None and acc.kind in need(f.runtime, f.delegate).targets]
    if users:
        by = tuple(f"{f.runtime}: {label(f.delegate)}" for f in users if f.delegate is not None)
        notes = [f.note for f in users if f.note]
        reason = f"used for {', '.join(f.suffix for f in users)} models by {', '.join(by)}"
        return Verdict(acc, True, by, "; ".join([reason, *notes]))
    # Entries of the chosen profile that would run on it, but were skipped.
    skipped = [s for f in formats for s in f.skipped
               if any(acc.kind in need(f.runtime, spec).targets and s.startswith(label(spec) + ":")
                      for spec in profile.runtimes.get(f.runtime, ()))]
    if skipped:
        return Verdict(acc, False, (), f"profile {profile.name} would use it, but: {'; '.join(skipped)}")
    # Entries after the one each runtime would use: the fallback for models that one cannot load.
    for f in formats:
        specs = profile.runtimes.get(f.runtime, ())
        if f.delegate is None or f.delegate not in specs:
            continue
        later = [s for s in specs[specs.index(f.delegate) + 1:] if acc.kind in need(f.runtime, s).targets]
        if later:
            return Verdict(acc, False, (), f"standby: {f.runtime} falls back to {label(later[0])} for models "
                                           f"{label(f.delegate)} cannot load")
    if acc.kind in _NO_PROFILE:
        return Verdict(acc, False, (), f"not used: {_NO_PROFILE[acc.kind]}")
    return Verdict(acc, False, (), _other_profiles(hw, acc, profile, profiles))


def _other_profiles(hw: HardwareInfo, acc: Accelerator, chosen: DeviceProfile,
                    profiles: Sequence[DeviceProfile]) -> str:
    """Why the chosen profile does not use ``acc``: which profile would, and why it was not chosen."""
    users = sorted((p for p in profiles if p.name != chosen.name and any(
        acc.kind in need(rt, spec).targets for rt, specs in p.runtimes.items() for spec in specs)),
        key=lambda p: (-p.priority, p.name))
    if not users:
        return f"not used: no profile uses {acc.kind} accelerators"
    base = f"profile {chosen.name} does not use it"
    for other in users:
        if other.match(hw)[0]:
            order = (f"has the higher priority ({chosen.priority} > {other.priority})"
                     if chosen.priority != other.priority
                     else f"comes first by name at equal priority {other.priority}")
            return f"{base}; profile {other.name} would, but {chosen.name} {order}"
    # The profile closest to matching: fewest failed rules, then the highest priority.
    def failed(p: DeviceProfile) -> list[str]:
        return [reason for ok, reason in p.rules.checks(hw) if not ok]

    other = min(users, key=lambda p: len(failed(p)))  # users are sorted by priority: ties keep the highest
    reasons = failed(other)
    missing = [name for pattern, name in _LIBRARY_NAMES.items() if any(pattern in r for r in reasons)]
    hint = f" ({', '.join(missing)}: not installed)" if missing else ""
    return f"{base}; profile {other.name} would, but it does not match: {'; '.join(reasons)}{hint}"

