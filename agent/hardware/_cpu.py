"""CPU facts from ``/proc/cpuinfo`` and the architecture from the tree itself.

Pure functions of text and bytes (no I/O), so every rule here is tested on what real boards print.
The architecture must come from the tree being described, never from the machine running the
check: ``/proc/sys/kernel/arch`` exists only since Linux 6.1, so JetPack 4-6, Raspberry Pi OS
Bullseye, Ubuntu 22.04, Debian 11 and Mendel trees do not have it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from agent.hardware._tree import printable

#: Architectures ``uname -m`` reports that a profile may name; anything else in a tree is garbage.
KNOWN_ARCHES = frozenset({
    "x86_64", "i386", "i486", "i586", "i686", "aarch64", "aarch64_be", "armv6l", "armv7l", "armv8l",
    "riscv64", "riscv32", "ppc64le", "ppc64", "s390x", "loongarch64", "mips64",
})

# MIDR implementer codes and part numbers (Linux arch/arm64/include/asm/cputype.h, arch/arm/include/asm/cputype.h).
_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu", "0x48": "HiSilicon",
    "0x4e": "NVIDIA", "0x50": "APM", "0x51": "Qualcomm", "0x53": "Samsung", "0x56": "Marvell",
    "0x61": "Apple", "0x69": "Intel", "0x6d": "Microsoft", "0xc0": "Ampere",
}
_PARTS = {
    "0x41": {
        "0xb76": "ARM1176", "0xc05": "Cortex-A5", "0xc07": "Cortex-A7", "0xc08": "Cortex-A8", "0xc09": "Cortex-A9",
        "0xc0d": "Cortex-A12", "0xc0e": "Cortex-A17", "0xc0f": "Cortex-A15", "0xd01": "Cortex-A32",
        "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd06": "Cortex-A65",
        "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75",
        "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd0e": "Cortex-A76AE",
        "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd43": "Cortex-A65AE",
        "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
        "0xd49": "Neoverse-N2", "0xd4a": "Neoverse-E1", "0xd4b": "Cortex-A78C", "0xd4c": "Cortex-X1C",
        "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520",
        "0xd81": "Cortex-A720", "0xd82": "Cortex-X4", "0xd83": "Neoverse-V3AE", "0xd84": "Neoverse-V3",
        "0xd85": "Cortex-X925", "0xd87": "Cortex-A725", "0xd8e": "Neoverse-N3",
    },
    "0x42": {"0x00f": "Brahma-B15", "0x100": "Brahma-B53", "0x516": "Vulcan"},
    "0x43": {"0x0a1": "ThunderX", "0x0af": "ThunderX2"},
    "0x46": {"0x001": "A64FX"},
    "0x48": {"0xd01": "TaiShan v110"},
    "0x4e": {"0x003": "Denver", "0x004": "Carmel"},
    "0x51": {"0x001": "Oryon", "0x800": "Kryo 2xx Gold", "0x801": "Kryo 2xx Silver", "0x803": "Kryo 3xx Silver",
             "0x804": "Kryo 4xx Gold", "0x805": "Kryo 4xx Silver"},
    "0x61": {"0x022": "M1 Icestorm", "0x023": "M1 Firestorm", "0x024": "M1 Pro Icestorm",
             "0x025": "M1 Pro Firestorm", "0x028": "M1 Max Icestorm", "0x029": "M1 Max Firestorm",
             "0x032": "M2 Blizzard", "0x033": "M2 Avalanche", "0x034": "M2 Pro Blizzard",
             "0x035": "M2 Pro Avalanche", "0x038": "M2 Max Blizzard", "0x039": "M2 Max Avalanche"},
    "0xc0": {"0xac3": "AmpereOne", "0xac4": "AmpereOne AC04"},
}
_ARM32_MODEL = re.compile(r"\((v\dl)\)\s*$")  # "ARMv7 Processor rev 4 (v7l)" on a 32-bit ARM kernel
_MAX_LINE = 8192

# ELF e_machine -> (arch for ELFCLASS32, arch for ELFCLASS64)
_ELF_MACHINES = {
    0x03: ("i686", None), 0x3E: (None, "x86_64"), 0x28: ("arm", None), 0xB7: (None, "aarch64"),
    0xF3: ("riscv32", "riscv64"), 0x15: (None, "ppc64"), 0x16: (None, "s390x"), 0x102: (None, "loongarch64"),
}


@dataclass
class CpuInfo:
    """What ``/proc/cpuinfo`` says: one dict per ``processor`` block, plus the lines outside any."""

    blocks: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def processors(self) -> int:
        return sum(1 for b in self.blocks if "processor" in b)

    @property
    def flags(self) -> set[str]:
        """Union of x86 ``flags`` and ARM ``Features`` (and RISC-V ``isa`` extensions are not flags)."""
        found: set[str] = set()
        for block in self.blocks:
            for key in ("flags", "Features"):
                found.update(printable(f, 40) for f in block.get(key, "").split()[:512])
        return found

    def first(self, key: str) -> str | None:
        for block in (*self.blocks, self.extra):
            if block.get(key):
                return block[key]
        return None


def parse_cpuinfo(text: str) -> CpuInfo:
    """Split into per-processor blocks (x86, ARM, RISC-V layouts); never raises."""
    info = CpuInfo()
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if len(line) > _MAX_LINE:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            if not line.strip():
                current = None
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            current = {"processor": value}
            info.blocks.append(current)
        elif current is not None:
            current.setdefault(key, value)
        else:
            info.extra.setdefault(key, value)  # Pi "Hardware"/"Model" lines, or an old ARM layout
    return info


def cpu_model(cpu: CpuInfo) -> str | None:
    """Core names from the ARM MIDR fields (every cluster: ``4x Cortex-A55 + 4x Cortex-A76``), else ``model name``.

    The MIDR fields win over ``model name`` because a 32-bit ARM kernel prints ``ARMv7 Processor rev 4
    (v7l)`` there for every core, and over ``Hardware`` because a Pi reports ``BCM2835`` on every model.
    """
    cores: Counter[str] = Counter()
    for block in cpu.blocks or [cpu.extra]:
        implementer = block.get("CPU implementer", "").lower()
        part = block.get("CPU part", "").lower()
        if not implementer or not part:
            continue
        maker = _IMPLEMENTERS.get(implementer, f"implementer {implementer}")
        name = _PARTS.get(implementer, {}).get(part, f"part {part}")
        cores[printable(f"{maker} {name}", 60)] += 1
    if cores:
        if len(cores) == 1:
            return next(iter(cores))
        return " + ".join(f"{n}x {name}" for name, n in cores.items())
    for key in ("model name", "uarch", "cpu", "Hardware"):
        value = cpu.first(key)
        if value:
            return printable(value, 120)
    return None


def arch_from_cpuinfo(cpu: CpuInfo) -> str | None:
    """The kernel's architecture as its ``/proc/cpuinfo`` layout shows it, or None if it does not."""
    if cpu.first("vendor_id") and cpu.first("flags") is not None:
        return "x86_64" if "lm" in (cpu.first("flags") or "").split() else "i686"
    isa = cpu.first("isa")
    if isa and isa.startswith("rv"):
        return "riscv64" if isa.startswith("rv64") else "riscv32"
    if cpu.first("CPU implementer") or cpu.first("Features"):
        # The Features line tells the kernels apart: arm64 lists "asimd", 32-bit ARM lists "half thumb
        # ... neon". "model name" does not: a 32-bit kernel prints "ARMv7 Processor rev 4 (v7l)" even on
        # an ARMv8 core, and NVIDIA's arm64 L4T kernels print "ARMv8 Processor rev 1 (v8l)".
        features = set((cpu.first("Features") or "").split())
        model = cpu.first("model name") or cpu.first("Processor") or ""
        suffix = _ARM32_MODEL.search(model)
        if "asimd" in features or "AArch64" in model:
            return "aarch64"
        if features & {"half", "thumb", "swp", "vfp", "neon", "edsp", "fastmult"}:
            return f"arm{suffix[1]}" if suffix else "armv7l"
        architecture = (cpu.first("CPU architecture") or "").strip()
        if architecture in ("8", "AArch64") and suffix is None:
            return "aarch64"
        if suffix is not None:
            return f"arm{suffix[1]}"
    return None


def arch_from_elf(header: bytes) -> str | None:
    """Architecture of an ELF binary's header (the userland's, when read from ``/bin/sh``)."""
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) or header[5] not in (1, 2):
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    arches = _ELF_MACHINES.get(machine)
    if arches is None:
        return None
    arch = arches[header[4] - 1]
    if arch == "ppc64" and header[5] == 1:
        return "ppc64le"
    return arch


def plausible_arch(value: str | None) -> str | None:
    """``value`` if it is an architecture name ``uname -m`` would print, else None."""
    return value if value in KNOWN_ARCHES else None
