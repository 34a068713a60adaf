"""Hardware detection: turn files under a root (``/proc``, ``/sys``, ``/dev``, lib dirs) into facts.

This module only reads below ``root`` so tests (and ``edge-agent detect --root``) can point it at a
fake tree. A missing or unreadable file is an absent fact, never an error; the only error is a root
that does not exist. It does not choose a profile: that is :mod:`agent.hardware.profiles`.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import structlog

from agent.errors import HardwareError

log = structlog.get_logger(__name__)

ACCELERATOR_KINDS = frozenset(
    {"nvidia-gpu", "jetson-gpu", "edgetpu-usb", "edgetpu-pcie", "intel-gpu", "hailo", "rpi-gpu"}
)

# Shared libraries that decide which delegates / execution providers can load (globs on file names).
KNOWN_LIBRARIES = (
    "libedgetpu.so.1*",
    "libtensorflowlite_gpu_delegate.so*",
    "libopenvino.so*",
    "libnvinfer.so*",
    "libcudart.so*",
    "libhailort.so*",
)

# Where distributions, JetPack, CUDA and the OpenVINO archive put them (relative to root, globs allowed).
LIBRARY_DIRS = (
    "usr/lib",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/arm-linux-gnueabihf",
    "usr/local/lib",
    "usr/local/cuda/lib64",
    "opt/intel/openvino*/runtime/lib/intel64",
)

# A Coral USB stick enumerates with Global Unichip's id until libedgetpu uploads its firmware,
# then re-enumerates as Google's. Both mean "a Coral is plugged in".
_CORAL_USB_IDS = {("1a6e", "089a"): "not yet programmed", ("18d1", "9302"): "programmed"}

# ARM (implementer 0x41) CPU part numbers: aarch64 /proc/cpuinfo has no "model name" line.
_ARM_PARTS = {
    "0xc07": "ARM Cortex-A7",
    "0xd03": "ARM Cortex-A53",
    "0xd05": "ARM Cortex-A55",
    "0xd07": "ARM Cortex-A57",
    "0xd08": "ARM Cortex-A72",
    "0xd0b": "ARM Cortex-A76",
    "0xd42": "ARM Cortex-A78AE",
}

# proc/device-tree is a symlink to the sysfs copy, which is the only one in some containers.
_BOARD_FILES = (
    "proc/device-tree/model",
    "sys/firmware/devicetree/base/model",
    "sys/class/dmi/id/product_name",
)
_L4T_RE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_NVRM_RE = re.compile(r"Kernel Module\s+(\S+)")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator and the evidence for it, so ``edge-agent detect`` can explain itself."""

    kind: str
    name: str
    evidence: str


@dataclass(frozen=True)
class HardwareInfo:
    """Everything profile matching needs; pure data, comparable across runs."""

    root: str
    arch: str
    board: str | None
    cpu_model: str | None
    cpu_count: int
    cpu_flags: frozenset[str]
    accelerators: tuple[Accelerator, ...]
    libraries: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (sorted sets) for the CLI, the status API and MQTT state."""
        return {
            "root": self.root,
            "arch": self.arch,
            "board": self.board,
            "cpu_model": self.cpu_model,
            "cpu_count": self.cpu_count,
            "cpu_flags": sorted(self.cpu_flags),
            "accelerators": [
                {"kind": a.kind, "name": a.name, "evidence": a.evidence} for a in self.accelerators
            ],
            "libraries": sorted(self.libraries),
        }

    def has(self, kind: str) -> bool:
        """True if any accelerator of ``kind`` was found."""
        return any(a.kind == kind for a in self.accelerators)


def detect(root: str | os.PathLike[str] = "/") -> HardwareInfo:
    """Read the hardware facts below ``root``.

    Raises:
        HardwareError: ``root`` does not exist or is not a directory.
    """
    base = Path(root)
    if not base.is_dir():
        raise HardwareError(f"hardware root {str(base)!r} does not exist or is not a directory")

    cpuinfo = _parse_cpuinfo(_read(base / "proc/cpuinfo") or "")
    board, board_source = _board(base, cpuinfo)
    info = HardwareInfo(
        root=str(base),
        arch=_read(base / "proc/sys/kernel/arch") or platform.machine(),
        board=board,
        cpu_model=_cpu_model(cpuinfo),
        cpu_count=cpuinfo.processors or os.cpu_count() or 1,
        cpu_flags=frozenset(cpuinfo.flags),
        accelerators=tuple(_accelerators(base, board, board_source)),
        libraries=_libraries(base),
    )
    log.info(
        "hardware.detected",
        root=info.root,
        arch=info.arch,
        board=info.board,
        cpu_count=info.cpu_count,
        accelerators=[a.kind for a in info.accelerators],
        libraries=sorted(info.libraries),
    )
    return info


# --- file helpers: every OSError means "fact absent" -------------------------------------------


def _read(path: Path) -> str | None:
    """File text without NULs (device-tree strings end in one) and surrounding space; None if absent."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError | NotADirectoryError):
            log.debug("hardware.unreadable", path=str(path), error=str(exc))
        return None
    return data.decode("utf-8", errors="replace").replace("\x00", "").strip() or None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _glob(base: Path, pattern: str) -> list[Path]:
    try:
        return sorted(base.glob(pattern))
    except OSError:
        return []


def _host(base: Path, path: Path) -> str:
    """The path as seen on the host being described (``/dev/apex_0``), not under the fake root."""
    return "/" + path.relative_to(base).as_posix()


# --- CPU and board ------------------------------------------------------------------------------


@dataclass
class _CpuInfo:
    processors: int
    flags: set[str]
    fields: dict[str, str]


