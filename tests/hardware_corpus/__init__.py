"""Trees of what real boards expose in /proc, /sys, /dev, /etc and their library dirs, built in tmp_path.

A tree is a dict of paths (relative to the root) to contents: ``str``/``bytes`` files, :class:`Link`
(a symlink, absolute targets kept absolute as on the device), :class:`Dir`, :class:`Fifo`,
:class:`CharDev` and :class:`Sparse` files. The helpers below write the files boards print in
the formats their kernels use; each board in :mod:`tests.hardware_corpus.boards` keeps only the
files that matter for detection. Hostile trees are in :mod:`tests.hardware_corpus.hostile`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Link:
    target: str


@dataclass(frozen=True)
class Dir:
    pass


@dataclass(frozen=True)
class Fifo:
    pass


@dataclass(frozen=True)
class CharDev:
    major: int
    minor: int


@dataclass(frozen=True)
class Sparse:
    size: int


Content = str | bytes | Link | Dir | Fifo | CharDev | Sparse
Tree = dict[str, Content]


def build(base: Path, tree: Mapping[str, Content]) -> Path:
    """Write ``tree`` below ``base`` (parents first, links last so their targets exist)."""
    base.mkdir(parents=True, exist_ok=True)
    links = []
    for rel, content in sorted(tree.items()):
        path = base / rel
        if isinstance(content, Link):
            links.append((path, content.target))
            continue
        if isinstance(content, Dir):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Fifo):
            os.mkfifo(path)
        elif isinstance(content, CharDev):
            os.mknod(path, 0o600 | 0o020000, os.makedev(content.major, content.minor))
        elif isinstance(content, Sparse):
            with path.open("wb") as fh:
                fh.truncate(content.size)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for path, target in links:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return base


def merge(*trees: Mapping[str, Content]) -> Tree:
    out: Tree = {}
    for tree in trees:
        out.update(tree)
    return out


# --- the kernel ---------------------------------------------------------------------------------

def kernel_arch(arch: str) -> Tree:
    """``/proc/sys/kernel/arch``: only on Linux 6.1 and later."""
    return {"proc/sys/kernel/arch": f"{arch}\n"}


_ELF_MACHINE = {"x86_64": (2, 0x3E), "aarch64": (2, 0xB7), "arm": (1, 0x28), "riscv64": (2, 0xF3), "i686": (1, 0x03)}


def elf(arch: str) -> bytes:
    """The first 64 bytes of an ELF executable for ``arch`` (little endian), as ``/usr/bin/dash`` starts."""
    klass, machine = _ELF_MACHINE[arch]
    header = b"\x7fELF" + bytes([klass, 1, 1, 0]) + bytes(8) + (3).to_bytes(2, "little") + machine.to_bytes(2, "little")
    return header + bytes(64 - len(header))


def userland(arch: str) -> Tree:
    """Debian's merged /usr: ``/bin -> usr/bin``, ``/usr/bin/sh -> dash``."""
    return {"bin": Link("usr/bin"), "usr/bin/sh": Link("dash"), "usr/bin/dash": elf(arch)}


ARM64_FEATURES = "fp asimd evtstrm crc32 cpuid"
A78_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                "asimddp uscat ilrcpc flagm paca pacg")
ARMHF_FEATURES = "half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32"


def arm_cpuinfo(clusters: Iterable[tuple[int, str, str]], *, features: str = ARM64_FEATURES,
                model_name: str | None = None, architecture: str = "8", tail: str = "") -> str:
    """``/proc/cpuinfo`` of an ARM kernel: one block per core, ``(count, implementer, part)`` per cluster.

    arm64 kernels print no ``model name`` (NVIDIA's L4T 4.9 does: ``ARMv8 Processor rev 1 (v8l)``);
    32-bit ARM kernels print ``ARMv7 Processor rev 4 (v7l)``. ``tail`` is what follows the blocks (Pi).
    """
    blocks = []
    n = 0
    for count, implementer, part in clusters:
        for _ in range(count):
            name = f"model name\t: {model_name}\n" if model_name else ""
            blocks.append(f"processor\t: {n}\n{name}BogoMIPS\t: 108.00\nFeatures\t: {features}\n"
                          f"CPU implementer\t: {implementer}\nCPU architecture: {architecture}\nCPU variant\t: 0x0\n"
                          f"CPU part\t: {part}\nCPU revision\t: 3\n\n")
            n += 1
    return "".join(blocks) + tail


X86_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
             "ht syscall nx pdpe1gb rdtscp lm constant_tsc nopl xtopology cpuid pni pclmulqdq ssse3 fma cx16 pcid "
             "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch fsgsbase bmi1 "
             "avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt sha_ni xsaveopt xsavec xgetbv1 xsaves")


def x86_cpuinfo(cores: int, model: str, *, vendor: str = "GenuineIntel", flags: str = X86_FLAGS) -> str:
    block = (f"processor\t: {{n}}\nvendor_id\t: {vendor}\ncpu family\t: 6\nmodel\t\t: 140\nmodel name\t: {model}\n"
             f"stepping\t: 1\ncpu MHz\t\t: 2400.000\nflags\t\t: {flags}\nbogomips\t: 4838.40\n\n")
    return "".join(block.format(n=n) for n in range(cores))


# --- firmware tables ----------------------------------------------------------------------------

