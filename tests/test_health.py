"""System health readers and the Prometheus collector, against fake /proc and /sys trees in tmp_path.

The only fake is ``nvidia-smi``: a shell script standing in for a GPU this machine does not have.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.health.collector import FAMILIES, HealthCollector
from agent.health.system import (
    NVIDIA_SMI_QUERY,
    CpuSampler,
    read_jetson_gpu,
    read_loadavg,
    read_meminfo,
    read_nvidia_smi,
    read_system,
    read_temperatures,
    read_throttling,
)

Tree = dict[str, "str | None"]

THERMAL = "sys/class/thermal"
THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"

PI_TREE: Tree = {
    "proc/loadavg": "0.50 0.25 0.10 2/180 1234\n",
    "proc/meminfo": "MemTotal:        3884296 kB\nMemFree:          100000 kB\nMemAvailable:    2913222 kB\n",
    f"{THERMAL}/thermal_zone0/type": "cpu-thermal\n",
    f"{THERMAL}/thermal_zone0/temp": "48312\n",
    f"{THERMAL}/thermal_zone1/type": "gpu-thermal\n",  # no temp file
    f"{THERMAL}/thermal_zone2/type": "junk\n",
    f"{THERMAL}/thermal_zone2/temp": "not a number\n",
    f"{THERMAL}/thermal_zone3/type": "soc-thermal\n",
    f"{THERMAL}/thermal_zone3/temp": None,  # a directory: reading it raises IsADirectoryError
    f"{THERMAL}/thermal_zone10/type": "pmic\n",
    f"{THERMAL}/thermal_zone10/temp": "61500\n",
    THROTTLED: "50005\n",
}


def make_root(base: Path, files: Tree) -> Path:
    """str becomes a file, None an empty directory."""
    for rel, content in files.items():
        path = base / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return base


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def fake_nvidia_smi(tmp_path: Path, output: str) -> str:
    """Prints ``output`` only when called with the query the agent is meant to send."""
    expected = f"--query-gpu={NVIDIA_SMI_QUERY}"
    return script(
        tmp_path / "nvidia-smi",
        f'[ "$1" = "{expected}" ] && [ "$2" = "--format=csv,noheader,nounits" ] || exit 2\n'
        f"cat <<'EOF'\n{output}EOF\n",
    )


# -- temperatures -----------------------------------------------------------------------------


def test_thermal_zones_skip_missing_garbage_and_unreadable(tmp_path: Path) -> None:
    root = make_root(tmp_path, PI_TREE)
    assert read_temperatures(root) == {"cpu-thermal": 48.312, "pmic": 61.5}


def test_duplicate_zone_types_are_kept_apart(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        {
            f"{THERMAL}/thermal_zone0/type": "acpitz",
            f"{THERMAL}/thermal_zone0/temp": "27800",
            f"{THERMAL}/thermal_zone1/type": "acpitz",
            f"{THERMAL}/thermal_zone1/temp": "29800",
            f"{THERMAL}/thermal_zone2/temp": "-274000",  # sensor switched off; no type file either
        },
    )
    assert read_temperatures(root) == {"acpitz": 27.8, "acpitz:thermal_zone1": 29.8}


def test_hwmon_fallback_when_no_thermal_zone(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        {
            "sys/class/hwmon/hwmon0/name": "coretemp\n",
            "sys/class/hwmon/hwmon0/temp1_input": "45000\n",
            "sys/class/hwmon/hwmon0/temp1_label": "Package id 0\n",
            "sys/class/hwmon/hwmon0/temp2_input": "44000\n",
            "sys/class/hwmon/hwmon1/name": "nvme\n",
            "sys/class/hwmon/hwmon1/temp1_input": "garbage\n",
        },
    )
    assert read_temperatures(root) == {"coretemp/Package id 0": 45.0, "coretemp/temp2": 44.0}


# -- throttling -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["50005\n", "0x50005", "throttled=0x50005"])
def test_throttled_0x50005_decoded(tmp_path: Path, text: str) -> None:
    root = make_root(tmp_path, {THROTTLED: text})
    t = read_throttling(root)
    assert t is not None
    assert t.raw == 0x50005
    assert t.flags == {
        "under_voltage": True,
        "arm_frequency_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
        "under_voltage_occurred": True,
        "arm_frequency_capped_occurred": False,
        "throttled_occurred": True,
        "soft_temp_limit_occurred": False,
    }
    assert t.now is True


def test_throttle_only_in_the_past_is_not_now(tmp_path: Path) -> None:
    t = read_throttling(make_root(tmp_path, {THROTTLED: "80000"}))  # soft temp limit occurred
    assert t is not None
    assert t.now is False
    assert t.flags["soft_temp_limit_occurred"] is True
    assert sum(t.flags.values()) == 1


@pytest.mark.parametrize("tree", [{}, {THROTTLED: "zzz"}, {THROTTLED: ""}, {THROTTLED: None}])
def test_throttle_absent_or_garbage_is_none(tmp_path: Path, tree: Tree) -> None:
    assert read_throttling(make_root(tmp_path, tree)) is None


# -- /proc ------------------------------------------------------------------------------------


def test_meminfo_and_loadavg(tmp_path: Path) -> None:
    root = make_root(tmp_path, PI_TREE)
    mem = read_meminfo(root)
    assert mem is not None
    assert mem.total_bytes == 3884296 * 1024
    assert mem.available_bytes == 2913222 * 1024
    assert mem.percent == 25.0
    assert read_loadavg(root) == (0.5, 0.25, 0.1)


def test_meminfo_without_memavailable_uses_old_estimate(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"proc/meminfo": "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 100 kB\n"})
    mem = read_meminfo(root)
    assert mem is not None
    assert mem.available_bytes == 250 * 1024
    assert mem.percent == 75.0


@pytest.mark.parametrize("text", ["", "garbage", "1.0 2.0", "MemTotal: 0 kB\n"])
def test_proc_garbage_is_absent(tmp_path: Path, text: str) -> None:
    root = make_root(tmp_path, {"proc/loadavg": text, "proc/meminfo": text})
    assert read_loadavg(root) is None
    assert read_meminfo(root) is None


# -- GPUs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load"])
def test_jetson_gpu_load_permille(tmp_path: Path, rel: str) -> None:
    (gpu,) = read_jetson_gpu(make_root(tmp_path, {rel: "345\n"}))
    assert gpu.utilization_percent == 34.5
    assert gpu.memory_used_bytes is None
    assert gpu.temperature_celsius is None


def test_jetson_gpu_absent_or_garbage(tmp_path: Path) -> None:
    assert read_jetson_gpu(tmp_path) == ()
    assert read_jetson_gpu(make_root(tmp_path, {"sys/devices/gpu.0/load": "busy"})) == ()


def test_nvidia_smi_csv_parsed(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(
        tmp_path,
        "0, NVIDIA GeForce RTX 3060, 37, 1024, 12288, 54\n1, Tesla T4, [N/A], 0, 15360, [Not Supported]\n",
    )
    g0, g1 = read_nvidia_smi(smi)
    assert (g0.index, g0.name, g0.utilization_percent, g0.temperature_celsius) == (
        "0",
        "NVIDIA GeForce RTX 3060",
        37,
        54,
    )
    assert (g0.memory_used_bytes, g0.memory_total_bytes) == (1024 * 2**20, 12288 * 2**20)
    assert (g1.index, g1.utilization_percent, g1.temperature_celsius) == ("1", None, None)
    assert g1.memory_total_bytes == 15360 * 2**20


def test_nvidia_smi_exit_1_is_absent(tmp_path: Path) -> None:
    smi = script(tmp_path / "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate' >&2\nexit 1\n")
    assert read_nvidia_smi(smi) == ()


def test_nvidia_smi_missing_binary_is_absent(tmp_path: Path) -> None:
    assert read_nvidia_smi(str(tmp_path / "no-such-nvidia-smi")) == ()


def test_nvidia_smi_hang_times_out_and_kills_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The shell forks a child that holds the stdout pipe: killing only the shell would leave it.
    smi = script(tmp_path / "nvidia-smi", f"sleep 30 &\necho $! > {pidfile}\nwait\n")
    started = time.monotonic()
    assert read_nvidia_smi(smi, timeout_s=0.5) == ()
    assert time.monotonic() - started < 20  # the hang (30 s) was cut short: not a speed check
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"nvidia-smi's child {child} survived the timeout")


# -- whole snapshot ---------------------------------------------------------------------------


def test_snapshot_of_a_pi_tree(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", PI_TREE)
    snap = read_system(root=root, state_dir=tmp_path, nvidia_smi=None)
    assert snap.load == (0.5, 0.25, 0.1)
    assert snap.temperatures == {"cpu-thermal": 48.312, "pmic": 61.5}
    assert snap.throttling is not None
    assert snap.throttling.raw == 0x50005
    assert snap.gpus == ()
    assert snap.disk is not None
    assert snap.disk.path == str(tmp_path)
    assert 0 < snap.disk.free_bytes <= snap.disk.total_bytes
    assert snap.process is not None
    assert snap.process.rss_bytes > 10 * 2**20
    assert snap.process.threads >= 1
    assert snap.process.open_fds is not None
    assert snap.process.open_fds >= 3

    summary = snap.summary()
    assert summary["memory_percent"] == 25.0
    assert summary["max_temperature_c"] == 61.5
    assert summary["throttled"] is True
    assert summary["disk_free_percent"] == round(100 - snap.disk.used_percent, 1)

    data = json.loads(json.dumps(snap.to_dict()))
    assert data["throttling"]["raw"] == "0x50005"
    assert data["throttling"]["under_voltage"] is True
    assert data["load"] == {"1m": 0.5, "5m": 0.25, "15m": 0.1}
    assert data["memory"]["available_bytes"] == 2913222 * 1024


def test_nonexistent_root_gives_absent_facts(tmp_path: Path) -> None:
    snap = read_system(root=tmp_path / "nope", state_dir=tmp_path / "nope" / "state", nvidia_smi=None)
    assert (snap.load, snap.memory, snap.disk, snap.throttling) == (None, None, None, None)
    assert snap.temperatures == {}
    assert snap.gpus == ()
    assert snap.process is not None  # psutil describes this process, whatever the root
    assert snap.summary() == {
        "cpu_percent": snap.summary()["cpu_percent"],
        "memory_percent": None,
        "max_temperature_c": None,
        "throttled": None,
        "disk_free_percent": None,
    }
    json.dumps(snap.to_dict())


def test_nvidia_smi_wins_over_jetson_load_and_failure_falls_back(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", {"sys/devices/gpu.0/load": "500"})
    smi = fake_nvidia_smi(tmp_path, "0, Orin, 80, 100, 200, 40\n")
    assert [g.name for g in read_system(root=root, state_dir=tmp_path, nvidia_smi=smi).gpus] == ["Orin"]
    broken = script(tmp_path / "broken-smi", "exit 1\n")
    (gpu,) = read_system(root=root, state_dir=tmp_path, nvidia_smi=broken).gpus
    assert (gpu.name, gpu.utilization_percent) == ("jetson", 50.0)


def test_cpu_sampler_first_call_absent_then_measures_own_interval() -> None:
    a, b = CpuSampler(), CpuSampler()
    assert a.system_percent() is None
    proc = a.process()
    assert a.process_percent(proc) is None
    assert b.system_percent() is None
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    sys_pct = a.system_percent()
    proc_pct = a.process_percent(proc)
    assert sys_pct is not None
    assert 0 < sys_pct <= 100
    assert proc_pct is not None
    assert proc_pct > 0  # 0.3 s of CPU in the window (how much of the wall time depends on the machine's load)
    # b's window was not reset by a's call: it still covers the busy loop.
    b_pct = b.system_percent()
    assert b_pct is not None
    assert b_pct > 0


def test_real_host_does_not_raise(tmp_path: Path) -> None:
    snap = read_system(state_dir=tmp_path)
    assert snap.memory is not None  # this is a Linux box
    json.dumps(snap.to_dict())


# -- collector --------------------------------------------------------------------------------


def scrape(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_collector_renders_temperature_throttle_and_gpu(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", {**PI_TREE, "sys/devices/platform/gpu.0/load": "125"})
    registry = CollectorRegistry()
    HealthCollector(root=root, state_dir=tmp_path, nvidia_smi=None).register(registry)
    m = scrape(registry)

    assert m["edge_agent_temperature_celsius"] == {(("zone", "cpu-thermal"),): 48.312, (("zone", "pmic"),): 61.5}
    throttled = {dict(k)["flag"]: v for k, v in m["edge_agent_throttled"].items()}
    assert throttled == {
        "under_voltage": 1.0,
        "arm_frequency_capped": 0.0,
        "throttled": 1.0,
        "soft_temp_limit": 0.0,
        "under_voltage_occurred": 1.0,
        "arm_frequency_capped_occurred": 0.0,
        "throttled_occurred": 1.0,
        "soft_temp_limit_occurred": 0.0,
    }
    assert m["edge_agent_system_load"] == {
        (("period", "1m"),): 0.5,
        (("period", "5m"),): 0.25,
        (("period", "15m"),): 0.1,
    }
    assert m["edge_agent_system_memory_available_bytes"] == {(): 2913222 * 1024}
    assert m["edge_agent_system_memory_percent"] == {(): 25.0}
    assert m["edge_agent_gpu_utilization_percent"] == {(("gpu", "0"),): 12.5}
    assert "edge_agent_gpu_memory_used_bytes" not in m  # Jetson memory is shared: absent, not 0
    assert m["edge_agent_system_cpu_percent"][()] >= 0  # primed at construction, so present at once
    assert m["edge_agent_process_rss_bytes"][()] > 0
    assert m["edge_agent_process_threads"][()] >= 1
    assert m["edge_agent_process_open_fds"][()] >= 3
    assert m["edge_agent_disk_free_bytes"][()] > 0
    assert 0 <= m["edge_agent_disk_used_percent"][()] <= 100
    assert set(m) <= set(FAMILIES)


def test_collector_nvidia_gpu_labels(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, "0, A, 10, 1, 2, 30\n1, B, 90, 3, 4, 70\n")
    registry = CollectorRegistry()
    HealthCollector(root=tmp_path, state_dir=tmp_path, nvidia_smi=smi).register(registry)
    m = scrape(registry)
    assert m["edge_agent_gpu_temperature_celsius"] == {(("gpu", "0"),): 30.0, (("gpu", "1"),): 70.0}
    assert m["edge_agent_gpu_memory_used_bytes"] == {(("gpu", "0"),): 2**20, (("gpu", "1"),): 3 * 2**20}


def test_collector_leaves_absent_facts_out(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    HealthCollector(root=tmp_path / "nope", state_dir=tmp_path / "nope", nvidia_smi=None).register(registry)
    m = scrape(registry)
    for absent in (
        "edge_agent_temperature_celsius",
        "edge_agent_throttled",
        "edge_agent_system_load",
        "edge_agent_system_memory_percent",
        "edge_agent_disk_free_bytes",
        "edge_agent_gpu_utilization_percent",
    ):
        assert absent not in m
    assert "edge_agent_process_rss_bytes" in m


def test_collector_extra_families_and_a_broken_extra(tmp_path: Path) -> None:
    def extra() -> list[Metric]:
        g = GaugeMetricFamily("edge_agent_outbox_depth", "Queued messages")
        g.add_metric([], 7)
        return [g]

    registry = CollectorRegistry()
    HealthCollector(root=tmp_path, state_dir=tmp_path, extra=extra, nvidia_smi=None).register(registry)
    assert scrape(registry)["edge_agent_outbox_depth"] == {(): 7.0}

    def broken() -> list[Metric]:
        raise RuntimeError("link gone")

    registry = CollectorRegistry()
    HealthCollector(root=tmp_path, state_dir=tmp_path, extra=broken, nvidia_smi=None).register(registry)
    assert "edge_agent_process_rss_bytes" in scrape(registry)


def test_collector_names_clash_is_rejected_at_register(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    HealthCollector(root=tmp_path, state_dir=tmp_path, nvidia_smi=None).register(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        HealthCollector(root=tmp_path, state_dir=tmp_path, nvidia_smi=None).register(registry)


def test_repeated_scrapes_on_a_pi_tree(tmp_path: Path) -> None:
    """Scrapes repeat without state piling up (how long one takes: bench/footprint.py)."""
    root = make_root(tmp_path / "root", PI_TREE)
    registry = CollectorRegistry()
    HealthCollector(root=root, state_dir=tmp_path, nvidia_smi=None).register(registry)
    texts = [generate_latest(registry) for _ in range(5)]
    assert all(b"edge_agent_temperature_celsius" in text for text in texts)
    assert len({len(text.splitlines()) for text in texts}) == 1
