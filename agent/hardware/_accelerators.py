"""Accelerator rules: device nodes, sysfs entries and release files below the root -> :class:`Accelerator`.

One function per kind of hardware. Each yields usable accelerators (``problem`` None) and those found
but not usable, with the exact reason (no driver bound, no device node), so ``edge-agent detect``
can say why a board's NPU is not used. Only :class:`~agent.hardware._tree.Tree` reads files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase

from agent.hardware._tree import Tree, printable
from agent.hardware.facts import Accelerator

# A Coral USB stick enumerates with Global Unichip's id until libedgetpu uploads its firmware,
# then re-enumerates as Google's. Both mean "a Coral is plugged in".
_CORAL_USB_IDS = {("1a6e", "089a"): "not yet programmed", ("18d1", "9302"): "programmed"}
_CORAL_PCI = ("0x1ac1", "0x089a")
_HAILO_VENDOR = "0x1e60"
_HAILO_PARTS = {"0x2864": "Hailo-8/8L", "0x45c4": "Hailo-10H", "0x43a2": "Hailo-15L"}
_INTEL_NPUS = {"0x7d1d": "Meteor Lake", "0xad1d": "Arrow Lake", "0x643e": "Lunar Lake", "0xb03e": "Panther Lake"}
_NVIDIA = "0x10de"
_DISPLAY_CLASSES = ("0x0300", "0x0302")  # VGA-compatible, 3D controller
_JETSON_SOCS = {
    "nvidia,tegra210": "Nano/TX1, Maxwell",
    "nvidia,tegra186": "TX2, Pascal",
    "nvidia,tegra194": "Xavier, Volta",
    "nvidia,tegra234": "Orin, Ampere",
    "nvidia,tegra264": "Thor, Blackwell",
}
_JETPACK = {32: "4", 34: "5", 35: "5", 36: "6", 38: "7"}
_L4T_RE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
_NVRM_RE = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)")
_NODE_LIMIT = 16  # device nodes of one kind worth listing


@dataclass(frozen=True)
class Pci:
    """One PCI function: ids as sysfs prints them (``0x10de``) and the bound driver, if any."""

    address: str
    vendor: str
    device: str
    cls: str
    driver: str | None


def pci_devices(tree: Tree, vendors: Iterable[str]) -> list[Pci]:
    """PCI functions of the given vendors (sysfs ``vendor`` file), in address order."""
    wanted = set(vendors)
    found = []
    for name in tree.listdir("sys/bus/pci/devices", limit=512):
        base = f"sys/bus/pci/devices/{name}"
        vendor = (tree.read_text(f"{base}/vendor", 64) or "").lower()
        if vendor not in wanted:
            continue
        found.append(Pci(printable(name, 40), vendor, (tree.read_text(f"{base}/device", 64) or "").lower(),
                         (tree.read_text(f"{base}/class", 64) or "").lower(), tree.link_name(f"{base}/driver")))
    return found


def _nodes(tree: Tree, directory: str, pattern: str) -> list[str]:
    """Device nodes ``directory/NAME`` whose whole name matches ``pattern`` (a FIFO or a loop is not one)."""
    regex = re.compile(pattern)
    names = [n for n in tree.listdir(directory, limit=4096) if regex.fullmatch(n)]
    return [f"{directory}/{n}" for n in sorted(names, key=_natural)[:_NODE_LIMIT] if tree.is_node(f"{directory}/{n}")]


def _natural(name: str) -> tuple[str, int]:
    digits = re.search(r"\d+$", name)
    return (name[: digits.start()], int(digits[0])) if digits else (name, -1)


# --- NVIDIA ---------------------------------------------------------------------------------------


def l4t_release(tree: Tree) -> re.Match[str] | None:
    """The L4T release line of ``/etc/nv_tegra_release`` (``# R36 (release), REVISION: 3.0``), if it has one."""
    return _L4T_RE.search(tree.read_text("etc/nv_tegra_release", 1024) or "")


def jetson(tree: Tree, board: str | None, board_source: str | None, soc: str | None) -> Accelerator | None:
    """The integrated GPU of a Jetson: an L4T release file or a board name containing "Jetson"."""
    evidence: list[str] = []
    release = l4t_release(tree)
    if release:
        evidence.append("/etc/nv_tegra_release")
    if board and "jetson" in board.lower() and board_source:
        evidence.append(board_source)
    if not evidence:
        return None
    evidence += [tree.host(p) for p in _nodes(tree, "dev", r"nvhost-.+")[:1]]
    if tree.kind("dev/nvgpu") is not None:
        evidence.append("/dev/nvgpu")
    details = [_JETSON_SOCS[soc]] if soc in _JETSON_SOCS else []
    if release:
        jetpack = _JETPACK.get(int(release[1]))
        details.append(f"L4T R{release[1]}.{release[2]}" + (f", JetPack {jetpack}" if jetpack else ""))
    name = "NVIDIA Jetson GPU" + (f" ({'; '.join(details)})" if details else "")
    return Accelerator("jetson-gpu", name, ", ".join(evidence))


def nvidia(tree: Tree, on_jetson: bool) -> Iterator[Accelerator]:
    """Discrete NVIDIA GPUs: PCI display functions, else ``/dev/nvidiaN`` and ``/proc/driver/nvidia``.

    On a Jetson, JetPack 6+'s OpenRM display driver creates ``/dev/nvidia0`` and ``/proc/driver/nvidia``
    for the integrated GPU, so there only a PCI display function counts (IGX Orin's RTX card).
    """
    version_text = tree.read_text("proc/driver/nvidia/version", 1024)
    nodes = _nodes(tree, "dev", r"nvidia\d+")
    driver = ""
    if version_text:
        version = _NVRM_RE.search(version_text)
        flavour = ", open kernel module" if "Open Kernel Module" in version_text else ""
        driver = f", driver {version[1]}{flavour}" if version else f", driver of unknown version{flavour}"
    loaded = bool(version_text or nodes)
    gpus = [d for d in pci_devices(tree, [_NVIDIA]) if d.cls.startswith(_DISPLAY_CLASSES)]
    for i, gpu in enumerate(gpus):
        info = tree.read_text(f"proc/driver/nvidia/gpus/{gpu.address}/information", 4096) or ""
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model:")), "")
        name = f"{printable(model, 80) or 'NVIDIA GPU'} ({gpu.address}{driver})"
        evidence = [f"/sys/bus/pci/devices/{gpu.address}"] + ([tree.host(nodes[i])] if i < len(nodes) else [])
        problem = None
        if gpu.driver not in (None, "nvidia"):
            problem = f"bound to the {printable(gpu.driver, 40)} driver, not NVIDIA's: CUDA and TensorRT cannot use it"
        elif gpu.driver is None and not loaded:
            problem = "no NVIDIA kernel driver loaded (no /proc/driver/nvidia/version, no /dev/nvidia0)"
        yield Accelerator("nvidia-gpu", name, ", ".join(evidence), problem)
    if gpus or on_jetson:
        return
    for node in nodes:
        yield Accelerator("nvidia-gpu", f"NVIDIA GPU ({tree.host(node)}{driver})", tree.host(node))
    if not nodes and version_text:
        yield Accelerator("nvidia-gpu", f"NVIDIA GPU (no device node{driver})", "/proc/driver/nvidia/version")


# --- Coral Edge TPU -------------------------------------------------------------------------------


def coral_pcie(tree: Tree) -> Iterator[Accelerator]:
    nodes = _nodes(tree, "dev", r"apex_\d+")
    for node in nodes:
        yield Accelerator("edgetpu-pcie", f"Coral Edge TPU (PCIe, {tree.host(node)})", tree.host(node))
    if nodes:
        return
    for dev in pci_devices(tree, [_CORAL_PCI[0]]):
        if dev.device == _CORAL_PCI[1]:
            yield Accelerator("edgetpu-pcie", f"Coral Edge TPU (PCIe, {dev.address})",
                              f"/sys/bus/pci/devices/{dev.address}",
                              "no /dev/apex_0: the gasket/apex kernel driver is not loaded (gasket-dkms)")


def coral_usb(tree: Tree) -> Iterator[Accelerator]:
    for name in tree.listdir("sys/bus/usb/devices", limit=512):
        base = f"sys/bus/usb/devices/{name}"
        vendor, product = tree.read_text(f"{base}/idVendor", 64), tree.read_text(f"{base}/idProduct", 64)
        if vendor is None or product is None:
            continue
        ids = (vendor.lower(), product.lower())
        if ids in _CORAL_USB_IDS:
            label = f"Coral Edge TPU (USB, {ids[0]}:{ids[1]}, {_CORAL_USB_IDS[ids]})"
            yield Accelerator("edgetpu-usb", label, tree.host(base))


# --- GPUs and NPUs behind DRM / accel nodes --------------------------------------------------------


def render_nodes(tree: Tree) -> Iterator[Accelerator]:
    """Intel and AMD GPUs, and the Rockchip NPU, by their ``/sys/class/drm/renderD*`` nodes."""
    for name in (n for n in tree.listdir("sys/class/drm", limit=256) if fnmatchcase(n, "renderD*")):
        base = f"sys/class/drm/{name}/device"
        label = printable(name, 40)
        uevent = tree.read_text(f"{base}/uevent", 4096) or ""
        driver = tree.link_name(f"{base}/driver") or next(
            (line.split("=", 1)[1] for line in uevent.splitlines() if line.startswith("DRIVER=")), None)
        if driver is not None and driver.lower() == "rknpu":
            version = _rknpu_version(tree)
            yield Accelerator("rockchip-npu", f"Rockchip NPU ({label}{version})", tree.host(f"{base}/uevent"))
            continue
        vendor = (tree.read_text(f"{base}/vendor", 64) or "").lower()
        device = tree.read_text(f"{base}/device", 64)
        detail = f"{label}, {printable(device, 20)}" if device else label
        if vendor == "0x8086":
            yield Accelerator("intel-gpu", f"Intel GPU ({detail})", tree.host(f"{base}/vendor"))
        elif vendor == "0x1002":
            yield Accelerator("amd-gpu", f"AMD GPU ({detail})", tree.host(f"{base}/vendor"))
    if tree.is_node("dev/rknpu"):  # the vendor driver in DMA-heap mode: a misc device, no DRM node
        yield Accelerator("rockchip-npu", f"Rockchip NPU (/dev/rknpu{_rknpu_version(tree)})", "/dev/rknpu")


def _rknpu_version(tree: Tree) -> str:
    for rel in ("sys/kernel/debug/rknpu/version", "proc/debug/rknpu/version"):
        found = re.search(r"v\d+(?:\.\d+)+", tree.read_text(rel, 256) or "")
        if found:
            return f", driver {found[0]}"
    return ""


def accel_nodes(tree: Tree) -> Iterator[Accelerator]:
    """``/sys/class/accel/accelN``: the Intel NPU (``intel_vpu``) and mainline's Rockchip ``rocket``."""
    seen_intel = False
    for name in (n for n in tree.listdir("sys/class/accel", limit=64) if re.fullmatch(r"accel\d+", n)):
        base = f"sys/class/accel/{name}/device"
        driver = tree.link_name(f"{base}/driver")
        vendor = (tree.read_text(f"{base}/vendor", 64) or "").lower()
        if vendor == "0x8086":
            seen_intel = True
            family = _INTEL_NPUS.get((tree.read_text(f"{base}/device", 64) or "").lower(), "Intel")
            yield Accelerator("intel-npu", f"Intel NPU ({family}, /dev/accel/{name})", tree.host(f"{base}/vendor"))
        elif driver == "rocket":
            yield Accelerator("rockchip-npu", f"Rockchip NPU (/dev/accel/{name}, mainline rocket driver)",
                              tree.host(f"{base}/driver"),
                              "driven by mainline Linux's rocket driver; rknn-toolkit-lite2 needs Rockchip's "
                              "vendor RKNPU driver (BSP kernel)")
    if not seen_intel:
        for dev in pci_devices(tree, ["0x8086"]):
            if dev.device in _INTEL_NPUS:
                yield Accelerator("intel-npu", f"Intel NPU ({_INTEL_NPUS[dev.device]}, {dev.address})",
                                  f"/sys/bus/pci/devices/{dev.address}",
                                  "no /dev/accel/accel0: the intel_vpu driver is not loaded (Linux 6.3+, "
                                  "with the NPU firmware from linux-firmware)")


# --- Hailo ---------------------------------------------------------------------------------------


def hailo(tree: Tree, libraries: frozenset[str]) -> Iterator[Accelerator]:
    """Hailo-8/8L/10H on PCIe: ``/dev/hailoN`` from the ``hailo_pci`` driver."""
    pci = pci_devices(tree, [_HAILO_VENDOR])
    part = next((_HAILO_PARTS[d.device] for d in pci if d.device in _HAILO_PARTS), "Hailo")
    versions = sorted(v for lib in libraries if (v := lib.removeprefix("libhailort.so.")) != lib and v)
    runtime = f", HailoRT library {versions[-1]}" if versions else ""
    nodes = _nodes(tree, "dev", r"hailo\d+")
    for node in nodes:
        yield Accelerator("hailo", f"{part} ({tree.host(node)}{runtime})", tree.host(node))
    if not nodes:
        for dev in pci:
            yield Accelerator("hailo", f"{_HAILO_PARTS.get(dev.device, 'Hailo')} ({dev.address})",
                              f"/sys/bus/pci/devices/{dev.address}",
                              "no /dev/hailo0: the hailo_pci driver is not loaded (HailoRT's PCIe driver)")


def raspberry_pi_gpu(board: str | None, board_source: str | None) -> Iterator[Accelerator]:
    if board and "raspberry pi" in board.lower():
        if "Raspberry Pi 5" in board or "Compute Module 5" in board or "Raspberry Pi 500" in board:
            core = "VideoCore VII"
        elif "Raspberry Pi 4" in board or "Compute Module 4" in board or "Raspberry Pi 400" in board:
            core = "VideoCore VI"
        else:
            core = "VideoCore"
        yield Accelerator("rpi-gpu", f"Broadcom {core} (informational)", board_source or "")
