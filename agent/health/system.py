"""System health: one snapshot of CPU, memory, load, disk, temperatures, throttling and GPUs.

Every file is read below ``root`` so tests (and ``--root`` style tooling) can point it at a fake
``/proc`` and ``/sys`` tree. A missing, unreadable or garbled file is an absent fact (``None`` or an
empty mapping), never an error: a board that lacks a sensor is normal, not a fault. CPU percent and
the process figures come from psutil and always describe the running host, whatever ``root`` is.

This module only reads; it does not export metrics (:mod:`agent.health.collector`) or publish.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

log = structlog.get_logger(__name__)

# Raspberry Pi firmware ``get_throttled`` bits (same word as ``vcgencmd get_throttled``).
THROTTLE_BITS: Mapping[str, int] = {
    "under_voltage": 0,
    "arm_frequency_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
    "under_voltage_occurred": 16,
    "arm_frequency_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}
RPI_THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"
JETSON_GPU_LOAD = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
NVIDIA_SMI_QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu"
_MIB = 1024 * 1024
_REPORTED: set[str] = set()


class Auto(enum.Enum):
    AUTO = "auto"


AUTO = Auto.AUTO
"""Default for ``nvidia_smi``: look the binary up on ``PATH`` (``shutil.which``) at call time."""


@dataclass(frozen=True)
class Memory:
    total_bytes: int
    available_bytes: int
    percent: float  # used share: (total - available) / total, as psutil and ``free`` define it


@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int
    cpu_percent: float | None  # None on the sampler's first call; may exceed 100 on several cores
    threads: int
    open_fds: int | None  # None where the platform has no fd count


@dataclass(frozen=True)
class Disk:
    path: str
    total_bytes: int
    free_bytes: int  # available to an unprivileged user (statvfs f_bavail), as ``df`` shows
    used_percent: float  # used / (used + free), as ``df`` computes it (reserved blocks excluded)


@dataclass(frozen=True)
class Throttling:
    raw: int
    flags: Mapping[str, bool]

    @property
    def now(self) -> bool:
        """True if any condition is active right now (the low bits), not merely seen since boot."""
        return any(on for name, on in self.flags.items() if not name.endswith("_occurred"))


@dataclass(frozen=True)
class Gpu:
    index: str
    name: str
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None


@dataclass(frozen=True)
class SystemSnapshot:
    taken_at: float
    cpu_percent: float | None
    load: tuple[float, float, float] | None  # 1, 5, 15 minutes
    memory: Memory | None
    process: ProcessStats | None
    disk: Disk | None
    temperatures: Mapping[str, float] = field(default_factory=dict)  # zone -> degrees Celsius
    throttling: Throttling | None = None
    gpus: tuple[Gpu, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: plain dicts, lists and numbers; absent facts are ``None`` or empty."""
        return {
            "taken_at": self.taken_at,
            "cpu_percent": self.cpu_percent,
            "load": dict(zip(("1m", "5m", "15m"), self.load, strict=True)) if self.load else None,
            "memory": asdict(self.memory) if self.memory else None,
            "process": asdict(self.process) if self.process else None,
            "disk": asdict(self.disk) if self.disk else None,
            "temperatures": dict(self.temperatures),
            "throttling": (
                {"raw": hex(self.throttling.raw), "now": self.throttling.now, **self.throttling.flags}
                if self.throttling
                else None
            ),
            "gpus": [asdict(g) for g in self.gpus],
        }

    def summary(self) -> dict[str, Any]:
        """The few figures a fleet table shows per device; ``None`` where the board has no such fact."""
        return {
            "cpu_percent": _round(self.cpu_percent),
            "memory_percent": _round(self.memory.percent if self.memory else None),
            "max_temperature_c": _round(max(self.temperatures.values(), default=None)),
            "throttled": self.throttling.now if self.throttling else None,
            "disk_free_percent": _round(100.0 - self.disk.used_percent if self.disk else None),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class CpuSampler:
    """CPU percent of the host and of this process since this sampler's previous call.

    psutil's ``cpu_percent(None)`` keeps one interval for the whole interpreter, so a Prometheus
    scrape and the MQTT telemetry tick would shorten each other's window. Each consumer holds its
    own sampler instead. The first call has no interval yet and reports ``None``.
    """

    def __init__(self) -> None:
        self._last: Any = None
        self._pid = -1
        self._process: psutil.Process | None = None
        self._process_primed = False

    def system_percent(self) -> float | None:
        try:
            now = psutil.cpu_times()
        except (OSError, psutil.Error):
            return None
        last, self._last = self._last, now
        if last is None:
            return None
        total = _cpu_total(now) - _cpu_total(last)
        busy = total - (now.idle - last.idle) - (getattr(now, "iowait", 0.0) - getattr(last, "iowait", 0.0))
        if total <= 0:
            return 0.0
        return round(min(100.0, max(0.0, busy / total * 100.0)), 1)

    def process(self) -> psutil.Process:
        """This process; a fresh handle after a fork so the child does not report its parent."""
        if self._process is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._process = psutil.Process(self._pid)
            self._process_primed = False
        return self._process

    def process_percent(self, proc: psutil.Process) -> float | None:
        value = proc.cpu_percent(None)
        if not self._process_primed:
            self._process_primed = True
            return None  # psutil documents the first value as meaningless
        return value


def _cpu_total(times: Any) -> float:
    # On Linux guest time is already counted in user/nice (psutil and htop subtract it too).
    return float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


_DEFAULT_SAMPLER = CpuSampler()


def read_system(
    *,
    root: str | os.PathLike[str] = "/",
    state_dir: str | os.PathLike[str],
    nvidia_smi: str | Auto | None = AUTO,
    sampler: CpuSampler | None = None,
    gpu_timeout_s: float = 2.0,
) -> SystemSnapshot:
    """One snapshot of the system. Never raises for missing hardware: those facts are absent.

    ``state_dir`` is a real path (not below ``root``): its file system is the one the agent fills.
    ``nvidia_smi`` is the binary to run, ``None`` to skip, or :data:`AUTO` to look it up on PATH.
    ``sampler`` keeps the CPU-percent interval; pass one per periodic consumer.
    """
    base = Path(root)
    sampler = sampler or _DEFAULT_SAMPLER
    smi = resolve_nvidia_smi(nvidia_smi)
    gpus = read_nvidia_smi(smi, timeout_s=gpu_timeout_s) if smi else ()
    if not gpus:
        gpus = read_jetson_gpu(base)
    return SystemSnapshot(
        taken_at=time.time(),
        cpu_percent=sampler.system_percent(),
        load=read_loadavg(base),
        memory=read_meminfo(base),
        process=read_process(sampler),
        disk=read_disk(state_dir),
        temperatures=read_temperatures(base),
        throttling=read_throttling(base),
        gpus=gpus,
    )


def resolve_nvidia_smi(nvidia_smi: str | Auto | None) -> str | None:
    """The binary to run: ``AUTO`` looks it up on PATH, a string is taken as is, ``None`` means skip."""
    return shutil.which("nvidia-smi") if isinstance(nvidia_smi, Auto) else nvidia_smi


def _read(path: Path) -> str | None:
    """Stripped file text, or None if absent, unreadable or empty (sysfs often returns EINVAL)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        # Once per path: a sysfs zone that always answers EINVAL would otherwise log every scrape.
        if not isinstance(exc, FileNotFoundError | NotADirectoryError) and str(path) not in _REPORTED:
            _REPORTED.add(str(path))
            log.debug("health.unreadable", path=str(path), error=str(exc))
        return None
    return data.decode("utf-8", errors="replace").replace("\x00", "").strip() or None


def _natural(path: Path) -> tuple[str, int]:
    """``thermal_zone10`` after ``thermal_zone2``."""
    m = re.match(r"(.*?)(\d+)$", path.name)
    return (m.group(1), int(m.group(2))) if m else (path.name, -1)


def _glob(base: Path, pattern: str) -> list[Path]:
    try:
        return sorted(base.glob(pattern), key=_natural)
    except OSError:
        return []


def read_loadavg(root: Path) -> tuple[float, float, float] | None:
    text = _read(root / "proc/loadavg")
    try:
        one, five, fifteen = (float(x) for x in (text or "").split()[:3])
    except ValueError:
        return None
    return one, five, fifteen


def read_meminfo(root: Path) -> Memory | None:
    fields: dict[str, int] = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    total = fields.get("MemTotal")
    if not total:
        return None
    available = fields.get("MemAvailable")
    if available is None:  # kernels before 3.14: the estimate ``free`` used then
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    available = min(available, total)
    return Memory(total, available, round((total - available) / total * 100.0, 1))


def read_process(sampler: CpuSampler) -> ProcessStats | None:
    try:
        proc = sampler.process()
        with proc.oneshot():
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            fds = proc.num_fds() if hasattr(proc, "num_fds") else None
            cpu = sampler.process_percent(proc)
    except (OSError, psutil.Error) as exc:
        log.debug("health.process_unreadable", error=str(exc))
        return None
    return ProcessStats(rss, cpu, threads, fds)


def read_disk(path: str | os.PathLike[str]) -> Disk | None:
    """File system holding ``path``; None if the path does not exist (yet)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    denom = usage.used + usage.free
    used_percent = round(usage.used / denom * 100.0, 1) if denom else 0.0
    return Disk(str(path), usage.total, usage.free, used_percent)


def read_temperatures(root: Path) -> dict[str, float]:
    """{zone type: degrees C} from thermal zones; hwmon sensors if the board has no thermal zone."""
    temps: dict[str, float] = {}
    for zone in _glob(root, "sys/class/thermal/thermal_zone*"):
        celsius = _millidegrees(_read(zone / "temp"))
        if celsius is None:
            continue
        name = _read(zone / "type") or zone.name
        # x86 boards often repeat a type (two ``acpitz`` zones): keep both, named apart.
        temps[f"{name}:{zone.name}" if name in temps else name] = celsius
    if temps:
        return temps
    for hwmon in _glob(root, "sys/class/hwmon/hwmon*"):
        chip = _read(hwmon / "name") or hwmon.name
        for sensor in _glob(hwmon, "temp*_input"):
            celsius = _millidegrees(_read(sensor))
            if celsius is None:
                continue
            label = _read(hwmon / sensor.name.replace("_input", "_label")) or sensor.name.removesuffix("_input")
            temps[f"{chip}/{label}"] = celsius
    return temps


def _millidegrees(text: str | None) -> float | None:
    try:
        value = int(text or "")
    except ValueError:
        return None
    celsius = value / 1000.0
    # Some drivers report -274000 or similar for a sensor that is switched off.
    return celsius if -273.0 < celsius < 1000.0 else None


def read_throttling(root: Path) -> Throttling | None:
    """Raspberry Pi firmware throttle word; None on boards without it.

    The sysfs file holds bare hex (``50005``); ``vcgencmd`` prints ``throttled=0x50005``. Both parse.
    """
    text = _read(root / RPI_THROTTLED)
    if text is None:
        return None
    try:
        raw = int(text.removeprefix("throttled="), 16)
    except ValueError:
        return None
    return Throttling(raw, {name: bool(raw >> bit & 1) for name, bit in THROTTLE_BITS.items()})


def read_jetson_gpu(root: Path) -> tuple[Gpu, ...]:
    """Jetson integrated GPU load (sysfs per-mille); memory is shared with the CPU, so absent."""
    for rel in JETSON_GPU_LOAD:
        text = _read(root / rel)
        if text is None:
            continue
        try:
            permille = int(text)
        except ValueError:
            return ()
        return (Gpu("0", "jetson", round(permille / 10.0, 1), None, None, None),)
    return ()


def read_nvidia_smi(binary: str, *, timeout_s: float = 2.0) -> tuple[Gpu, ...]:
    """Discrete NVIDIA GPUs via ``nvidia-smi``; empty if it fails, hangs or prints nothing usable."""
    cmd = [binary, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"]
    try:
        # Own session, so a timeout kills the whole group (a wedged driver can hang it for minutes).
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as exc:
        log.debug("health.nvidia_smi_failed", binary=binary, error=str(exc))
        return ()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        log.warning("health.nvidia_smi_timeout", binary=binary, timeout_s=timeout_s)
        return ()
    if proc.returncode != 0:
        log.debug("health.nvidia_smi_failed", binary=binary, returncode=proc.returncode)
        return ()
    return parse_nvidia_smi(out.decode("utf-8", errors="replace"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    # A grandchild may hold the pipe a moment longer; it was killed with the group.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=1.0)


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Lines of ``index, name, util %, mem used MiB, mem total MiB, temp C``; ``[N/A]`` is absent."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 6 or not cells[0].isdigit():
            continue
        index, name, util, used, total, temp = cells
        used_mib, total_mib = _number(used), _number(total)
        gpus.append(
            Gpu(
                index=index,
                name=name,
                utilization_percent=_number(util),
                memory_used_bytes=int(used_mib * _MIB) if used_mib is not None else None,
                memory_total_bytes=int(total_mib * _MIB) if total_mib is not None else None,
                temperature_celsius=_number(temp),
            )
        )
    return tuple(gpus)


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def release_free_heap() -> None:
    """Give the C heap's free pages back (after start-up and deployments, which churn memory).

    glibc keeps freed memory in its arenas; for a long-running, mostly idle daemon that is
    resident memory nobody uses. A no-op where ``malloc_trim`` does not exist (musl, macOS).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
