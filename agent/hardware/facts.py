"""The facts detection produces: pure data, comparable across runs, JSON-ready.

Owned here so profile matching (:mod:`agent.hardware.profiles`), the plan
(:mod:`agent.hardware.plan`) and detection (:mod:`agent.hardware.detect`) share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ACCELERATOR_KINDS = frozenset({
    "nvidia-gpu", "jetson-gpu", "edgetpu-usb", "edgetpu-pcie", "intel-gpu", "intel-npu", "hailo",
    "rockchip-npu", "amd-gpu", "rpi-gpu",
})

# Shared libraries that decide which delegates / execution providers / runtimes can load (globs on file names).
KNOWN_LIBRARIES = (
    "libedgetpu.so.1*",
    "libtensorflowlite_gpu_delegate.so*",
    "libopenvino.so*",
    "libnvinfer.so*",
    "libcudart.so*",
    "libhailort.so*",
    "librknnrt.so*",
)


@dataclass(frozen=True)
class Accelerator:
    """One accelerator and the evidence for it, so ``edge-agent detect`` can explain itself.

    ``problem`` is None for an accelerator that can be used; otherwise it says why not (no driver
    bound, no device node), and the accelerator is listed in ``HardwareInfo.unavailable``.
    """

    kind: str
    name: str
    evidence: str
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "evidence": self.evidence}
        if self.problem is not None:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class HardwareInfo:
    """Everything profile matching needs; pure data, comparable across runs.

    ``arch`` is what profiles match: the kernel's architecture, else the userland's (``arch_source``
    says which file told). ``accelerators`` are the usable ones; ``unavailable`` holds those found
    but not usable (e.g. a Hailo on PCIe without its driver), which never match a profile.
    """

    root: str
    arch: str
    board: str | None
    cpu_model: str | None
    cpu_count: int
    cpu_flags: frozenset[str]
    accelerators: tuple[Accelerator, ...]
    libraries: frozenset[str]
    kernel_arch: str | None = None
    userspace_arch: str | None = None
    arch_source: str | None = None
    soc: str | None = None
    soc_source: str | None = None
    unavailable: tuple[Accelerator, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (sorted sets) for the CLI, the status API and MQTT state."""
        return {
            "root": self.root,
            "arch": self.arch,
            "kernel_arch": self.kernel_arch,
            "userspace_arch": self.userspace_arch,
            "arch_source": self.arch_source,
            "board": self.board,
            "soc": self.soc,
            "soc_source": self.soc_source,
            "cpu_model": self.cpu_model,
            "cpu_count": self.cpu_count,
            "cpu_flags": sorted(self.cpu_flags),
            "accelerators": [a.to_dict() for a in self.accelerators],
            "unavailable": [a.to_dict() for a in self.unavailable],
            "libraries": sorted(self.libraries),
            "notes": list(self.notes),
        }

    def has(self, kind: str) -> bool:
        """True if a usable accelerator of ``kind`` was found."""
        return any(a.kind == kind for a in self.accelerators)
