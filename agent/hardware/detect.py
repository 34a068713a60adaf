"""Hardware detection: turn files under a root (``/proc``, ``/sys``, ``/dev``, lib dirs) into facts.

This module only reads below ``root`` so tests (and ``edge-agent detect --root``) can point it at a
copy of another device's tree. Every read goes through :class:`~agent.hardware._tree.Tree`, which
bounds it in size and time, skips non-regular files and keeps symlinks inside the root. A missing,
unreadable or implausible file is an absent fact (and a note), never an error; the only error is a
root that does not exist. It does not choose a profile: that is :mod:`agent.hardware.profiles`.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

import structlog

from agent.errors import HardwareError
from agent.hardware import _accelerators as rules
from agent.hardware._cpu import (
    CpuInfo,
    arch_from_cpuinfo,
    arch_from_elf,
    cpu_model,
    parse_cpuinfo,
    plausible_arch,
)
from agent.hardware._tree import SMALL, Tree, printable
from agent.hardware.facts import ACCELERATOR_KINDS, KNOWN_LIBRARIES, Accelerator, HardwareInfo

__all__ = ["ACCELERATOR_KINDS", "KNOWN_LIBRARIES", "LIBRARY_DIRS", "Accelerator", "HardwareInfo", "detect"]

log = structlog.get_logger(__name__)

# Where distributions, JetPack, CUDA, OpenVINO and pip wheels put them (relative to root, globs allowed).
LIBRARY_DIRS = (
    "usr/lib",
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/arm-linux-gnueabihf",
    "usr/local/lib",
    "usr/local/cuda/lib64",
    "opt/intel/openvino*/runtime/lib/intel64",
    "usr/lib/python3*/dist-packages/openvino/libs",
    "usr/local/lib/python3*/dist-packages/openvino/libs",
)
# Only on the device itself: the agent's own environment (pip's OpenVINO, ONNX Runtime, TensorRT, CUDA).
_ENV_LIBRARY_DIRS = ("openvino/libs", "onnxruntime/capi", "tensorrt_libs", "nvidia/cuda_runtime/lib")

_CPUINFO_LIMIT = 1 << 20  # 256 cores of x86 flags fit in a quarter of this
_BOARD_FILES = (  # proc/device-tree is a symlink to the sysfs copy, which is the only one in some containers
    "proc/device-tree/model",
    "sys/firmware/devicetree/base/model",
)
_COMPATIBLE_FILES = ("proc/device-tree/compatible", "sys/firmware/devicetree/base/compatible")
_DMI_PLACEHOLDERS = {"", "to be filled by o.e.m.", "default string", "system product name", "not applicable",
                     "none", "not specified", "system manufacturer", "o.e.m.", "unknown"}
_ELF_CANDIDATES = ("bin/sh", "usr/bin/sh", "bin/busybox", "usr/bin/env", "bin/ls")
_COMPATIBLE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9,._+-]{0,127}")
# Jetson SoCs when the device tree's "compatible" is missing: board names, and the fuse's chip id.
_JETSON_BOARD_SOCS = (
    ("thor", "nvidia,tegra264"), ("orin", "nvidia,tegra234"), ("xavier", "nvidia,tegra194"),
    ("jetson-agx", "nvidia,tegra194"), ("tx2", "nvidia,tegra186"), ("quill", "nvidia,tegra186"),
    ("nano", "nvidia,tegra210"), ("tx1", "nvidia,tegra210"),
)
_TEGRA_CHIP_IDS = {"33": "nvidia,tegra210", "24": "nvidia,tegra186", "25": "nvidia,tegra194", "35": "nvidia,tegra234"}


def detect(root: str | os.PathLike[str] = "/", *, budget_s: float = 1.0) -> HardwareInfo:
    """Read the hardware facts below ``root`` within ``budget_s`` seconds.

    Raises:
        HardwareError: ``root`` does not exist or is not a directory.
    """
    if not Path(root).is_dir():
        raise HardwareError(f"hardware root '{printable(os.fspath(root))}' does not exist or is not a directory")
    tree = Tree(os.fspath(root), budget_s=budget_s)
    host = _is_this_host(tree.root)
    cpuinfo = parse_cpuinfo((tree.read_bytes("proc/cpuinfo", _CPUINFO_LIMIT) or b"").decode("utf-8", "replace"))
    kernel_arch, userspace_arch, arch, arch_source = _arch(tree, cpuinfo, host)
    board, board_source = _board(tree, cpuinfo)
    is_jetson = rules.l4t_release(tree) is not None or bool(board and "jetson" in board.lower())
    soc, soc_source = _soc(tree, board, is_jetson)
    libraries = _libraries(tree, host)
    found = list(_accelerators(tree, board, board_source, soc, is_jetson=is_jetson, libraries=libraries))
    if kernel_arch and userspace_arch and _bits(kernel_arch) != _bits(userspace_arch):
        tree.note(f"{_bits(userspace_arch)}-bit userland ({userspace_arch}) on a {_bits(kernel_arch)}-bit kernel "
                  f"({kernel_arch}): runtimes must be built for {userspace_arch}")
    info = HardwareInfo(
        root=printable(tree.root, 400),
        arch=arch,
        board=board,
        cpu_model=cpu_model(cpuinfo),
        cpu_count=min(cpuinfo.processors, 65536) or os.cpu_count() or 1,
        cpu_flags=frozenset(cpuinfo.flags),
        accelerators=tuple(a for a in found if a.problem is None),
        libraries=libraries,
        kernel_arch=kernel_arch,
        userspace_arch=userspace_arch,
        arch_source=arch_source,
        soc=soc,
        soc_source=soc_source,
        unavailable=tuple(a for a in found if a.problem is not None),
        notes=tuple(tree.notes),
    )
    log.info("hardware.detected", root=info.root, arch=info.arch, board=info.board, soc=info.soc,
             cpu_count=info.cpu_count, accelerators=[a.kind for a in info.accelerators],
             unavailable=[f"{a.kind}: {a.problem}" for a in info.unavailable], libraries=sorted(info.libraries),
             notes=list(info.notes))
    return info


def _is_this_host(root: str) -> bool:
    try:
        return Path(root).samefile("/")
    except OSError:
        return False


# --- architecture -------------------------------------------------------------------------------


def _bits(arch: str) -> int:
    return 64 if arch.endswith("64") or arch in ("ppc64le", "s390x", "aarch64_be") else 32


def _arch(tree: Tree, cpu: CpuInfo, host: bool) -> tuple[str | None, str | None, str, str]:
    """(kernel arch, userland arch, arch to match, where it came from), all from the tree.

    The kernel's own word first (``/proc/sys/kernel/arch``, Linux 6.1+; on this device, ``uname``),
    then the layout of ``/proc/cpuinfo``; the userland's from the ELF header of a binary in the tree.
    Never the machine running the check when the tree is another device's: then "unknown".
    """
    raw = tree.read_text("proc/sys/kernel/arch", 64)
    kernel, source = plausible_arch(raw), "/proc/sys/kernel/arch"
    if raw is not None and kernel is None:
        tree.note(f"/proc/sys/kernel/arch: '{printable(raw, 40)}' is not an architecture name: ignored")
    if kernel is None and host:
        kernel, source = plausible_arch(os.uname().machine), "uname"
    if kernel is None:
        kernel, source = arch_from_cpuinfo(cpu), "/proc/cpuinfo"
    userspace, user_source = None, None
    candidates = ((os.path.relpath(os.path.realpath(sys.executable), "/"),) if host else ()) + _ELF_CANDIDATES
    for rel in candidates:
        userspace = arch_from_elf(tree.read_bytes(rel, 64, head=True) or b"")
        if userspace is not None:
            user_source = "ELF header of " + tree.host(rel)
            break
    if kernel is not None:
        return kernel, userspace, kernel, source
    if userspace is not None:
        arch = {"arm": "armv7l"}.get(userspace, userspace)
        return None, userspace, arch, str(user_source)
    tree.note("architecture unknown: no /proc/sys/kernel/arch, no recognisable /proc/cpuinfo, no ELF binary")
    return None, None, "unknown", "nothing in the tree"


# --- board and SoC ------------------------------------------------------------------------------


def _plausible_name(tree: Tree, rel: str) -> str | None:
    """A board name read from ``rel``: one printable UTF-8 string of at most 256 chars, else None (noted).

    A device-tree model of binary garbage must not become the board name: it would reach the terminal
    and could contain "Jetson Orin" and select a profile.
    """
    data = tree.read_bytes(rel, SMALL)
    if data is None:
        return None
    stripped = data.rstrip(b"\x00").strip()
    if not stripped:
        return None
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or len(text) > 256 or not text.isprintable():
        tree.note(f"{tree.host(rel)}: not a plausible name ({len(data)} bytes, binary or control characters): ignored")
        return None
    return text


def _board(tree: Tree, cpu: CpuInfo) -> tuple[str | None, str | None]:
    """Board name and the host path it came from: device tree, then DMI, then cpuinfo ``Model``."""
    for rel in _BOARD_FILES:
        value = _plausible_name(tree, rel)
        if value:
            return value, "/" + rel
    product = _plausible_name(tree, "sys/class/dmi/id/product_name")
    if product and product.lower() not in _DMI_PLACEHOLDERS:
        vendor = _plausible_name(tree, "sys/class/dmi/id/sys_vendor") or ""
        if vendor.lower() in _DMI_PLACEHOLDERS or vendor.split(" ")[0].lower() in product.lower():
            vendor = ""
        return (f"{vendor} {product}" if vendor else product), "/sys/class/dmi/id/product_name"
    model = cpu.first("Model")
    if model and len(model) <= 256 and model.isprintable():
        return model, "/proc/cpuinfo"
    return None, None


def _soc(tree: Tree, board: str | None, is_jetson: bool) -> tuple[str | None, str | None]:
    """The SoC as the device tree names it (the last ``compatible`` entry, e.g. ``nvidia,tegra234``).

    On a Jetson without a readable device tree: the fuse's chip id, then the board name (Jetson
    model strings are not uniform: AGX Xavier says "Jetson-AGX", custom carriers say anything).
    """
    for rel in _COMPATIBLE_FILES:
        data = tree.read_bytes(rel, SMALL)
        if not data:
            continue
        entries = [e.decode("ascii", "replace") for e in data.split(b"\x00") if e]
        if len(entries) > 16 or not all(_COMPATIBLE_RE.fullmatch(e) for e in entries):
            # A real "compatible" is a few vendor,name strings: a single bad entry means it is not one.
            tree.note(f"{tree.host(rel)}: not a list of vendor,name strings ({len(data)} bytes): ignored")
            continue
        if entries:
            return entries[-1].lower(), "/" + rel
    if not is_jetson:
        return None, None
    chip = tree.read_text("sys/module/tegra_fuse/parameters/tegra_chip_id", 64)
    if chip in _TEGRA_CHIP_IDS:
        return _TEGRA_CHIP_IDS[chip], "/sys/module/tegra_fuse/parameters/tegra_chip_id"
    release = tree.read_text("etc/nv_tegra_release", 1024) or ""
    if "BOARD: t210ref" in release:
        return "nvidia,tegra210", "/etc/nv_tegra_release"
    lowered = (board or "").lower()
    for needle, soc in _JETSON_BOARD_SOCS:
        if needle in lowered:
            return soc, f"board name contains '{needle}'"
    return None, None


# --- accelerators and libraries ----------------------------------------------------------------


def _accelerators(tree: Tree, board: str | None, board_source: str | None, soc: str | None, *, is_jetson: bool,
                  libraries: frozenset[str]) -> Iterable[Accelerator]:
    jetson = rules.jetson(tree, board, board_source, soc) if is_jetson else None
    if jetson is not None:
        yield jetson
    yield from rules.nvidia(tree, on_jetson=jetson is not None)
    yield from rules.coral_pcie(tree)
    yield from rules.coral_usb(tree)
    yield from rules.render_nodes(tree)
    yield from rules.accel_nodes(tree)
    yield from rules.hailo(tree, libraries)
    yield from rules.raspberry_pi_gpu(board, board_source)


def _libraries(tree: Tree, host: bool) -> frozenset[str]:
    """File names of known libraries in the usual dirs; broken symlinks and directories do not count."""
    dirs: list[str] = []
    for pattern in LIBRARY_DIRS:
        dirs += tree.glob(pattern) if "*" in pattern else [pattern]
    if host:  # the agent's own site-packages: pip wheels of OpenVINO, ONNX Runtime, TensorRT, CUDA
        for key in ("purelib", "platlib"):
            site = os.path.relpath(sysconfig.get_paths()[key], "/")
            dirs += [f"{site}/{sub}" for sub in _ENV_LIBRARY_DIRS]
    found: set[str] = set()
    for directory in dict.fromkeys(dirs):
        for name in tree.listdir(directory, limit=20000):
            if any(fnmatchcase(name, lib) for lib in KNOWN_LIBRARIES) and tree.kind(f"{directory}/{name}") == "file":
                found.add(printable(name, 80))
    return frozenset(found)