def device_tree(model: str, *compatible: str) -> Tree:
    """``/proc/device-tree`` is an absolute symlink to the sysfs copy (as on every device-tree board)."""
    base = "sys/firmware/devicetree/base"
    tree: Tree = {"proc/device-tree": Link("/sys/firmware/devicetree/base"), f"{base}/model": model + "\x00"}
    if compatible:
        tree[f"{base}/compatible"] = "".join(c + "\x00" for c in compatible)
    return tree


def dmi(vendor: str, product: str) -> Tree:
    return {"sys/class/dmi/id/sys_vendor": vendor + "\n", "sys/class/dmi/id/product_name": product + "\n"}


# --- buses and devices --------------------------------------------------------------------------

def pci(address: str, vendor: str, device: str, cls: str, driver: str | None = None) -> Tree:
    """A PCI function as sysfs shows it: ``bus/pci/devices/ADDR`` links into ``devices/``."""
    domain = address.rsplit(":", 2)[0]
    real = f"sys/devices/pci{domain}:00/{address}"
    tree: Tree = {
        f"sys/bus/pci/devices/{address}": Link(f"../../../devices/pci{domain}:00/{address}"),
        f"{real}/vendor": vendor + "\n",
        f"{real}/device": device + "\n",
        f"{real}/class": cls + "\n",
    }
    if driver:
        tree[f"{real}/driver"] = Link(f"../../../bus/pci/drivers/{driver}")
        tree[f"sys/bus/pci/drivers/{driver}"] = Dir()
    return tree


def render_node(n: int, *, vendor: str | None = None, device: str | None = None, pci_address: str | None = None,
                platform_device: str | None = None, driver: str | None = None, uevent: str = "") -> Tree:
    """``/sys/class/drm/renderD<n>``: ``device`` leads to the PCI function or platform device."""
    name = f"renderD{n}"
    parent = f"sys/devices/pci0000:00/{pci_address}" if pci_address else f"sys/devices/platform/{platform_device}"
    tree: Tree = {f"sys/class/drm/{name}": Link(f"../../{parent.removeprefix('sys/')}/drm/{name}"),
                  f"{parent}/drm/{name}/device": Link("../.."), f"dev/dri/{name}": ""}
    if vendor:
        tree[f"{parent}/vendor"] = vendor + "\n"
    if device:
        tree[f"{parent}/device"] = device + "\n"
    if uevent:
        tree[f"{parent}/uevent"] = uevent
    if driver:
        tree[f"{parent}/driver"] = Link("../" * parent.count("/") + f"bus/platform/drivers/{driver}")
        tree[f"sys/bus/platform/drivers/{driver}"] = Dir()
    return tree


def usb(port: str, vendor: str, product: str) -> Tree:
    base = f"sys/bus/usb/devices/{port}"
    return {f"{base}/idVendor": vendor + "\n", f"{base}/idProduct": product + "\n"}


def libs(directory: str, *names: str) -> Tree:
    """Library files in ``directory``; ``name=target`` makes a symlink (``libedgetpu.so.1=libedgetpu.so.1.0``)."""
    tree: Tree = {}
    for name in names:
        file, _, target = name.partition("=")
        tree[f"{directory}/{file}"] = Link(target) if target else ""
    return tree


def cuda(version: str, target: str = "aarch64-linux", *, runtime: str = "12") -> Tree:
    """The CUDA toolkit as JetPack and NVIDIA's debs install it: absolute alternatives links."""
    return {
        "usr/local/cuda": Link("/etc/alternatives/cuda"),
        "etc/alternatives/cuda": Link(f"/usr/local/cuda-{version}"),
        f"usr/local/cuda-{version}/lib64": Link(f"targets/{target}/lib"),
        f"usr/local/cuda-{version}/targets/{target}/lib/libcudart.so.{runtime}": Link(f"libcudart.so.{version}"),
        f"usr/local/cuda-{version}/targets/{target}/lib/libcudart.so.{version}": "",
    }


def nvidia_driver(version_line: str, *gpus: tuple[str, str]) -> Tree:
    """``/proc/driver/nvidia`` and ``/dev/nvidia*`` of NVIDIA's kernel driver; ``gpus`` = (pci address, model)."""
    tree: Tree = {"proc/driver/nvidia/version": f"NVRM version: {version_line}\nGCC version:  gcc version 12.3.0\n",
                  "dev/nvidiactl": ""}
    for i, (address, model) in enumerate(gpus):
        tree[f"dev/nvidia{i}"] = ""
        tree[f"proc/driver/nvidia/gpus/{address}/information"] = (
            f"Model: \t\t {model}\nIRQ:   \t\t 160\nGPU UUID: \t GPU-0\nBus Location: \t {address}\n")
    return tree


@dataclass(frozen=True)
class Board:
    """A real device's tree and what ``edge-agent detect --root`` must say about it.

    ``formats`` maps each model format to the delegate the device would run it on (None: it cannot
    run there); ``accelerators`` maps each accelerator kind found to (used, a fragment of the reason).
    """

    id: str
    source: str  # which device and OS image the tree is written from
    tree: Tree
    board: str | None
    arch: str
    profile: str
    reason: str
    formats: Mapping[str, str | None]
    accelerators: Mapping[str, tuple[bool, str]] = field(default_factory=dict)
    cpu_model: str | None = None
    soc: str | None = None
    notes: tuple[str, ...] = ()  # fragments that must appear in hardware.notes