def _parse_cpuinfo(text: str) -> _CpuInfo:
    """Count ``processor`` entries, union x86 ``flags`` / ARM ``Features``, keep first other fields."""
    info = _CpuInfo(0, set(), {})
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            info.processors += 1
        elif key in ("flags", "Features"):
            info.flags.update(value.split())
        else:
            info.fields.setdefault(key, value)
    return info


def _cpu_model(cpu: _CpuInfo) -> str | None:
    # On a Pi the kernel reports "Hardware: BCM2835" for every model, so the core name is preferred.
    if "model name" in cpu.fields:
        return cpu.fields["model name"]
    if cpu.fields.get("CPU implementer") == "0x41" and cpu.fields.get("CPU part") in _ARM_PARTS:
        return _ARM_PARTS[cpu.fields["CPU part"]]
    return cpu.fields.get("Hardware")


def _board(base: Path, cpu: _CpuInfo) -> tuple[str | None, str | None]:
    """Board name and the host path it came from: device tree, then DMI, then cpuinfo ``Model``."""
    for rel in _BOARD_FILES:
        value = _read(base / rel)
        if value:
            return value, "/" + rel
    if "Model" in cpu.fields:
        return cpu.fields["Model"], "/proc/cpuinfo"
    return None, None


# --- accelerators -------------------------------------------------------------------------------


def _accelerators(base: Path, board: str | None, board_source: str | None) -> Iterable[Accelerator]:
    jetson = _jetson(base, board, board_source)
    if jetson is not None:
        yield jetson
    else:
        # JetPack 6 drives the Orin iGPU/display with NVIDIA's OpenRM module, which can also create
        # /dev/nvidia0 and /proc/driver/nvidia: on a Jetson those are not a discrete GPU.
        yield from _nvidia(base)
    yield from _coral_pcie(base)
    yield from _coral_usb(base)
    yield from _intel_gpu(base)
    for dev in _glob(base, "dev/hailo[0-9]*"):
        yield Accelerator("hailo", f"Hailo AI accelerator ({_host(base, dev)})", _host(base, dev))
    if board and "raspberry pi" in board.lower():
        yield Accelerator("rpi-gpu", f"Broadcom {_videocore(board)} (informational)", board_source or "")


def _jetson(base: Path, board: str | None, board_source: str | None) -> Accelerator | None:
    release_path = base / "etc/nv_tegra_release"
    evidence: list[str] = []
    if _exists(release_path):
        evidence.append("/etc/nv_tegra_release")
    if board and "jetson" in board.lower() and board_source:
        evidence.append(board_source)
    if not evidence:
        return None
    evidence += [_host(base, p) for p in _glob(base, "dev/nvhost-*")[:1] + _glob(base, "dev/nvgpu")]
    match = _L4T_RE.search(_read(release_path) or "")
    name = f"NVIDIA Jetson GPU (L4T R{match[1]}.{match[2]})" if match else "NVIDIA Jetson GPU"
    return Accelerator("jetson-gpu", name, ", ".join(evidence))


def _nvidia(base: Path) -> Iterable[Accelerator]:
    version = _NVRM_RE.search(_read(base / "proc/driver/nvidia/version") or "")
    driver = f", driver {version[1]}" if version else ""
    devices = _glob(base, "dev/nvidia[0-9]*")
    for dev in devices:
        yield Accelerator("nvidia-gpu", f"NVIDIA GPU ({_host(base, dev)}{driver})", _host(base, dev))
    if not devices and _exists(base / "proc/driver/nvidia/version"):
        yield Accelerator("nvidia-gpu", f"NVIDIA GPU (no device node{driver})", "/proc/driver/nvidia/version")


def _coral_pcie(base: Path) -> Iterable[Accelerator]:
    for dev in _glob(base, "dev/apex_[0-9]*"):
        yield Accelerator("edgetpu-pcie", f"Coral Edge TPU (PCIe, {_host(base, dev)})", _host(base, dev))


def _coral_usb(base: Path) -> Iterable[Accelerator]:
    for dev in _glob(base, "sys/bus/usb/devices/*"):
        vendor, product = _read(dev / "idVendor"), _read(dev / "idProduct")
        if vendor is None or product is None:
            continue
        ids = (vendor.lower(), product.lower())
        if ids in _CORAL_USB_IDS:
            name = f"Coral Edge TPU (USB, {ids[0]}:{ids[1]}, {_CORAL_USB_IDS[ids]})"
            yield Accelerator("edgetpu-usb", name, _host(base, dev))


def _intel_gpu(base: Path) -> Iterable[Accelerator]:
    for node in _glob(base, "sys/class/drm/renderD*"):
        vendor_file = node / "device/vendor"
        if (_read(vendor_file) or "").lower() != "0x8086":
            continue
        device = _read(node / "device/device")
        detail = f"{node.name}, {device}" if device else node.name
        yield Accelerator("intel-gpu", f"Intel GPU ({detail})", _host(base, vendor_file))


def _videocore(board: str) -> str:
    if "Raspberry Pi 5" in board or "Compute Module 5" in board:
        return "VideoCore VII"
    if "Raspberry Pi 4" in board or "Compute Module 4" in board:
        return "VideoCore VI"
    return "VideoCore"


# --- libraries ----------------------------------------------------------------------------------


def _libraries(base: Path) -> frozenset[str]:
    """File names of known libraries in the usual dirs; broken symlinks do not count."""
    found: set[str] = set()
    for pattern in LIBRARY_DIRS:
        for directory in _glob(base, pattern) if "*" in pattern else [base / pattern]:
            try:
                for entry in directory.iterdir():
                    if any(fnmatch(entry.name, lib) for lib in KNOWN_LIBRARIES) and entry.is_file():
                        found.add(entry.name)
            except OSError:
                continue
    return frozenset(found)
