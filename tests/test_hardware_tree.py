"""The bounded tree reader and the pure CPU / architecture rules behind detection."""

from __future__ import annotations

import itertools
import os

import pytest

from agent.hardware import detect
from agent.hardware._cpu import arch_from_cpuinfo, arch_from_elf, cpu_model, parse_cpuinfo
from agent.hardware._tree import Tree, printable
from tests.hardware_corpus import ARMHF_FEATURES, Link, arm_cpuinfo, build, elf, x86_cpuinfo

# -- the reader ---------------------------------------------------------------------------------


def test_links_resolve_inside_the_root(tmp_path):
    build(tmp_path, {
        "usr/local/cuda": Link("/etc/alternatives/cuda"),  # absolute: the tree's /etc, not this host's
        "etc/alternatives/cuda": Link("/usr/local/cuda-12.2"),
        "usr/local/cuda-12.2/lib64/libcudart.so.12": "",
        "etc/escape": Link("../../../../../../../../etc/hostname"),  # ".." stops at the root
        "etc/hostname": "device\n",
    })
    tree = Tree(str(tmp_path))
    assert tree.kind("usr/local/cuda/lib64/libcudart.so.12") == "file"
    assert tree.read_text("etc/escape") == "device"
    assert tree.resolve("usr/local/cuda/lib64")[0] == str(tmp_path / "usr/local/cuda-12.2/lib64")


def test_reads_are_bounded_and_noted(tmp_path):
    build(tmp_path, {"big": "x" * 10_000})
    tree = Tree(str(tmp_path))
    assert tree.read_bytes("big", 100) == b"x" * 100
    assert tree.notes == ["/big: larger than 100 bytes, only the first 100 read"]
    assert tree.read_bytes("big", 10, head=True) == b"x" * 10
    assert len(tree.notes) == 1  # a header read is not a truncation


def test_listing_is_bounded(tmp_path):
    build(tmp_path, {f"d/{i}": "" for i in range(20)})
    tree = Tree(str(tmp_path))
    assert len(tree.listdir("d", limit=5)) == 5
    assert tree.notes == ["/d: more than 5 entries, only 5 looked at"]
    assert tree.glob("d/1*") == sorted(f"d/{n}" for n in ("1", *(str(i) for i in range(10, 20))))


def test_the_budget_stops_every_read(tmp_path):
    build(tmp_path, {"a": "1", "b": "2"})
    ticks = itertools.count(0.0, 0.25)
    tree = Tree(str(tmp_path), budget_s=1.0, clock=lambda: next(ticks))
    assert tree.read_text("a") == "1"  # a tick per path component and per read() call
    assert tree.read_text("b") is None
    assert tree.exhausted
    assert tree.notes == ["detection stopped after its 1 s budget: facts not read by then are absent"]
    assert tree.listdir("") == [] and tree.glob("*") == []


def test_an_exhausted_budget_leaves_only_absent_facts(tmp_path):
    build(tmp_path, {"proc/sys/kernel/arch": "aarch64\n", "dev/hailo0": ""})
    hw = detect(tmp_path, budget_s=-1)
    assert (hw.arch, hw.accelerators) == ("unknown", ())
    assert any("budget" in n for n in hw.notes)


def test_printable_escapes_control_and_format_characters():
    assert printable("ok \x1b]0;x\x07 \u202eevil\tend") == "ok \\x1b]0;x\\x07 \\u202eevil end"
    assert printable("x" * 300, 10) == "x" * 9 + "…"


def test_special_files_are_never_opened(tmp_path):
    try:
        os.mknod(tmp_path / "watchdog", 0o600 | 0o020000, os.makedev(10, 130))  # what /dev/watchdog is
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    tree = Tree(str(tmp_path))
    assert tree.kind("watchdog") == "char device"
    assert tree.is_node("watchdog")  # a device node counts for existence ...
    assert tree.read_bytes("watchdog") is None  # ... and is never opened (opening /dev/watchdog arms it)
    assert tree.notes == ["/watchdog: skipped, a char device where a regular file was expected"]


# -- CPU and architecture ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "arch"), [
    (x86_cpuinfo(2, "Intel(R) Core(TM) i5"), "x86_64"),
    (x86_cpuinfo(1, "Intel(R) Atom(TM) CPU N270", flags="fpu vme de pse tsc msr pae sse sse2"), "i686"),
    (arm_cpuinfo([(4, "0x41", "0xd08")]), "aarch64"),  # arm64: no "model name"
    # NVIDIA's L4T 4.9 arm64 kernel prints a 32-bit-looking model name
    (arm_cpuinfo([(4, "0x41", "0xd07")], features="fp asimd evtstrm aes", model_name="ARMv8 Processor rev 1 (v8l)"),
     "aarch64"),
    # a 32-bit kernel on an ARMv8 core (Pi 3, 32-bit Raspberry Pi OS)
    (arm_cpuinfo([(4, "0x41", "0xd03")], features=ARMHF_FEATURES, model_name="ARMv7 Processor rev 4 (v7l)",
                 architecture="7"), "armv7l"),
    (arm_cpuinfo([(1, "0x41", "0xb76")], features="half thumb fastmult vfp edsp java tls",
                 model_name="ARMv6-compatible processor rev 7 (v6l)", architecture="7"), "armv6l"),
    ("Processor\t: AArch64 Processor rev 4 (aarch64)\nprocessor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x51\n",
     "aarch64"),
    ("processor\t: 0\nhart\t\t: 1\nisa\t\t: rv64imafdc\nuarch\t\t: sifive,u74-mc\n", "riscv64"),
    ("", None),
    ("garbage without fields\n\x00\x01", None),
])
def test_arch_from_cpuinfo(text, arch):
    assert arch_from_cpuinfo(parse_cpuinfo(text)) == arch


@pytest.mark.parametrize("arch", ["x86_64", "aarch64", "arm", "riscv64", "i686"])
def test_arch_from_elf(arch):
    assert arch_from_elf(elf(arch)) == arch


@pytest.mark.parametrize("header", [b"", b"\x7fELF", b"MZ" + bytes(62), b"\x7fELF\x03\x01" + bytes(58)])
def test_not_an_elf(header):
    assert arch_from_elf(header) is None


@pytest.mark.parametrize(("clusters", "name"), [
    ([(4, "0x41", "0xd05"), (4, "0x41", "0xd0b")], "4x ARM Cortex-A55 + 4x ARM Cortex-A76"),  # RK3588
    ([(10, "0x41", "0xd85"), (10, "0x41", "0xd87")], "10x ARM Cortex-X925 + 10x ARM Cortex-A725"),  # GB10
    ([(8, "0x4e", "0x004")], "NVIDIA Carmel"),  # Xavier
    ([(4, "0x41", "0xd0c")], "ARM Neoverse-N1"),
    ([(14, "0x41", "0xd83")], "ARM Neoverse-V3AE"),  # Thor
    ([(4, "0x61", "0x022"), (4, "0x61", "0x023")], "4x Apple M1 Icestorm + 4x Apple M1 Firestorm"),
    ([(2, "0x41", "0xd99")], "ARM part 0xd99"),
    ([(2, "0x99", "0x001")], "implementer 0x99 part 0x001"),
])
def test_cpu_model_names_every_cluster(clusters, name):
    assert cpu_model(parse_cpuinfo(arm_cpuinfo(clusters))) == name
