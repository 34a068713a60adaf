"""Real boards: the files each exposes that detection reads, and what ``edge-agent detect --root`` must say.

Written from what these devices and OS images expose (Linux < 6.1 has no /proc/sys/kernel/arch,
so most trees lack it, as the devices do). Values that do not affect detection (serial numbers,
BogoMIPS, dates) are representative, not copied from one unit.
"""

from __future__ import annotations

from tests.hardware_corpus import (
    A78_FEATURES,
    ARMHF_FEATURES,
    X86_FLAGS,
    Board,
    Dir,
    Link,
    Tree,
    arm_cpuinfo,
    cuda,
    device_tree,
    dmi,
    kernel_arch,
    libs,
    merge,
    nvidia_driver,
    pci,
    render_node,
    usb,
    userland,
    x86_cpuinfo,
)

CPU_ONLY = {".onnx": "CPUExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None}
X86_FLAGS_VM = X86_FLAGS + " hypervisor"
CARMEL_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm dcpop"
RK3588_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
ARM = "0x41"
NV = "0x4e"
PI_TAIL = "Hardware\t: BCM2835\nRevision\t: {rev}\nSerial\t\t: 100000001a2b3c4d\nModel\t\t: {model}\n"


def pi(model: str, compatible: str, soc: str, rev: str, part: str, *, kernel: str | None, user: str,
       features: str = "fp asimd evtstrm crc32 cpuid", model_name: str | None = None, architecture: str = "8",
       cores: int = 4, hub: bool = False) -> Tree:
    """A Raspberry Pi: device tree, cpuinfo with the Pi's trailer, the userland's /bin/sh."""
    tail = PI_TAIL.format(rev=rev, model=model)
    return merge(
        kernel_arch(kernel) if kernel else {},
        device_tree(model, compatible, soc),
        {"proc/cpuinfo": arm_cpuinfo([(cores, ARM, part)], features=features, model_name=model_name,
                                     architecture=architecture, tail=tail)},
        userland(user),
        # The VL805 USB 3 hub of a Pi 4: a USB device that is not a Coral.
        usb("1-1", "2109", "3431") if hub else {},
    )


def jetson_release(major: int, revision: str, board: str = "generic") -> Tree:
    return {"etc/nv_tegra_release": f"# R{major} (release), REVISION: {revision}, GCID: 36923193, BOARD: {board}, "
                                    "EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024\n"}


NANO_CPUINFO = arm_cpuinfo([(4, ARM, "0xd07")], features="fp asimd evtstrm aes pmull sha1 sha2 crc32",
                           model_name="ARMv8 Processor rev 1 (v8l)")
JETSON_NANO = merge(
    device_tree("NVIDIA Jetson Nano Developer Kit", "nvidia,p3450-0000", "nvidia,jetson-nano", "nvidia,tegra210"),
    jetson_release(32, "7.4", "t210ref"),
    {"proc/cpuinfo": NANO_CPUINFO, "dev/nvhost-ctrl-gpu": "", "dev/nvhost-gpu": ""},
    libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.8=libnvinfer.so.8.2.1", "libnvinfer.so.8.2.1"),
    cuda("10.2", runtime="10.2.89"),
    userland("aarch64"),
)
ORIN_NANO_JP6 = merge(
    device_tree("NVIDIA Jetson Orin Nano Developer Kit", "nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005",
                "nvidia,tegra234"),
    jetson_release(36, "3.0"),
    {"proc/cpuinfo": arm_cpuinfo([(6, ARM, "0xd42")], features=A78_FEATURES), "dev/nvgpu/igpu0/ctrl": ""},
    # JetPack 6 drives the display with NVIDIA's OpenRM module: /dev/nvidia0 is not a discrete GPU.
    nvidia_driver("NVIDIA UNIX Open Kernel Module for aarch64  540.3.0  Release Build  "
                  "(buildbrain@mobile-u64-6336-d8000)  Tue Jan  9 17:33:38 PST 2024"),
    {"dev/nvidia0": ""},
    libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.8=libnvinfer.so.8.6.2", "libnvinfer.so.8.6.2"),
    cuda("12.2"),
    userland("aarch64"),
)
NUC11_CPUINFO = x86_cpuinfo(8, "11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz",
                            flags="fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush "
                                  "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc "
                                  "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand avx2 avx512f "
                                  "avx512dq avx512vl avx512_vnni")
NUC11 = merge(
    dmi("Intel(R) Client Systems", "NUC11TNHi5"),
    {"proc/cpuinfo": NUC11_CPUINFO},
    pci("0000:00:02.0", "0x8086", "0x9a49", "0x030000", "i915"),
    render_node(128, vendor="0x8086", device="0x9a49", pci_address="0000:00:02.0"),
    userland("x86_64"),
)
MTL_CPUINFO = x86_cpuinfo(18, "Intel(R) Core(TM) Ultra 5 125H")
RTX_DESKTOP = merge(
    kernel_arch("x86_64"),
    dmi("Micro-Star International Co., Ltd.", "MS-7D25"),
    {"proc/cpuinfo": x86_cpuinfo(20, "12th Gen Intel(R) Core(TM) i7-12700")},
    pci("0000:00:02.0", "0x8086", "0x4690", "0x030000", "i915"),
    render_node(128, vendor="0x8086", device="0x4690", pci_address="0000:00:02.0"),
    userland("x86_64"),
)
PI5 = pi("Raspberry Pi 5 Model B Rev 1.0", "raspberrypi,5-model-b", "brcm,bcm2712", "d04170", "0xd0b",
         kernel="aarch64", user="aarch64")
PI4_BULLSEYE = pi("Raspberry Pi 4 Model B Rev 1.4", "raspberrypi,4-model-b", "brcm,bcm2711", "c03114", "0xd08",
                  kernel=None, user="aarch64", hub=True)

BOARDS: list[Board] = [
    # --- Raspberry Pi ---------------------------------------------------------------------------
    Board(
        "pi4-bookworm-64", "Raspberry Pi 4 Model B 4 GB, Raspberry Pi OS Bookworm 64-bit (kernel 6.6)",
        pi("Raspberry Pi 4 Model B Rev 1.5", "raspberrypi,4-model-b", "brcm,bcm2711", "d03115", "0xd08",
           kernel="aarch64", user="aarch64", hub=True),
        "Raspberry Pi 4 Model B Rev 1.5", "aarch64", "raspberry-pi-4",
        "matched: arch aarch64; board contains 'Raspberry Pi 4'", CPU_ONLY,
        {"rpi-gpu": (False, "VideoCore has no usable ML delegate")}, cpu_model="ARM Cortex-A72", soc="brcm,bcm2711",
    ),
    Board(
        "pi4-bookworm-32-on-64", "Raspberry Pi 4 Model B, Raspberry Pi OS Bookworm 32-bit (armhf userland, "
        "64-bit kernel 6.6: arm_64bit=1 is the default on a Pi 4)",
        pi("Raspberry Pi 4 Model B Rev 1.4", "raspberrypi,4-model-b", "brcm,bcm2711", "c03114", "0xd08",
           kernel="aarch64", user="arm", hub=True),
        "Raspberry Pi 4 Model B Rev 1.4", "aarch64", "raspberry-pi-4",
        "matched: arch aarch64; board contains 'Raspberry Pi 4'", CPU_ONLY,
        {"rpi-gpu": (False, "informational")}, notes=("32-bit userland (arm) on a 64-bit kernel (aarch64)",),
    ),
    Board(
        "cm4-bullseye-64", "Raspberry Pi Compute Module 4 on the CM4 IO board, Raspberry Pi OS Bullseye 64-bit "
        "(kernel 5.15: no /proc/sys/kernel/arch)",
        pi("Raspberry Pi Compute Module 4 Rev 1.0", "raspberrypi,4-compute-module", "brcm,bcm2711", "b03140",
           "0xd08", kernel=None, user="aarch64"),
        "Raspberry Pi Compute Module 4 Rev 1.0", "aarch64", "raspberry-pi-4",
        "matched: arch aarch64; board contains 'Raspberry Pi Compute Module 4'", CPU_ONLY,
        {"rpi-gpu": (False, "informational")},
    ),
    Board(
        "pi3bplus-bullseye-32", "Raspberry Pi 3 Model B+, Raspberry Pi OS Bullseye 32-bit (32-bit kernel 5.15)",
        pi("Raspberry Pi 3 Model B Plus Rev 1.3", "raspberrypi,3-model-b-plus", "brcm,bcm2837", "a020d3", "0xd03",
           kernel=None, user="arm", features=ARMHF_FEATURES, model_name="ARMv7 Processor rev 4 (v7l)",
           architecture="7"),
        "Raspberry Pi 3 Model B Plus Rev 1.3", "armv7l", "raspberry-pi-3",
        "matched: arch armv7l; board contains 'Raspberry Pi 3'", CPU_ONLY,
        {"rpi-gpu": (False, "informational")}, cpu_model="ARM Cortex-A53",
    ),
    Board(
        "pizero2w-bookworm-32", "Raspberry Pi Zero 2 W, Raspberry Pi OS Bookworm Lite 32-bit (32-bit kernel 6.6)",
        pi("Raspberry Pi Zero 2 W Rev 1.0", "raspberrypi,model-zero-2-w", "brcm,bcm2837", "902120", "0xd03",
           kernel="armv7l", user="arm", features=ARMHF_FEATURES, model_name="ARMv7 Processor rev 4 (v7l)",
           architecture="7"),
        "Raspberry Pi Zero 2 W Rev 1.0", "armv7l", "raspberry-pi-3",
        "matched: arch armv7l; board contains 'Raspberry Pi Zero 2'", CPU_ONLY,
        {"rpi-gpu": (False, "informational")},
    ),
    Board(
        "pizerow-bullseye-32", "Raspberry Pi Zero W (ARMv6, BCM2835), Raspberry Pi OS Bullseye 32-bit (kernel 5.15)",
        pi("Raspberry Pi Zero W Rev 1.1", "raspberrypi,model-zero-w", "brcm,bcm2835", "9000c1", "0xb76",
           kernel=None, user="arm", features="half thumb fastmult vfp edsp java tls",
           model_name="ARMv6-compatible processor rev 7 (v6l)", architecture="7", cores=1),
        "Raspberry Pi Zero W Rev 1.1", "armv6l", "generic-cpu",
        "matched: no match rules (matches any device)", CPU_ONLY,
        {"rpi-gpu": (False, "informational")}, cpu_model="ARM ARM1176",
    ),
    Board(
        "pi4-coral-usb-unprogrammed", "Raspberry Pi 4 with a Coral USB Accelerator before its first use "
        "(1a6e:089a), Bullseye 64-bit (kernel 5.15), libedgetpu1-std",
        merge(PI4_BULLSEYE, usb("2-2", "1a6e", "089a"),
              libs("usr/lib/aarch64-linux-gnu", "libedgetpu.so.1=libedgetpu.so.1.0", "libedgetpu.so.1.0")),
        "Raspberry Pi 4 Model B Rev 1.4", "aarch64", "coral-usb", "matched: accelerator edgetpu-usb",
        {**CPU_ONLY, ".tflite": "edgetpu (usb)"},
        {"edgetpu-usb": (True, "used for .tflite models by tflite: edgetpu (usb)"),
         "rpi-gpu": (False, "informational")},
    ),
    Board(
        "pi5-bookworm", "Raspberry Pi 5 8 GB, Raspberry Pi OS Bookworm 64-bit (kernel 6.6)",
        PI5, "Raspberry Pi 5 Model B Rev 1.0", "aarch64", "raspberry-pi-5",
        "matched: arch aarch64; board contains 'Raspberry Pi 5'", CPU_ONLY,
        {"rpi-gpu": (False, "informational")}, cpu_model="ARM Cortex-A76",
    ),
    Board(
        "pi5-ai-kit-hailo8l", "Raspberry Pi 5 with the AI Kit (Hailo-8L M.2), Bookworm, hailo-all 4.20",
        merge(PI5, pci("0001:01:00.0", "0x1e60", "0x2864", "0x120000", "hailo"), {"dev/hailo0": ""},
              libs("usr/lib", "libhailort.so.4.20.0")),
        "Raspberry Pi 5 Model B Rev 1.0", "aarch64", "raspberry-pi-5-hailo",
        "matched: arch aarch64; board contains 'Raspberry Pi 5'; accelerator hailo",
        {**CPU_ONLY, ".hef": "hailo"},
        {"hailo": (True, "used for .hef models by hef: hailo; .hef models compiled by Hailo's Dataflow Compiler"),
         "rpi-gpu": (False, "informational")},
    ),
    Board(
        "pi5-ai-hat-no-driver", "Raspberry Pi 5 with the AI HAT+ (Hailo-8) after a kernel update the hailo_pci "
        "module was not rebuilt for: the PCI function is there, /dev/hailo0 is not",
        merge(PI5, pci("0001:01:00.0", "0x1e60", "0x2864", "0x120000")),
        "Raspberry Pi 5 Model B Rev 1.0", "aarch64", "raspberry-pi-5",
        "matched: arch aarch64; board contains 'Raspberry Pi 5'", CPU_ONLY,
        {"hailo": (False, "not usable: no /dev/hailo0: the hailo_pci driver is not loaded"),
         "rpi-gpu": (False, "informational")},
    ),
    Board(
        "pi5-coral-m2-pcie", "Raspberry Pi 5 with a Coral M.2 Accelerator on a PCIe HAT, gasket-dkms, Bookworm",
        merge(PI5, pci("0001:01:00.0", "0x1ac1", "0x089a", "0x088000", "apex"), {"dev/apex_0": ""},
              libs("usr/lib/aarch64-linux-gnu", "libedgetpu.so.1=libedgetpu.so.1.0", "libedgetpu.so.1.0")),
        "Raspberry Pi 5 Model B Rev 1.0", "aarch64", "coral-pcie", "matched: accelerator edgetpu-pcie",
        {**CPU_ONLY, ".tflite": "edgetpu (pci)"},
        {"edgetpu-pcie": (True, "only *_edgetpu.tflite models"), "rpi-gpu": (False, "informational")},
    ),
    # --- NVIDIA Jetson: every generation, JetPack 4 to 7 ----------------------------------------
    Board(
        "jetson-nano-jp4", "Jetson Nano Developer Kit, JetPack 4.6.4 (L4T R32.7.4, kernel 4.9)",
        JETSON_NANO, "NVIDIA Jetson Nano Developer Kit", "aarch64", "jetson-nano",
        "matched: arch aarch64; soc nvidia,tegra210; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "used for .onnx models by onnx: TensorrtExecutionProvider")},
        cpu_model="ARM Cortex-A57", soc="nvidia,tegra210",
    ),
    Board(
        "jetson-nano-jp4-coral-usb", "Jetson Nano with a programmed Coral USB Accelerator (18d1:9302), JetPack 4.6",
        merge(JETSON_NANO, usb("1-2.1", "18d1", "9302"),
              libs("usr/lib/aarch64-linux-gnu", "libedgetpu.so.1=libedgetpu.so.1.0", "libedgetpu.so.1.0")),
        "NVIDIA Jetson Nano Developer Kit", "aarch64", "coral-usb", "matched: accelerator edgetpu-usb",
        {**CPU_ONLY, ".tflite": "edgetpu (usb)"},
        {"edgetpu-usb": (True, "tflite: edgetpu (usb)"),
         "jetson-gpu": (False, "profile coral-usb does not use it; profile jetson-nano would, but coral-usb has "
                               "the higher priority (40 > 20)")},
    ),
    Board(
        "jetson-tx2-jp4", "Jetson TX2 Developer Kit, JetPack 4.6.1 (L4T R32.7.1): 2x Denver2 + 4x Cortex-A57",
        merge(device_tree("quill", "nvidia,quill", "nvidia,tegra186"), jetson_release(32, "7.1", "t186ref"),
              {"proc/cpuinfo": arm_cpuinfo([(1, ARM, "0xd07"), (2, NV, "0x003"), (3, ARM, "0xd07")],
                                           features="fp asimd evtstrm aes pmull sha1 sha2 crc32",
                                           model_name="ARMv8 Processor rev 3 (v8l)"),
               "dev/nvhost-ctrl-gpu": ""},
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.8"), cuda("10.2", runtime="10.2.89")),
        "quill", "aarch64", "jetson", "matched: arch aarch64; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "onnx: TensorrtExecutionProvider")},
        cpu_model="4x ARM Cortex-A57 + 2x NVIDIA Denver", soc="nvidia,tegra186",
    ),
    Board(
        "jetson-agx-xavier-jp5", "Jetson AGX Xavier Developer Kit, JetPack 5.1.2 (L4T R35.4.1, kernel 5.10)",
        merge(device_tree("Jetson-AGX", "nvidia,p2972-0000", "nvidia,tegra194"), jetson_release(35, "4.1", "t186ref"),
              {"proc/cpuinfo": arm_cpuinfo([(8, NV, "0x004")], features=CARMEL_FEATURES), "dev/nvhost-ctrl-gpu": ""},
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.8=libnvinfer.so.8.5.2", "libnvinfer.so.8.5.2"),
              cuda("11.4"), userland("aarch64")),
        "Jetson-AGX", "aarch64", "jetson-xavier", "matched: arch aarch64; soc nvidia,tegra194; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "onnx: TensorrtExecutionProvider")}, cpu_model="NVIDIA Carmel", soc="nvidia,tegra194",
    ),
    Board(
        "jetson-xavier-nx-jp4", "Jetson Xavier NX Developer Kit, JetPack 4.6.1 (L4T R32.7.1)",
        merge(device_tree("NVIDIA Jetson Xavier NX Developer Kit", "nvidia,p3509-0000+p3668-0001", "nvidia,tegra194"),
              jetson_release(32, "7.1", "t186ref"),
              {"proc/cpuinfo": arm_cpuinfo([(6, NV, "0x004")], features="fp asimd evtstrm aes pmull sha1 sha2 crc32",
                                           model_name="ARMv8 Processor rev 0 (v8l)")},
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.8"), cuda("10.2", runtime="10.2.300")),
        "NVIDIA Jetson Xavier NX Developer Kit", "aarch64", "jetson-xavier",
        "matched: arch aarch64; soc nvidia,tegra194; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "onnx: TensorrtExecutionProvider")},
    ),
    Board(
        "jetson-orin-nano-jp6", "Jetson Orin Nano Developer Kit 8 GB, JetPack 6.0 (L4T R36.3.0, kernel 5.15, "
        "OpenRM display driver)",
        ORIN_NANO_JP6, "NVIDIA Jetson Orin Nano Developer Kit", "aarch64", "jetson-orin",
        "matched: arch aarch64; soc nvidia,tegra234; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "used for .onnx models by onnx: TensorrtExecutionProvider")},
        cpu_model="ARM Cortex-A78AE", soc="nvidia,tegra234",
    ),
    Board(
        "jetson-agx-orin-jp5-gpu-delegate", "Jetson AGX Orin 64 GB Developer Kit, JetPack 5.1.3 (L4T R35.5.0), "
        "with LiteRT's GPU delegate built into /usr/local/lib",
        merge(device_tree("Jetson AGX Orin Developer Kit", "nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005",
                          "nvidia,tegra234"),
              jetson_release(35, "5.0", "t186ref"),
              {"proc/cpuinfo": arm_cpuinfo([(12, ARM, "0xd42")], features=A78_FEATURES), "dev/nvhost-ctrl-gpu": ""},
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.8"), cuda("11.4"),
              libs("usr/local/lib", "libtensorflowlite_gpu_delegate.so")),
        "Jetson AGX Orin Developer Kit", "aarch64", "jetson-orin",
        "matched: arch aarch64; soc nvidia,tegra234; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "gpu", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "used for .onnx, .tflite models by onnx: TensorrtExecutionProvider, tflite: gpu")},
    ),
    Board(
        "jetson-orin-nx-container", "Jetson Orin NX 16 GB, the agent in an l4t-jetpack container: Docker masks "
        "/sys/firmware, so no device tree; /etc/nv_tegra_release and /sys/module are there",
        merge(jetson_release(36, "4.0"), {"sys/module/tegra_fuse/parameters/tegra_chip_id": "35\n",
                                          "proc/cpuinfo": arm_cpuinfo([(8, ARM, "0xd42")], features=A78_FEATURES),
                                          "proc/device-tree": Link("/sys/firmware/devicetree/base"),
                                          "sys/firmware": Dir()},
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.10"), cuda("12.6")),
        None, "aarch64", "jetson-orin", "matched: arch aarch64; soc nvidia,tegra234; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "onnx: TensorrtExecutionProvider")}, soc="nvidia,tegra234",
    ),
    Board(
        "jetson-agx-thor-jp7", "Jetson AGX Thor Developer Kit, JetPack 7.0 (L4T R38.2, kernel 6.8, CUDA 13, "
        "OpenRM driver)",
        merge(kernel_arch("aarch64"),
              device_tree("NVIDIA Jetson AGX Thor Developer Kit", "nvidia,p3971-0080+p3834-0008", "nvidia,p3834-0008",
                          "nvidia,tegra264"),
              jetson_release(38, "2.0"),
              {"proc/cpuinfo": arm_cpuinfo([(14, ARM, "0xd83")], features=A78_FEATURES)},
              nvidia_driver("NVIDIA UNIX Open Kernel Module for aarch64  580.00  Release Build"), {"dev/nvidia0": ""},
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.10"), cuda("13.0", "sbsa-linux", runtime="13"),
              userland("aarch64")),
        "NVIDIA Jetson AGX Thor Developer Kit", "aarch64", "jetson-thor",
        "matched: arch aarch64; soc nvidia,tegra264; accelerator jetson-gpu",
        {".onnx": "TensorrtExecutionProvider", ".tflite": "xnnpack", ".hef": None, ".rknn": None},
        {"jetson-gpu": (True, "onnx: TensorrtExecutionProvider")}, cpu_model="ARM Neoverse-V3AE",
    ),
    # --- Coral, Rockchip ------------------------------------------------------------------------
    Board(
        "coral-dev-board", "Coral Dev Board (i.MX 8M, Edge TPU on PCIe), Mendel Linux 5.3 Eagle (kernel 4.14)",
        merge(device_tree("Freescale i.MX8MQ Phanbell", "fsl,imx8mq-phanbell", "fsl,imx8mq"),
              {"proc/cpuinfo": arm_cpuinfo([(4, ARM, "0xd03")]), "dev/apex_0": ""},
              libs("usr/lib/aarch64-linux-gnu", "libedgetpu.so.1=libedgetpu.so.1.0", "libedgetpu.so.1.0"),
              userland("aarch64")),
        "Freescale i.MX8MQ Phanbell", "aarch64", "coral-pcie", "matched: accelerator edgetpu-pcie",
        {**CPU_ONLY, ".tflite": "edgetpu (pci)"}, {"edgetpu-pcie": (True, "tflite: edgetpu (pci)")},
        cpu_model="ARM Cortex-A53",
    ),
    Board(
        "rock5b-rk3588", "Radxa ROCK 5B (RK3588), Debian 11 with Radxa's BSP kernel 5.10, RKNPU driver 0.9.6, "
        "librknnrt 2.3",
        merge(device_tree("Radxa ROCK 5 Model B", "radxa,rock-5b", "rockchip,rk3588"),
              {"proc/cpuinfo": arm_cpuinfo([(4, ARM, "0xd05"), (4, ARM, "0xd0b")], features=RK3588_FEATURES),
               "sys/kernel/debug/rknpu/version": "RKNPU driver: v0.9.6\n"},
              render_node(129, platform_device="fdab0000.npu", driver="RKNPU",
                          uevent="DRIVER=RKNPU\nOF_NAME=npu\nOF_COMPATIBLE_0=rockchip,rk3588-rknpu\n"),
              libs("usr/lib", "librknnrt.so"), userland("aarch64")),
        "Radxa ROCK 5 Model B", "aarch64", "rockchip-rk3588", "matched: arch aarch64; soc rockchip,rk3588",
        {**CPU_ONLY, ".rknn": "npu (core_mask 0_1_2)"},
        {"rockchip-npu": (True, "used for .rknn models by rknn: npu (core_mask 0_1_2)")},
        cpu_model="4x ARM Cortex-A55 + 4x ARM Cortex-A76", soc="rockchip,rk3588",
    ),
    Board(
        "orangepi5-rk3588s-no-runtime", "Orange Pi 5 (RK3588S), Ubuntu 22.04 (BSP kernel 5.10), RKNPU driver "
        "loaded but librknnrt.so not installed",
        merge(device_tree("Orange Pi 5", "xunlong,orangepi-5", "rockchip,rk3588s"),
              {"proc/cpuinfo": arm_cpuinfo([(4, ARM, "0xd05"), (4, ARM, "0xd0b")], features=RK3588_FEATURES)},
              render_node(129, platform_device="fdab0000.npu", driver="RKNPU", uevent="DRIVER=RKNPU\n")),
        "Orange Pi 5", "aarch64", "rockchip-rk3588", "matched: arch aarch64; soc rockchip,rk3588s",
        CPU_ONLY,
        {"rockchip-npu": (False, "profile rockchip-rk3588 would use it, but: npu (core_mask 0_1_2): library "
                                 "librknnrt.so* (Rockchip's RKNN runtime) not found")},
    ),
    Board(
        "rock3a-rk3568", "Radxa ROCK 3A (RK3568, one NPU core), Debian 11 (BSP kernel 4.19, RKNPU as /dev/rknpu)",
        merge(device_tree("Radxa ROCK3 Model A", "radxa,rock3a", "rockchip,rk3568"),
              {"proc/cpuinfo": arm_cpuinfo([(4, ARM, "0xd05")]), "dev/rknpu": "",
               "proc/debug/rknpu/version": "RKNPU driver: v0.8.2\n"},
              libs("usr/lib", "librknnrt.so")),
        "Radxa ROCK3 Model A", "aarch64", "rockchip-npu", "matched: arch aarch64; accelerator rockchip-npu",
        {**CPU_ONLY, ".rknn": "npu (core_mask auto)"}, {"rockchip-npu": (True, "rknn: npu (core_mask auto)")},
    ),
    # --- x86: Intel iGPU and NPU, NVIDIA, AMD, NPUs on PCIe -------------------------------------
    Board(
        "nuc11-no-openvino", "Intel NUC 11 (i5-1135G7, Iris Xe), Ubuntu 22.04 (kernel 5.15), no OpenVINO",
        NUC11, "Intel(R) Client Systems NUC11TNHi5", "x86_64", "x86-cpu", "matched: arch x86_64", CPU_ONLY,
        {"intel-gpu": (False, "profile x86-cpu does not use it; profile x86-openvino would, but it does not match: "
                              "no library ['libopenvino.so*'] (OpenVINO: not installed)")},
        cpu_model="11th Gen Intel(R) Core(TM) i5-1135G7 @ 2.40GHz",
    ),
    Board(
        "nuc11-openvino", "Intel NUC 11, Ubuntu 22.04, OpenVINO 2024.4 archive in /opt/intel",
        merge(NUC11, libs("opt/intel/openvino_2024.4.0/runtime/lib/intel64", "libopenvino.so.2440")),
        "Intel(R) Client Systems NUC11TNHi5", "x86_64", "x86-openvino",
        "matched: arch x86_64; library libopenvino.so.2440; cpu flags sse4_2",
        {**CPU_ONLY, ".onnx": "OpenVINOExecutionProvider (GPU)"},
        {"intel-gpu": (True, "onnx: OpenVINOExecutionProvider (GPU)")},
    ),
    Board(
        "core-ultra-npu-openvino", "ASUS NUC 14 Pro (Core Ultra 5 125H: Arc iGPU and NPU), Ubuntu 24.04 "
        "(kernel 6.8, intel_vpu), OpenVINO 2024.4 from pip",
        merge(kernel_arch("x86_64"), dmi("ASUSTeK COMPUTER INC.", "NUC14RVH"), {"proc/cpuinfo": MTL_CPUINFO},
              pci("0000:00:02.0", "0x8086", "0x7d55", "0x030000", "i915"),
              render_node(128, vendor="0x8086", device="0x7d55", pci_address="0000:00:02.0"),
              pci("0000:00:0b.0", "0x8086", "0x7d1d", "0x120000", "intel_vpu"),
              {"sys/class/accel/accel0": Link("../../devices/pci0000:00/0000:00:0b.0/accel/accel0"),
               "sys/devices/pci0000:00/0000:00:0b.0/accel/accel0/device": Link("../.."), "dev/accel/accel0": ""},
              libs("usr/local/lib/python3.12/dist-packages/openvino/libs", "libopenvino.so.2024.4.0"),
              userland("x86_64")),
        "ASUSTeK COMPUTER INC. NUC14RVH", "x86_64", "x86-openvino-npu",
        "matched: arch x86_64; accelerator intel-npu; library libopenvino.so.2024.4.0; cpu flags sse4_2",
        {**CPU_ONLY, ".onnx": "OpenVINOExecutionProvider (NPU)"},
        {"intel-npu": (True, "onnx: OpenVINOExecutionProvider (NPU)"),
         "intel-gpu": (False, "standby: onnx falls back to OpenVINOExecutionProvider (GPU)")},
    ),
    Board(
        "core-ultra-old-kernel", "Core Ultra 7 155H laptop, Ubuntu 22.04 GA kernel 5.15 (no intel_vpu), "
        "OpenVINO archive installed",
        merge(dmi("LENOVO", "21KC"), {"proc/cpuinfo": x86_cpuinfo(22, "Intel(R) Core(TM) Ultra 7 155H")},
              pci("0000:00:0b.0", "0x8086", "0x7d1d", "0x120000"),
              libs("opt/intel/openvino_2024.4.0/runtime/lib/intel64", "libopenvino.so.2440")),
        "LENOVO 21KC", "x86_64", "x86-openvino", "matched: arch x86_64; library libopenvino.so.2440; cpu flags sse4_2",
        {**CPU_ONLY, ".onnx": "OpenVINOExecutionProvider (CPU)"},
        {"intel-npu": (False, "not usable: no /dev/accel/accel0: the intel_vpu driver is not loaded")},
    ),
    Board(
        "x86-rtx3060-proprietary", "Desktop, i7-12700 + GeForce RTX 3060, Ubuntu 22.04, NVIDIA 550.54.14 "
        "(proprietary module), CUDA 12.4 and TensorRT 10 debs",
        merge(RTX_DESKTOP, pci("0000:01:00.0", "0x10de", "0x2504", "0x030000", "nvidia"),
              nvidia_driver("NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024",
                            ("0000:01:00.0", "NVIDIA GeForce RTX 3060")),
              libs("usr/lib/x86_64-linux-gnu", "libnvinfer.so.10"), cuda("12.4", "x86_64-linux")),
        "Micro-Star International Co., Ltd. MS-7D25", "x86_64", "x86-nvidia",
        "matched: arch x86_64; accelerator nvidia-gpu",
        {**CPU_ONLY, ".onnx": "TensorrtExecutionProvider"},
        {"nvidia-gpu": (True, "onnx: TensorrtExecutionProvider"),
         "intel-gpu": (False, "profile x86-nvidia does not use it; profile x86-openvino would, but it does not match")},
    ),
    Board(
        "x86-rtx4090-open-module", "Workstation, GeForce RTX 4090, Ubuntu 24.04 (kernel 6.8), NVIDIA 560.35.03 "
        "open kernel module (the default since 560), CUDA 12.6 without TensorRT",
        merge(kernel_arch("x86_64"), dmi("Dell Inc.", "Precision 3680"),
              {"proc/cpuinfo": x86_cpuinfo(24, "Intel(R) Core(TM) i9-14900K")},
              pci("0000:01:00.0", "0x10de", "0x2684", "0x030000", "nvidia"),
              nvidia_driver("NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  "
                            "(dvs-builder@U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024",
                            ("0000:01:00.0", "NVIDIA GeForce RTX 4090")),
              cuda("12.6", "x86_64-linux")),
        "Dell Inc. Precision 3680", "x86_64", "x86-nvidia", "matched: arch x86_64; accelerator nvidia-gpu",
        {**CPU_ONLY, ".onnx": "CUDAExecutionProvider"},
        {"nvidia-gpu": (True, "NVIDIA GeForce RTX 4090 (0000:01:00.0, driver 560.35.03, open kernel module)")},
    ),
    Board(
        "x86-gtx1060-nouveau", "Desktop with a GeForce GTX 1060 on nouveau (NVIDIA's driver never installed), "
        "Debian 12 (kernel 6.1)",
        merge(kernel_arch("x86_64"), {"proc/cpuinfo": x86_cpuinfo(8, "Intel(R) Core(TM) i7-7700 CPU @ 3.60GHz")},
              pci("0000:01:00.0", "0x10de", "0x1c03", "0x030000", "nouveau")),
        None, "x86_64", "x86-cpu", "matched: arch x86_64", CPU_ONLY,
        {"nvidia-gpu": (False, "bound to the nouveau driver, not NVIDIA's")},
    ),
    Board(
        "amd-ryzen-apu", "Desktop, Ryzen 7 5700G (Radeon Vega iGPU, amdgpu), Debian 12 (kernel 6.1)",
        merge(kernel_arch("x86_64"), dmi("ASUS", "System Product Name"),
              {"proc/cpuinfo": x86_cpuinfo(16, "AMD Ryzen 7 5700G with Radeon Graphics", vendor="AuthenticAMD")},
              pci("0000:07:00.0", "0x1002", "0x1638", "0x030000", "amdgpu"),
              render_node(128, vendor="0x1002", device="0x1638", pci_address="0000:07:00.0")),
        None, "x86_64", "x86-cpu", "matched: arch x86_64", CPU_ONLY,
        {"amd-gpu": (False, "ROCm / MIGraphX execution providers are not among edge-agent's profiles")},
        cpu_model="AMD Ryzen 7 5700G with Radeon Graphics",
    ),
    Board(
        "x86-hailo8-m2", "Industrial PC with a Hailo-8 M.2 module, Ubuntu 22.04, HailoRT 4.20 (hailort deb + PCIe "
        "driver)",
        merge(dmi("Advantech", "MIC-770 V2"), {"proc/cpuinfo": x86_cpuinfo(8, "Intel(R) Core(TM) i7-10700TE")},
              pci("0000:03:00.0", "0x1e60", "0x2864", "0x120000", "hailo"), {"dev/hailo0": ""},
              libs("usr/lib", "libhailort.so.4.20.0"), userland("x86_64")),
        "Advantech MIC-770 V2", "x86_64", "x86-cpu", "matched: arch x86_64", {**CPU_ONLY, ".hef": "hailo"},
        {"hailo": (True, "used for .hef models by hef: hailo")},
    ),
    Board(
        "x86-coral-m2", "Dell OptiPlex 7090 with a Coral M.2 Accelerator (A+E key), Debian 11, gasket-dkms",
        merge(dmi("Dell Inc.", "OptiPlex 7090"), {"proc/cpuinfo": x86_cpuinfo(8, "Intel(R) Core(TM) i7-10700")},
              pci("0000:02:00.0", "0x1ac1", "0x089a", "0x088000", "apex"), {"dev/apex_0": ""},
              libs("usr/lib/x86_64-linux-gnu", "libedgetpu.so.1=libedgetpu.so.1.0", "libedgetpu.so.1.0")),
        "Dell Inc. OptiPlex 7090", "x86_64", "coral-pcie", "matched: accelerator edgetpu-pcie",
        {**CPU_ONLY, ".tflite": "edgetpu (pci)"}, {"edgetpu-pcie": (True, "tflite: edgetpu (pci)")},
    ),
    # --- aarch64 servers and workstations ------------------------------------------------------
    Board(
        "dgx-spark-gb10", "NVIDIA DGX Spark (GB10: 10x Cortex-X925 + 10x Cortex-A725, Blackwell GPU), DGX OS 7 "
        "(Ubuntu 24.04, kernel 6.11), driver 580 open module, CUDA 13",
        merge(kernel_arch("aarch64"), dmi("NVIDIA", "DGX Spark"),
              {"proc/cpuinfo": arm_cpuinfo([(10, ARM, "0xd85"), (10, ARM, "0xd87")], features=A78_FEATURES)},
              pci("000f:01:00.0", "0x10de", "0x2e12", "0x030200", "nvidia"),
              nvidia_driver("NVIDIA UNIX Open Kernel Module for aarch64  580.95.05  Release Build",
                            ("000f:01:00.0", "NVIDIA GB10")),
              libs("usr/lib/aarch64-linux-gnu", "libnvinfer.so.10"), cuda("13.0", "sbsa-linux", runtime="13")),
        "NVIDIA DGX Spark", "aarch64", "aarch64-nvidia", "matched: arch aarch64; accelerator nvidia-gpu",
        {**CPU_ONLY, ".onnx": "TensorrtExecutionProvider"}, {"nvidia-gpu": (True, "NVIDIA GB10 (000f:01:00.0")},
        cpu_model="10x ARM Cortex-X925 + 10x ARM Cortex-A725",
    ),
    Board(
        "gh200-grace-hopper", "Grace Hopper GH200 server (72x Neoverse-V2, H100), Ubuntu 22.04 with the "
        "nvidia-64k kernel 6.5, driver 550 open module, CUDA 12.4",
        merge(kernel_arch("aarch64"), dmi("Quanta Cloud Technology Inc.", "S74G-2U"),
              {"proc/cpuinfo": arm_cpuinfo([(72, ARM, "0xd4f")], features=A78_FEATURES)},
              pci("0009:01:00.0", "0x10de", "0x2342", "0x030200", "nvidia"),
              nvidia_driver("NVIDIA UNIX Open Kernel Module for aarch64  550.54.15  Release Build",
                            ("0009:01:00.0", "GH200 480GB")),
              cuda("12.4", "sbsa-linux")),
        "Quanta Cloud Technology Inc. S74G-2U", "aarch64", "aarch64-nvidia",
        "matched: arch aarch64; accelerator nvidia-gpu", {**CPU_ONLY, ".onnx": "CUDAExecutionProvider"},
        {"nvidia-gpu": (True, "onnx: CUDAExecutionProvider")}, cpu_model="ARM Neoverse-V2",
    ),
    Board(
        "aws-graviton3", "AWS c7g.xlarge (Graviton3, Neoverse-V1), Amazon Linux 2023 (kernel 6.1)",
        merge(kernel_arch("aarch64"), dmi("Amazon EC2", "c7g.xlarge"),
              {"proc/cpuinfo": arm_cpuinfo([(4, ARM, "0xd40")], features=A78_FEATURES)}, userland("aarch64")),
        "Amazon EC2 c7g.xlarge", "aarch64", "generic-cpu", "matched: no match rules (matches any device)", CPU_ONLY,
        cpu_model="ARM Neoverse-V1",
    ),
    Board(
        "oci-ampere-a1-vm", "Oracle Cloud VM.Standard.A1.Flex (Ampere Altra, Neoverse-N1, KVM), Ubuntu 22.04 "
        "(kernel 5.15)",
        merge(dmi("QEMU", "KVM Virtual Machine"),
              {"proc/cpuinfo": arm_cpuinfo([(4, ARM, "0xd0c")], features=A78_FEATURES)}),
        "QEMU KVM Virtual Machine", "aarch64", "generic-cpu", "matched: no match rules (matches any device)",
        CPU_ONLY, cpu_model="ARM Neoverse-N1",
    ),
    Board(
        "asahi-mac-mini-m1", "Mac mini (M1, 2020), Fedora Asahi Remix 39 (kernel 6.6)",
        merge(kernel_arch("aarch64"), device_tree("Apple Mac mini (M1, 2020)", "apple,j274", "apple,t8103",
                                                  "apple,arm-platform"),
              {"proc/cpuinfo": arm_cpuinfo([(4, "0x61", "0x022"), (4, "0x61", "0x023")], features=A78_FEATURES)}),
        "Apple Mac mini (M1, 2020)", "aarch64", "generic-cpu", "matched: no match rules (matches any device)",
        CPU_ONLY, cpu_model="4x Apple M1 Icestorm + 4x Apple M1 Firestorm",
    ),
    # --- virtual machines and other architectures -----------------------------------------------
    Board(
        "proxmox-q35-vm", "Proxmox VE guest (QEMU q35, host CPU), Debian 12 (kernel 6.1)",
        merge(kernel_arch("x86_64"), dmi("QEMU", "Standard PC (Q35 + ICH9, 2009)"),
              {"proc/cpuinfo": x86_cpuinfo(4, "Common KVM processor", flags=X86_FLAGS_VM)}),
        "QEMU Standard PC (Q35 + ICH9, 2009)", "x86_64", "x86-cpu", "matched: arch x86_64", CPU_ONLY,
    ),
    Board(
        "virtualbox-vm", "VirtualBox 7 guest, Ubuntu 20.04 (kernel 5.4)",
        merge(dmi("innotek GmbH", "VirtualBox"), {"proc/cpuinfo": x86_cpuinfo(2, "Intel(R) Core(TM) i7-8565U CPU "
                                                                              "@ 1.80GHz", flags=X86_FLAGS_VM)}),
        "innotek GmbH VirtualBox", "x86_64", "x86-cpu", "matched: arch x86_64", CPU_ONLY,
    ),
    Board(
        "visionfive2-riscv", "StarFive VisionFive 2 (JH7110, 4x SiFive U74), Debian 12 image (kernel 5.15)",
        merge(device_tree("StarFive VisionFive 2 v1.3B", "starfive,visionfive-2-v1.3b", "starfive,jh7110"),
              {"proc/cpuinfo": "".join(f"processor\t: {n}\nhart\t\t: {n + 1}\nisa\t\t: rv64imafdc_zicntr_zicsr_"
                                       "zifencei_zihpm_zba_zbb\nmmu\t\t: sv39\nuarch\t\t: sifive,u74-mc\n\n"
                                       for n in range(4))},
              userland("riscv64")),
        "StarFive VisionFive 2 v1.3B", "riscv64", "generic-cpu", "matched: no match rules (matches any device)",
        CPU_ONLY, cpu_model="sifive,u74-mc", soc="starfive,jh7110",
    ),
    Board(
        "beaglebone-black", "BeagleBone Black (AM335x, Cortex-A8), Debian 11 (kernel 5.10)",
        merge(device_tree("TI AM335x BeagleBone Black", "ti,am335x-bone-black", "ti,am335x-bone", "ti,am33xx"),
              {"proc/cpuinfo": "processor\t: 0\nmodel name\t: ARMv7 Processor rev 2 (v7l)\nBogoMIPS\t: 995.32\n"
                               "Features\t: half thumb fastmult vfp edsp thumbee neon vfpv3 tls vfpd32\n"
                               "CPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x3\nCPU part\t: 0xc08\n"
                               "CPU revision\t: 2\n\nHardware\t: Generic AM33XX (Flattened Device Tree)\n"},
              userland("arm")),
        "TI AM335x BeagleBone Black", "armv7l", "generic-cpu", "matched: no match rules (matches any device)",
        CPU_ONLY, cpu_model="ARM Cortex-A8",
    ),
]
