"""Hardware detection and device-profile selection against fake /proc, /sys, /dev trees in tmp_path."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from agent.errors import ConfigError, HardwareError
from agent.hardware import (
    ACCELERATOR_KINDS,
    Accelerator,
    DelegateSpec,
    HardwareInfo,
    detect,
    load_profiles,
    select_profile,
)

Tree = dict[str, "str | bytes | None"]


def make_root(base: Path, files: Tree) -> Path:
    """Build a fake root: str/bytes become files, None becomes an (empty) directory."""
    for rel, content in files.items():
        path = base / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return base


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


# --- realistic /proc/cpuinfo samples ---------------------------------------------------------------


def arm_cpuinfo(cores: int, part: str, extra: str = "") -> str:
    block = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        f"CPU part\t: {part}\nCPU revision\t: 3\n\n"
    )
    return "".join(block.format(n=n) for n in range(cores)) + extra


def x86_cpuinfo(cores: int, model: str, flags: str) -> str:
    block = (
        "processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
        f"model name\t: {model}\nflags\t\t: {flags}\n\n"
    )
    return "".join(block.format(n=n) for n in range(cores))


X86_FLAGS = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c"
PI4_CPUINFO = arm_cpuinfo(
    4, "0xd08", "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)
PI4: Tree = {
    "proc/sys/kernel/arch": "aarch64\n",
    "proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00",
    "proc/cpuinfo": PI4_CPUINFO,
    # The Pi 4's VL805 USB 3 hub: a USB device that is not a Coral.
    "sys/bus/usb/devices/1-1/idVendor": "2109\n",
    "sys/bus/usb/devices/1-1/idProduct": "3431\n",
    "sys/bus/usb/devices/1-1:1.0": None,
}
PI5: Tree = {
    "proc/sys/kernel/arch": "aarch64\n",
    "sys/firmware/devicetree/base/model": "Raspberry Pi 5 Model B Rev 1.0\x00",
    "proc/cpuinfo": arm_cpuinfo(
        4, "0xd0b", "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
    ),
}
JETSON_NANO: Tree = {
    "proc/sys/kernel/arch": "aarch64\n",
    "proc/device-tree/model": "NVIDIA Jetson Nano Developer Kit\x00",
    "etc/nv_tegra_release": "# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref, EABI: aarch64\n",
    "proc/cpuinfo": arm_cpuinfo(4, "0xd07"),
    "dev/nvhost-ctrl-gpu": "",
    "dev/nvhost-gpu": "",
    "usr/lib/aarch64-linux-gnu/libnvinfer.so.8": "",
    "usr/local/cuda/lib64/libcudart.so.10.2": "",
}
JETSON_ORIN: Tree = {
    "proc/sys/kernel/arch": "aarch64\n",
    "proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
    "etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64\n",
    "proc/cpuinfo": arm_cpuinfo(6, "0xd42"),
    "dev/nvgpu/igpu0/ctrl": "",
    # JetPack 6's OpenRM display driver: must not be reported as a discrete GPU.
    "dev/nvidia0": "",
    "proc/driver/nvidia/version": "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  540.3.0\n",
    "usr/lib/aarch64-linux-gnu/libnvinfer.so.10": "",
    "usr/lib/aarch64-linux-gnu/tegra/libtensorflowlite_gpu_delegate.so": "",
}
X86: Tree = {
    "proc/sys/kernel/arch": "x86_64\n",
    "sys/class/dmi/id/product_name": "NUC11TNHi5\n",
    "proc/cpuinfo": x86_cpuinfo(8, "11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz", X86_FLAGS),
}
X86_NVIDIA: Tree = {
    "proc/sys/kernel/arch": "x86_64\n",
    "sys/class/dmi/id/product_name": "Precision 3660\n",
    "proc/cpuinfo": x86_cpuinfo(16, "12th Gen Intel(R) Core(TM) i7-12700", X86_FLAGS),
    "dev/nvidia0": "",
    "dev/nvidiactl": "",
    "proc/driver/nvidia/version": (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 2024\n"
    ),
    "usr/lib/x86_64-linux-gnu/libnvinfer.so.10": "",
    "usr/local/cuda/lib64/libcudart.so.12": "",
}
X86_OPENVINO: Tree = {
    **X86,
    "sys/class/drm/renderD128/device/vendor": "0x8086\n",
    "sys/class/drm/renderD128/device/device": "0x9a49\n",
    "opt/intel/openvino_2024.4.0/runtime/lib/intel64/libopenvino.so.2440": "",
}
CORAL_USB: Tree = {
    **X86,
    "sys/bus/usb/devices/2-1/idVendor": "18d1\n",
    "sys/bus/usb/devices/2-1/idProduct": "9302\n",
    "usr/lib/x86_64-linux-gnu/libedgetpu.so.1": "",
}
CORAL_PCIE: Tree = {
    **X86,
    "dev/apex_0": "",
    "usr/lib/x86_64-linux-gnu/libedgetpu.so.1.0": "",
}
PI5_HAILO: Tree = {**PI5, "dev/hailo0": "", "usr/lib/libhailort.so.4.20.0": ""}
BEAGLEBONE: Tree = {
    "proc/sys/kernel/arch": "armv7l\n",
    "proc/device-tree/model": "TI AM335x BeagleBone Black\x00",
    "proc/cpuinfo": (
        "processor\t: 0\nmodel name\t: ARMv7 Processor rev 2 (v7l)\nFeatures\t: half thumb neon\n"
    ),
}


@pytest.mark.parametrize(
    ("tree", "profile", "onnx_first", "tflite_first"),
    [
        (PI4, "raspberry-pi-4", "CPUExecutionProvider", "xnnpack"),
        (PI5, "raspberry-pi-5", "CPUExecutionProvider", "xnnpack"),
        (PI5_HAILO, "raspberry-pi-5-hailo", "CPUExecutionProvider", "xnnpack"),
        (JETSON_NANO, "jetson-nano", "TensorrtExecutionProvider", "gpu"),
        (JETSON_ORIN, "jetson-orin", "TensorrtExecutionProvider", "gpu"),
        (CORAL_USB, "coral-usb", "CPUExecutionProvider", "edgetpu"),
        (CORAL_PCIE, "coral-pcie", "CPUExecutionProvider", "edgetpu"),
        (X86, "x86-cpu", "CPUExecutionProvider", "xnnpack"),
        (X86_NVIDIA, "x86-nvidia", "TensorrtExecutionProvider", "xnnpack"),
        (X86_OPENVINO, "x86-openvino", "OpenVINOExecutionProvider", "xnnpack"),
        (BEAGLEBONE, "generic-cpu", "CPUExecutionProvider", "xnnpack"),
    ],
    ids=lambda v: v if isinstance(v, str) and "-" in v else None,
)
def test_profile_selected_per_device(tmp_path, profiles, tree, profile, onnx_first, tflite_first):
    choice = select_profile(detect(make_root(tmp_path, tree)), profiles)
    assert choice.profile.name == profile
    assert choice.reason.startswith("matched: ")
    assert choice.profile.runtimes["onnx"][0].name == onnx_first
    assert choice.profile.runtimes["tflite"][0].name == tflite_first
    # .hef / .rknn models run only on their NPU: every profile has the device entry, and nothing else
    assert [d.name for d in choice.profile.runtimes["hef"]] == ["hailo"]
    assert [d.name for d in choice.profile.runtimes["rknn"]] == ["npu"]


def test_pi4_facts(tmp_path):
    hw = detect(make_root(tmp_path, PI4))
    assert hw.root == str(tmp_path)
    assert hw.arch == "aarch64"
    assert hw.board == "Raspberry Pi 4 Model B Rev 1.4"  # NUL terminator stripped
    assert hw.cpu_model == "ARM Cortex-A72"
    assert hw.cpu_count == 4
    assert hw.cpu_flags == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    assert hw.accelerators == (
        Accelerator("rpi-gpu", "Broadcom VideoCore VI (informational)", "/proc/device-tree/model"),
    )
    assert hw.libraries == frozenset()
    assert hw.has("rpi-gpu")
    assert not hw.has("edgetpu-usb")


def test_pi4_with_coral_usb_selects_coral_usb(tmp_path, profiles):
    # An unprogrammed stick (before libedgetpu uploads firmware) still counts.
    tree = {
        **PI4,
        "sys/bus/usb/devices/2-2/idVendor": "1a6e\n",
        "sys/bus/usb/devices/2-2/idProduct": "089a\n",
    }
    hw = detect(make_root(tmp_path, tree))
    coral = [a for a in hw.accelerators if a.kind == "edgetpu-usb"]
    assert coral == [
        Accelerator(
            "edgetpu-usb", "Coral Edge TPU (USB, 1a6e:089a, not yet programmed)", "/sys/bus/usb/devices/2-2"
        )
    ]
    choice = select_profile(hw, load_profiles())
    assert choice.profile.name == "coral-usb"
    assert choice.reason == "matched: accelerator edgetpu-usb"
    assert choice.profile.runtimes["tflite"][0] == DelegateSpec(
        "edgetpu", "libedgetpu.so.1", {"device": "usb"}
    )
    assert choice.profile.runtimes["tflite"][-1].name == "xnnpack"


def test_jetson_orin_facts(tmp_path):
    hw = detect(make_root(tmp_path, JETSON_ORIN))
    assert hw.board == "NVIDIA Jetson Orin Nano Developer Kit"
    assert hw.cpu_model == "ARM Cortex-A78AE"
    assert hw.cpu_count == 6
    assert [a.kind for a in hw.accelerators] == ["jetson-gpu"]  # /dev/nvidia0 is not a dGPU here
    jetson = hw.accelerators[0]
    assert jetson.name == "NVIDIA Jetson GPU (Orin, Ampere; L4T R36.3.0, JetPack 6)"
    assert (hw.soc, hw.soc_source) == ("nvidia,tegra234", "board name contains 'orin'")
    assert jetson.evidence == "/etc/nv_tegra_release, /proc/device-tree/model, /dev/nvgpu"
    assert hw.libraries == {"libnvinfer.so.10", "libtensorflowlite_gpu_delegate.so"}


def test_x86_nvidia_facts(tmp_path):
    hw = detect(make_root(tmp_path, X86_NVIDIA))
    assert hw.board == "Precision 3660"
    assert hw.cpu_model == "12th Gen Intel(R) Core(TM) i7-12700"
    assert hw.cpu_count == 16
    assert "avx2" in hw.cpu_flags
    assert hw.accelerators == (
        Accelerator("nvidia-gpu", "NVIDIA GPU (/dev/nvidia0, driver 550.54.14)", "/dev/nvidia0"),
    )
    assert hw.libraries == {"libnvinfer.so.10", "libcudart.so.12"}


def test_x86_openvino_facts(tmp_path):
    hw = detect(make_root(tmp_path, X86_OPENVINO))
    assert hw.accelerators == (
        Accelerator("intel-gpu", "Intel GPU (renderD128, 0x9a49)", "/sys/class/drm/renderD128/device/vendor"),
    )
    assert hw.libraries == {"libopenvino.so.2440"}
    onnx = select_profile(hw, load_profiles()).profile.runtimes["onnx"]
    assert [(d.name, dict(d.options)) for d in onnx] == [
        ("OpenVINOExecutionProvider", {"device_type": "GPU", "precision": "FP16"}),
        ("OpenVINOExecutionProvider", {"device_type": "CPU"}),
        ("CPUExecutionProvider", {}),
    ]


def test_amd_render_node_is_an_amd_gpu_not_intel(tmp_path):
    hw = detect(make_root(tmp_path, {**X86, "sys/class/drm/renderD128/device/vendor": "0x1002\n"}))
    assert [(a.kind, a.name) for a in hw.accelerators] == [("amd-gpu", "AMD GPU (renderD128)")]


def test_to_dict_is_json_ready(tmp_path):
    data = detect(make_root(tmp_path, CORAL_PCIE)).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["accelerators"] == [
        {"kind": "edgetpu-pcie", "name": "Coral Edge TPU (PCIe, /dev/apex_0)", "evidence": "/dev/apex_0"}
    ]
    assert data["libraries"] == ["libedgetpu.so.1.0"]
    assert data["cpu_count"] == 8


def test_arch_file_only_x86_selects_x86_cpu(tmp_path, profiles):
    hw = detect(make_root(tmp_path, {"proc/sys/kernel/arch": "x86_64\n"}))
    assert hw.board is None
    assert hw.cpu_model is None
    assert hw.cpu_flags == frozenset()
    assert hw.accelerators == ()
    assert hw.cpu_count == (os.cpu_count() or 1)
    assert select_profile(hw, profiles).profile.name == "x86-cpu"


def test_arch_file_only_aarch64_selects_generic_cpu(tmp_path, profiles):
    hw = detect(make_root(tmp_path, {"proc/sys/kernel/arch": "aarch64\n"}))
    choice = select_profile(hw, profiles)
    assert choice.profile.name == "generic-cpu"
    assert choice.reason == "matched: no match rules (matches any device)"


def test_arch_of_another_devices_tree_is_never_this_machines(tmp_path):
    hw = detect(tmp_path)
    assert (hw.arch, hw.kernel_arch, hw.userspace_arch) == ("unknown", None, None)
    assert any("architecture unknown" in n for n in hw.notes)


def test_arch_of_this_machine_is_what_its_kernel_says():
    hw = detect("/")
    assert hw.arch == hw.kernel_arch == platform.machine()
    assert hw.arch_source in ("/proc/sys/kernel/arch", "uname")


def test_unreadable_files_are_absent_facts(tmp_path):
    # Tests run as root, so chmod 000 would not stop reads: a directory where a file is expected does.
    tree: Tree = {
        "proc/sys/kernel/arch": "aarch64\n",
        "proc/cpuinfo/x": "",
        "proc/device-tree/model/x": "",
        "sys/firmware/devicetree/base/model/x": "",
        "sys/class/dmi/id/product_name/x": "",
        "etc/nv_tegra_release/x": "",
        "proc/driver/nvidia/version/x": "",
        "sys/bus/usb/devices/1-1/idVendor/x": "",
        "sys/bus/usb/devices/1-1/idProduct": "9302\n",
        "sys/bus/usb/devices/usb1": "not a directory",
        "sys/class/drm/renderD128/device/vendor/x": "",
        "usr/lib/x86_64-linux-gnu": "not a directory",
        "usr/lib/libedgetpu.so.1/x": "",  # a directory is not a library
    }
    hw = detect(make_root(tmp_path, tree))
    assert hw.arch == "aarch64"
    assert hw.board is None
    assert hw.cpu_model is None
    assert hw.cpu_count == (os.cpu_count() or 1)
    # a directory at etc/nv_tegra_release is not a release file: no Jetson
    assert hw.accelerators == ()
    assert hw.libraries == frozenset()


def test_binary_garbage_in_model_file_is_no_board(tmp_path):
    hw = detect(make_root(tmp_path, {"proc/device-tree/model": b"\xff\xfeBoard\x00"}))
    assert hw.board is None
    assert any(n.startswith("/proc/device-tree/model: not a plausible name") for n in hw.notes)


def test_broken_library_symlink_is_not_a_library(tmp_path):
    lib_dir = tmp_path / "usr/lib"
    lib_dir.mkdir(parents=True)
    (lib_dir / "libedgetpu.so.1").symlink_to("libedgetpu.so.1.0")  # target missing
    assert detect(tmp_path).libraries == frozenset()


def test_nonexistent_root_raises(tmp_path):
    with pytest.raises(HardwareError, match="does not exist"):
        detect(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(HardwareError):
        detect(tmp_path / "file")


def test_real_machine():
    hw = detect("/")
    assert isinstance(hw, HardwareInfo)
    assert hw.root == "/"
    assert hw.arch == "x86_64"
    assert hw.cpu_count >= 1
    assert {a.kind for a in hw.accelerators} <= ACCELERATOR_KINDS


# --- profiles --------------------------------------------------------------------------------------


EXPECTED_PROFILES = {
    "aarch64-nvidia",
    "coral-pcie",
    "coral-usb",
    "generic-cpu",
    "jetson",
    "jetson-nano",
    "jetson-orin",
    "jetson-thor",
    "jetson-xavier",
    "raspberry-pi-3",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "raspberry-pi-5-hailo",
    "rockchip-npu",
    "rockchip-rk3588",
    "x86-cpu",
    "x86-nvidia",
    "x86-openvino",
    "x86-openvino-npu",
}


def test_packaged_profiles_load_and_end_with_cpu(profiles):
    assert {p.name for p in profiles} == EXPECTED_PROFILES
    for p in profiles:
        assert set(p.runtimes) == {"onnx", "tflite", "hef", "rknn"}, p.name
        assert p.runtimes["onnx"][-1] == DelegateSpec("CPUExecutionProvider"), p.name
        assert p.runtimes["tflite"][-1] == DelegateSpec("xnnpack"), p.name
        assert p.source.endswith(f"{p.name}.toml")
        assert p.description
    by_name = {p.name: p for p in profiles}
    assert by_name["raspberry-pi-4"].threads == 4
    assert by_name["jetson-orin"].threads is None
    assert min(profiles, key=lambda p: p.priority).name == "generic-cpu"
    # Coral must beat every board profile it can be plugged into.
    boards = ["raspberry-pi-3", "raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-xavier", "jetson-orin",
              "jetson-thor", "jetson", "rockchip-rk3588", "rockchip-npu", "x86-cpu", "x86-nvidia", "aarch64-nvidia",
              "x86-openvino", "x86-openvino-npu"]
    for coral in ("coral-usb", "coral-pcie"):
        assert all(by_name[coral].priority > by_name[b].priority for b in boards)
    assert [(d.name, dict(d.options)) for d in by_name["jetson-orin"].runtimes["onnx"]] == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
        ("CUDAExecutionProvider", {}),
        ("CPUExecutionProvider", {}),
    ]
    assert by_name["jetson-orin"].runtimes["tflite"][0].library == "libtensorflowlite_gpu_delegate.so"


def test_jetson_nano_profile_does_not_match_orin_nano(tmp_path, profiles):
    hw = detect(make_root(tmp_path, JETSON_ORIN))
    nano = next(p for p in profiles if p.name == "jetson-nano")
    matched, reasons = nano.match(hw)
    assert not matched
    assert reasons == [
        "arch aarch64",
        "soc 'nvidia,tegra234' matches none of ['nvidia,tegra210']",
        "accelerator jetson-gpu",
    ]


def test_forced_profile(tmp_path, profiles):
    hw = detect(make_root(tmp_path, X86))
    choice = select_profile(hw, profiles, name="jetson-orin")
    assert choice.profile.name == "jetson-orin"
    assert choice.reason == "forced by config agent.profile"
    assert select_profile(hw, profiles, name="auto").profile.name == "x86-cpu"


def test_forced_unknown_profile_raises(tmp_path, profiles):
    hw = detect(make_root(tmp_path, X86))
    with pytest.raises(ConfigError) as err:
        select_profile(hw, profiles, name="jetson-tx9")
    assert err.value.key == "agent.profile"
    assert "agent.profile" in str(err.value)
    assert "jetson-tx9" in str(err.value)
    assert "raspberry-pi-4" in str(err.value)


def test_nothing_matches_uses_builtin_generic_cpu(tmp_path):
    hw = detect(make_root(tmp_path, PI4))
    only_x86 = [p for p in load_profiles() if p.name == "x86-cpu"]
    choice = select_profile(hw, only_x86)
    assert choice.profile.name == "generic-cpu"
    assert choice.profile.source == "<built-in>"
    assert choice.reason == "no profile matched; using generic-cpu"
    assert [d.name for d in choice.profile.runtimes["onnx"]] == ["CPUExecutionProvider"]


def test_equal_priority_tie_breaks_by_name(tmp_path):
    for name in ("b-second", "a-first"):
        (tmp_path / f"{name}.toml").write_text('description = "x"\npriority = 5\n')
    hw = detect(make_root(tmp_path / "root", X86))
    assert select_profile(hw, load_profiles(tmp_path)).profile.name == "a-first"


def test_custom_profile_cpu_added_and_options_parsed(tmp_path):
    (tmp_path / "board.toml").write_text(
        'description = "custom"\npriority = 7\nthreads = 2\n'
        '[match]\narch = ["x86_64"]\ncpu_flags_all = ["avx2", "fma"]\nlibraries_any = ["libhailort.so*"]\n'
        '[[runtimes.tflite]]\nname = "external"\nlibrary = "libfoo.so"\noptions = { a = 1 }\n'
    )
    (tmp_path / "notes.txt").write_text("not a profile")
    [profile] = load_profiles(tmp_path)
    assert profile.name == "board"
    assert profile.threads == 2
    assert profile.runtimes["tflite"] == (
        DelegateSpec("external", "libfoo.so", {"a": 1}),
        DelegateSpec("xnnpack"),
    )
    assert profile.runtimes["onnx"] == (DelegateSpec("CPUExecutionProvider"),)
    hw = detect(make_root(tmp_path / "root", {**X86, "usr/local/lib/libhailort.so.4.20.0": ""}))
    assert profile.match(hw) == (True, ["arch x86_64", "library libhailort.so.4.20.0", "cpu flags avx2 fma"])
    hw = detect(make_root(tmp_path / "root2", {"proc/sys/kernel/arch": "x86_64"}))
    assert profile.match(hw) == (
        False,
        ["arch x86_64", "no library ['libhailort.so*']", "cpu flags missing ['avx2', 'fma']"],
    )


GOOD_HEAD = 'description = "x"\npriority = 1\n'


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('description = "x"\npriority = "high\n', "priority", "invalid TOML"),
        ('description = "x"\npriority = 1\n[match]\narch = [x86_64]\n', "match.arch", "invalid TOML"),
        ('description = "x"\npriority = "high"\n', "priority", "must be an integer"),
        ('description = "x"\npriority = true\n', "priority", "must be an integer"),
        ("priority = 1\n", "description", "non-empty string"),
        (GOOD_HEAD + "threads = 0\n", "threads", "positive integer"),
        (GOOD_HEAD + "colour = 1\n", "colour", "unknown key"),
        (GOOD_HEAD + '[[runtimes.pytorch]]\nname = "x"\n', "runtimes.pytorch", "unknown runtime"),
        (GOOD_HEAD + '[match]\nboard = ["x"]\n', "match.board", "unknown match rule"),
        (GOOD_HEAD + '[match]\narch = "x86_64"\n', "match.arch", "list of non-empty strings"),
        (
            GOOD_HEAD + '[match]\naccelerators_any = ["tpu"]\n',
            "match.accelerators_any",
            "unknown accelerator",
        ),
        (GOOD_HEAD + '[match]\nlibraries_any = ["libfoo.so*"]\n', "match.libraries_any", "never detected"),
        (GOOD_HEAD + '[[runtimes.onnx]]\nname = "CUDA"\n', "runtimes.onnx[0].name", "execution provider"),
        (GOOD_HEAD + '[[runtimes.tflite]]\nname = "nnapi"\n', "runtimes.tflite[0].name", "unknown delegate"),
        (
            GOOD_HEAD + '[[runtimes.tflite]]\nname = "external"\n',
            "runtimes.tflite[0].library",
            "needs a library",
        ),
        (
            GOOD_HEAD + '[[runtimes.tflite]]\nname = "gpu"\nlibrary = "l.so"\noptions = 3\n',
            "runtimes.tflite[0].options",
            "must be a table",
        ),
        (
            GOOD_HEAD
            + '[[runtimes.onnx]]\nname = "CPUExecutionProvider"\n'
            + '[[runtimes.onnx]]\nname = "CUDAExecutionProvider"\n',
            "runtimes.onnx[0].name",
            "must be last",
        ),
        (GOOD_HEAD + 'runtimes = { onnx = "CPU" }\n', "runtimes.onnx", "array of tables"),
        ('description = ""\npriority = 1\n', "description", "non-empty string"),
        (GOOD_HEAD + "threads = 2.5\n", "threads", "positive integer"),
        (GOOD_HEAD + "match = 3\n", "match", "must be a table"),
        (GOOD_HEAD + '[match]\narch = ["x86_64", ""]\n', "match.arch[1]", "list of non-empty strings"),
        (GOOD_HEAD + "[runtimes]\nonnx = { name = \"CPUExecutionProvider\" }\n", "runtimes.onnx", "array of tables"),
        (GOOD_HEAD + "[[runtimes.tflite]]\nname = 3\n", "runtimes.tflite[0].name", "non-empty string"),
        (
            GOOD_HEAD + '[[runtimes.onnx]]\nname = "CUDAExecutionProvider"\n'
            + '[[runtimes.onnx]]\nname = "CPUExecutionProvider"\nprovider_options = {}\n',
            "runtimes.onnx[1].provider_options",
            "unknown key (allowed: library, name, options)",
        ),
        # HailoRT is not a LiteRT delegate: the profile that said so must be fixed, not silently run on XNNPACK
        (
            GOOD_HEAD + '[[runtimes.tflite]]\nname = "hailo"\nlibrary = "libhailort.so"\n',
            "runtimes.tflite[0].name",
            "not a LiteRT delegate: HailoRT runs compiled .hef models",
        ),
        (GOOD_HEAD + '[match]\nsoc_any = ["tegra234"]\n', "match.soc_any", "not a device-tree SoC name"),
        (GOOD_HEAD + '[[runtimes.hef]]\nname = "hailo8"\n', "runtimes.hef[0].name", "must be 'hailo'"),
        (
            GOOD_HEAD + '[[runtimes.hef]]\nname = "hailo"\noptions = { speed = 1 }\n',
            "runtimes.hef[0].options.speed",
            "unknown option (allowed: batch_size, scheduling, timeout_ms)",
        ),
        (
            GOOD_HEAD + '[[runtimes.hef]]\nname = "hailo"\nlibrary = "libhailort.so"\n',
            "runtimes.hef[0].library",
            "must be left out",
        ),
        (
            GOOD_HEAD + '[[runtimes.rknn]]\nname = "npu"\noptions = { core_mask = "3" }\n',
            "runtimes.rknn[0].options.core_mask",
            "must be one of 'auto', '0', '1', '2', '0_1', '0_1_2', 'all'",
        ),
        (GOOD_HEAD + '[[runtimes.coreml]]\nname = "x"\n', "runtimes.coreml", "allowed: onnx, tflite, hef, rknn"),
    ],
)
def test_bad_profile_raises_config_error(tmp_path, text, key, fragment):
    bad = tmp_path / "broken-board.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_profiles(tmp_path)
    assert err.value.file == str(bad)
    assert err.value.key == key
    message = str(err.value)
    assert str(bad) in message
    assert f"key '{key}'" in message
    assert fragment in message


def test_missing_profile_directory_raises(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profiles(tmp_path / "nope")


def test_profile_to_dict_is_json_ready(profiles):
    data = next(p for p in profiles if p.name == "coral-usb").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["runtimes"]["tflite"][0] == {
        "name": "edgetpu",
        "library": "libedgetpu.so.1",
        "options": {"device": "usb"},
    }


def test_npu_runtime_entries_and_defaults(tmp_path):
    (tmp_path / "board.toml").write_text(
        GOOD_HEAD + '[[runtimes.rknn]]\nname = "npu"\noptions = { core_mask = "0_1_2" }\n'
        '[[runtimes.hef]]\nname = "hailo"\noptions = { scheduling = "none", batch_size = 4 }\n'
    )
    [profile] = load_profiles(tmp_path)
    assert profile.runtimes["rknn"] == (DelegateSpec("npu", None, {"core_mask": "0_1_2"}),)  # no CPU appended
    assert profile.runtimes["hef"] == (
        DelegateSpec("hailo", None, {"scheduling": "none", "batch_size": 4, "timeout_ms": 10000}),
    )
    (tmp_path / "board.toml").write_text(GOOD_HEAD)
    [profile] = load_profiles(tmp_path)
    assert profile.runtimes["rknn"] == (DelegateSpec("npu"),) and profile.runtimes["hef"] == (DelegateSpec("hailo"),)


def test_soc_rule_globs(tmp_path):
    (tmp_path / "rk.toml").write_text(GOOD_HEAD + '[match]\nsoc_any = ["rockchip,rk3588*"]\n')
    [profile] = load_profiles(tmp_path)
    hw = detect(make_root(tmp_path / "root", {"proc/device-tree/compatible": "xunlong,orangepi-5\0rockchip,rk3588s\0"}))
    assert (hw.soc, hw.soc_source) == ("rockchip,rk3588s", "/proc/device-tree/compatible")
    assert profile.match(hw) == (True, ["soc rockchip,rk3588s"])
    hw = detect(make_root(tmp_path / "root2", {"proc": None}))
    assert profile.match(hw) == (False, ["soc None matches none of ['rockchip,rk3588*']"])


# --- the plan: which accelerator each model format uses, on the device itself -----------------


def test_plan_on_the_device_uses_the_runtimes_own_probes(tmp_path, profiles):
    from agent.hardware.plan import plan

    hw = detect(make_root(tmp_path, PI5_HAILO))
    choice = select_profile(hw, profiles)
    missing = "the Python package hailo_platform (HailoRT) is not importable (ModuleNotFoundError)"
    probes = {"onnx": lambda s: None, "tflite": lambda s: None, "hef": lambda s: missing, "rknn": lambda s: None}
    result = plan(hw, choice, profiles, probes)
    hef = next(f for f in result.formats if f.runtime == "hef")
    assert (hef.delegate, hef.skipped) == (None, (f"hailo: {missing}",))
    hailo = next(v for v in result.accelerators if v.accelerator.kind == "hailo")
    assert not hailo.used
    assert hailo.reason == f"profile raspberry-pi-5-hailo would use it, but: hailo: {missing}"
    # without probes (a tree from another device) the same tree predicts HailoRT and names the package
    predicted = next(v for v in plan(hw, choice, profiles).accelerators if v.accelerator.kind == "hailo")
    assert predicted.used and "needs the Python package hailo_platform" in predicted.reason


def test_detect_with_the_configured_root_checks_this_devices_runtimes(tmp_path):
    """``agent.hardware_root`` is this device's own tree (``/``, or the host's mounted in a container)."""
    import subprocess
    import sys

    root = make_root(tmp_path / "host", PI5_HAILO)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nhardware_root = "{root}"\n')
    out = subprocess.run([sys.executable, "-m", "agent.cli", "detect", "--config", str(config), "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["plan_checked_by"], report["runtimes_checked_on"]) == ("the runtimes on this device", "this device")
    hailo = next(a for a in report["accelerators"] if a["kind"] == "hailo")
    assert not hailo["used"] and "hailo_platform" in hailo["reason"]
