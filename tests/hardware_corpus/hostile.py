"""Hostile and odd trees: each must finish (well within a second) with a sane answer.

Every one of these broke or fooled detection before it read through a bounded tree: a FIFO hung it,
``proc/cpuinfo -> /dev/zero`` raised MemoryError, a device-tree model of binary garbage became a
16 KB board name with escape sequences (and its embedded "Jetson Orin" selected a profile), a
looping ``dev/apex_0`` counted as a Coral.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tests.hardware_corpus import CharDev, Dir, Fifo, Link, Sparse, Tree, arm_cpuinfo, merge, x86_cpuinfo

ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"


def _garbage(size: int, *embedded: bytes, seed: int = 17) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for i, chunk in enumerate(embedded):
        at = (i + 1) * size // (len(embedded) + 1)
        data[at: at + len(chunk)] = chunk
    return bytes(data)


@dataclass(frozen=True)
class Hostile:
    id: str
    what: str
    tree: Tree
    arch: str
    board: str | None
    profile: str
    accelerators: frozenset[str] = frozenset()  # kinds found, usable or not
    notes: tuple[str, ...] = ()  # fragments that must appear in hardware.notes
    check_accelerators: bool = True
    needs_mknod: bool = False
    subprocess: bool = False  # run as ``edge-agent detect`` with a timeout: a hang must fail, not block pytest
    extra: dict[str, str] = field(default_factory=dict)


X86 = {"proc/sys/kernel/arch": "x86_64\n", "proc/cpuinfo": x86_cpuinfo(2, "Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz")}

HOSTILE: list[Hostile] = [
    Hostile(
        "fifos", "a FIFO wherever detection reads a file or looks for a device node",
        {p: Fifo() for p in ("proc/cpuinfo", "proc/sys/kernel/arch", "proc/device-tree/model",
                             "sys/firmware/devicetree/base/compatible", "sys/class/dmi/id/product_name",
                             "etc/nv_tegra_release", "proc/driver/nvidia/version", "sys/bus/usb/devices/1-1/idVendor",
                             "dev/apex_0", "dev/hailo0", "dev/nvidia0", "dev/rknpu", "usr/lib/libedgetpu.so.1",
                             "bin/sh")} | {"sys/bus/usb/devices/1-1/idProduct": "9302\n"},
        "unknown", None, "generic-cpu", notes=("/proc/cpuinfo: skipped, a fifo where a regular file was expected",),
        subprocess=True,
    ),
    Hostile(
        "cpuinfo-dev-zero", "proc/cpuinfo -> /dev/zero (a real character device in the tree), the model -> a "
        "relative path climbing out of the root to dev/zero",
        merge({"proc/sys/kernel/arch": "aarch64\n", "dev/zero": CharDev(1, 5), "proc/cpuinfo": Link("/dev/zero"),
               "proc/device-tree/model": Link("../../../../../../../../../../dev/zero"),
               "etc/nv_tegra_release": Link("/dev/zero")}),
        "aarch64", None, "generic-cpu", notes=("a char device where a regular file was expected",), needs_mknod=True,
    ),
    Hostile(
        "links-to-host", "proc, sys and dev are absolute links to the host's (a careless copy): they must stay "
        "inside the tree, where they loop, not read this machine's",
        {"proc": Link("/proc"), "sys": Link("/sys"), "dev": Link("/dev"),
         "etc/nv_tegra_release": Link("../../../../../../etc/hostname")},
        "unknown", None, "generic-cpu", notes=("more than 40 symbolic links",),
    ),
    Hostile(
        "garbage-device-tree", "a 16 KB device-tree model and compatible of binary garbage with 'NVIDIA Jetson Orin', "
        "'nvidia,tegra234' and terminal escape sequences inside",
        {"proc/sys/kernel/arch": "aarch64\n", "proc/device-tree": Link("/sys/firmware/devicetree/base"),
         "sys/firmware/devicetree/base/model": _garbage(16366, b"NVIDIA Jetson Orin Nano", ESC.encode()),
         "sys/firmware/devicetree/base/compatible": _garbage(4000, b"\x00nvidia,tegra234\x00", seed=3),
         "proc/cpuinfo": arm_cpuinfo([(4, "0x41", "0xd42")])},
        "aarch64", None, "generic-cpu",
        notes=("/proc/device-tree/model: not a plausible name", "/proc/device-tree/compatible: not a list"),
    ),
    Hostile(
        "symlink-loops", "dev/apex_0 -> apex_0, dev/hailo0 <-> dev/hailo1, a 60-link chain to dev/nvidia0, "
        "proc/cpuinfo -> itself",
        merge(X86, {"dev/apex_0": Link("apex_0"), "dev/hailo0": Link("hailo1"), "dev/hailo1": Link("hailo0"),
                    "proc/cpuinfo": Link("cpuinfo")},
              {f"dev/chain{i}": Link(f"chain{i + 1}") for i in range(60)}, {"dev/chain60": "", "dev/nvidia0":
                                                                             Link("chain0")}),
        "x86_64", None, "x86-cpu", notes=("more than 40 symbolic links",),
    ),
    Hostile(
        "huge-sparse-files", "8 GiB sparse /proc/cpuinfo, 1 GiB device-tree model, 10 GB kernel arch",
        {"proc/cpuinfo": Sparse(8 << 30), "proc/device-tree/model": Sparse(1 << 30),
         "proc/sys/kernel/arch": Sparse(10**10), "sys/class/dmi/id/product_name": Sparse(1 << 20)},
        "unknown", None, "generic-cpu", notes=("/proc/cpuinfo: larger than 1048576 bytes",),
    ),
    Hostile(
        "huge-directories", "4200 entries in /dev and 600 in sys/bus/usb/devices",
        merge(X86, {f"dev/tty{i}": "" for i in range(4200)}, {f"sys/bus/usb/devices/1-{i}": Dir() for i in range(600)}),
        "x86_64", None, "x86-cpu", notes=("/dev: more than 4096 entries", "/sys/bus/usb/devices: more than 512"),
    ),
    Hostile(
        "escape-sequences", "terminal escapes in the kernel arch, DMI name, cpuinfo model, a USB port, a PCI "
        "address and a library file name",
        merge({"proc/sys/kernel/arch": f"x86_64{ESC}\n",
               "proc/cpuinfo": x86_cpuinfo(2, f"Evil{ESC}CPU"),
               "sys/class/dmi/id/product_name": f"NUC{ESC}\n",
               f"sys/bus/usb/devices/2-1{ESC}/idVendor": "18d1\n", f"sys/bus/usb/devices/2-1{ESC}/idProduct": "9302\n",
               f"sys/bus/pci/devices/0000:03:00.0{ESC}/vendor": "0x1e60\n",
               f"sys/bus/pci/devices/0000:03:00.0{ESC}/device": "0x2864\n",
               f"usr/lib/libedgetpu.so.1{ESC}": ""}),
        "x86_64", None, "coral-usb", frozenset({"edgetpu-usb", "hailo"}),
        notes=("/proc/sys/kernel/arch: ", "/sys/class/dmi/id/product_name: not a plausible name"),
    ),
    Hostile(
        "binary-cpuinfo", "1 MB of random bytes as /proc/cpuinfo and as the release file",
        {"proc/sys/kernel/arch": "x86_64\n", "proc/cpuinfo": _garbage(1 << 20), "etc/nv_tegra_release":
            _garbage(1 << 20, seed=5)},
        "x86_64", None, "x86-cpu",
    ),
    Hostile(
        "directories-for-files", "a directory wherever a file is expected",
        {p: Dir() for p in ("proc/cpuinfo", "proc/sys/kernel/arch", "proc/device-tree/model", "etc/nv_tegra_release",
                            "proc/driver/nvidia/version", "dev/apex_0", "dev/hailo0", "usr/lib/libedgetpu.so.1")},
        "unknown", None, "generic-cpu",
    ),
]
