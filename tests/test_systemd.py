"""The systemd service: unit files checked by systemd's own tools, the notify protocol against a
real ``NOTIFY_SOCKET`` datagram socket and the real daemon, the daemon under the unit's
system-call filter, and the install script's dry run."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from agent.client import AgentClient
from agent.config import load_config
from agent.errors import ClientError
from agent.systemd import Notifier
from tests.conftest import install, start_daemon, wait_for

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "edge-agent.service"
INSTALL = ROOT / "scripts" / "install-service"
# Measured 1.7 with systemd 252 (Debian 12). What keeps it above 0: PrivateNetwork (0.5, the
# agent needs the network), AF_INET/AF_INET6 (0.3), PrivateDevices (0.2, cameras and
# accelerators), PrivateUsers (0.2, breaks device group access), PrivateMounts, IPAddressDeny,
# SupplementaryGroups, MemoryDenyWriteExecute (see docs/systemd.md), ProcSubset, UMask, RootDirectory.
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def edge_agent_binary() -> str:
    found = shutil.which("edge-agent", path=str(Path(sys.executable).parent)) or shutil.which("edge-agent")
    if found is None:
        pytest.skip("the edge-agent console script is not installed")
    return found


def unit_copy(directory: Path, *, dropins: dict[str, str] | None = None) -> Path:
    """The unit in ``directory`` with ExecStart pointing at a binary that exists here
    (``systemd-analyze verify`` checks that ExecStart is executable)."""
    directory.mkdir(parents=True, exist_ok=True)
    unit = directory / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/edge-agent", edge_agent_binary()))
    for name, text in (dropins or {}).items():
        (directory / f"{UNIT.name}.d").mkdir(exist_ok=True)
        (directory / f"{UNIT.name}.d" / name).write_text(text)
    return unit


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)


# --- unit files ----------------------------------------------------------------------------------------------------


@needs_analyze
def test_unit_and_jetson_dropin_verify_clean(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path, dropins={"20-jetson.conf": (SYSTEMD / "jetson.conf").read_text()})
    result = analyze("verify", "--man=no", f"./{unit.name}", cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify complained:\n{output}"


@needs_analyze
def test_verify_reports_unknown_directives(tmp_path: Path) -> None:
    """Self-check for the test above: verify does parse the unit and its drop-ins (an unknown key
    only warns and leaves the exit code 0, so the test above must look at the output)."""
    unit = unit_copy(tmp_path, dropins={"20-jetson.conf": "[Service]\nDeviceAlow=/dev/nvmap rw\n"})
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"))
    result = analyze("verify", "--man=no", f"./{unit.name}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "Unknown key 'ProtectHomes'" in output
    assert "Unknown key 'DeviceAlow'" in output


@needs_analyze
def test_security_exposure(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path)
    result = analyze("security", "--offline=yes", "--no-pager", f"./{unit.name}", cwd=tmp_path)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"systemd-analyze security --offline unsupported (systemd < 252): {result.stderr.strip()}")
    print(result.stdout)  # the table, for CI logs
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"edge-agent.service exposure: {exposure} {match.group(2)} (bound {MAX_EXPOSURE})")
    assert exposure <= MAX_EXPOSURE
    for line in (
        "✓ User=/DynamicUser=",
        "✓ NoNewPrivileges=",
        "✓ ProtectSystem=",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "✓ RestrictAddressFamilies=~AF_NETLINK",
        "✓ SystemCallFilter=~@privileged",
        "✓ PrivateTmp=",
    ):
        assert line in result.stdout


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles not installed",
)
def test_sysusers_and_tmpfiles_in_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(SYSTEMD / "edge-agent.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user = passwd["edge-agent"]
    assert int(user[2]) < 1000, "a system user"
    assert user[5] == "/var/lib/edge-agent"
    assert user[6].endswith("nologin")
    assert {"edge-agent", "video", "audio", "render"} <= groups.keys()  # SupplementaryGroups= cannot fail
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown")
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "edge-agent.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    st = (root / "etc/edge-agent").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 0, int(groups["edge-agent"][2]))


def test_example_config_is_valid() -> None:
    config = load_config(SYSTEMD / "agent.toml.example", environ={})
    assert config.socket_path == Path("/run/edge-agent/agent.sock")
    assert config.models_dir == Path("/var/lib/edge-agent/models")
    assert config.agent.shutdown_timeout_s < 30  # TimeoutStopSec=30


def test_unit_matches_the_agent() -> None:
    """Settings that must agree with the code and each other."""
    text = UNIT.read_text()
    keys = [line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")]
    for key in ("Type", "NotifyAccess", "WatchdogSec", "User", "DevicePolicy", "ProtectSystem"):
        assert keys.count(key) == 1, key
    assert "Type=notify" in text and "NotifyAccess=main" in text
    assert "ExecStart=/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml" in text
    # a denied system call must fail with EPERM, not kill the agent with SIGSYS (e.g. uvloop probing io_uring)
    assert "SystemCallErrorNumber=EPERM" in text
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in text


# --- the notify protocol against the real daemon -------------------------------------------------------------------


def bind_notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(0.2)
    return sock


def receive(sock: socket.socket, until: float) -> tuple[float, dict[str, str]] | None:
    """The next datagram as (monotonic time, fields), or None at ``until``."""
    while time.monotonic() < until:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        return time.monotonic(), dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    return None


@pytest.fixture
def vad_models(tmp_path: Path, samples: dict[str, Path]) -> Path:
    root = tmp_path / "models"
    install(root, samples, "silero_vad")
    return root


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process may itself run under systemd: none of its notify variables leak in."""
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("environ", "interval"), [
    ({"WATCHDOG_USEC": "400000"}, 0.2),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # the watchdog is another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_timeout(environ: dict[str, str], interval: float | None) -> None:
    assert Notifier(environ).watchdog_interval == interval


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_protocol(tmp_path: Path, vad_models: Path, clean_env: None, kind: str) -> None:
    address = str(tmp_path / "notify.sock") if kind == "path" else f"@edge-agent-test-{uuid.uuid4().hex}"
    notify = bind_notify_socket(address)
    daemon = start_daemon(
        tmp_path / "agent",
        "--models-dir",
        str(vad_models),
        wait=False,
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
    )
    try:
        deadline = time.monotonic() + 60
        before_ready: list[dict[str, str]] = []
        while True:
            got = receive(notify, deadline)
            assert got is not None, f"no READY=1 within 60 s:\n{daemon.log_text()}"
            _, fields = got
            if fields.get("READY") == "1":
                break
            before_ready.append(fields)
        # The moment READY=1 arrives the API must already answer.
        assert daemon.socket.exists()
        with AgentClient(daemon.socket, timeout=5) as client:
            assert client.request("GET", "/v2/health/live")[0] == 200
        assert before_ready[0] == {"STATUS": "loading models"}
        assert all("READY" not in f and "WATCHDOG" not in f for f in before_ready)
        assert fields["MAINPID"] == str(daemon.proc.pid)
        assert fields["STATUS"].startswith("serving 1 model(s) on unix:")

        # WATCHDOG_USEC=400000: pings keep coming while the agent is healthy (their interval, half the
        # timeout, is checked in test_watchdog_interval_is_half_the_timeout; timing belongs in bench/).
        pings = 0
        deadline = time.monotonic() + 60
        while pings < 6 and (got := receive(notify, deadline)) is not None:
            assert got[1] == {"WATCHDOG": "1"}, got
            pings += 1
        assert pings == 6, f"only {pings} watchdog pings within 60 s"

        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (got := receive(notify, deadline)) is not None and got[1].get("STOPPING") != "1":
            assert got[1] == {"WATCHDOG": "1"}, got
        assert got is not None, "no STOPPING=1 after SIGTERM"
        assert daemon.proc.wait(30) == 0, daemon.log_text()
    finally:
        daemon.stop(signal.SIGKILL)
        notify.close()
    assert "systemd.notify_failed" not in daemon.log_text()


def test_without_notify_socket(tmp_path: Path, vad_models: Path, clean_env: None) -> None:
    daemon = start_daemon(tmp_path / "agent", "--models-dir", str(vad_models))
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert "systemd." not in log
    assert "Traceback" not in log


def test_notify_socket_missing(tmp_path: Path, vad_models: Path, clean_env: None) -> None:
    """Not fatal: the agent serves, warns, and stops cleanly."""
    daemon = start_daemon(
        tmp_path / "agent",
        "--models-dir",
        str(vad_models),
        env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "400000"},
    )
    wait_for(lambda: "systemd.notify_failed" in daemon.log_text(), 30, "the failed notification to be logged")
    assert daemon.client.request("GET", "/v2/health/live")[0] == 200
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert "Traceback" not in log


# --- the daemon under the unit's system-call filter ----------------------------------------------------------------

SANDBOX = r'''
"""Apply a seccomp filter (allow list, EPERM otherwise; socket() families) then exec argv[3:]."""
import ctypes, os, struct, sys
allowed = [int(n) for n in sys.argv[1].split(",")]
families = [int(n) for n in sys.argv[2].split(",")]
LD, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000, 0
def s(code, k): return struct.pack("HBBI", code, 0, 0, k)
def j(k, jt, jf): return struct.pack("HBBI", JEQ, jt, jf, k)
prog = [s(LD, 4), j(0xC000003E, 1, 0), s(RET, KILL), s(LD, 0)]  # x86_64 only
socket_nr = allowed[0]
prog += [j(socket_nr, 0, len(families) + 3), s(LD, 16)]
prog += [j(f, len(families) - i, 0) for i, f in enumerate(families)]
prog += [s(RET, ERRNO | 97), s(RET, ALLOW)]  # EAFNOSUPPORT, like RestrictAddressFamilies=
for nr in allowed[1:]:
    prog += [j(nr, 0, 1), s(RET, ALLOW)]
prog.append(s(RET, ERRNO | 1))  # SystemCallErrorNumber=EPERM
buf = ctypes.create_string_buffer(b"".join(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # NO_NEW_PRIVS, SECCOMP
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[3], sys.argv[3:])
'''


def syscall_groups() -> dict[str, set[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    groups: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.add(line.strip())
    return groups


def unit_syscalls() -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow, expanded like systemd does."""
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        return set().union(*(expand(m) for m in groups[name])) if name.startswith("@") else {name}

    allowed: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            names = set().union(*(expand(n) for n in value.lstrip("~").split()))
            allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


@needs_analyze
@pytest.mark.skipif(platform.machine() != "x86_64" or not sys.platform.startswith("linux"), reason="x86_64 Linux only")
def test_daemon_serves_under_the_unit_syscall_filter(tmp_path: Path, samples: dict[str, Path]) -> None:
    """systemd cannot run here (not PID 1), so apply the unit's SystemCallFilter= (allow list with
    SystemCallErrorNumber=EPERM) and RestrictAddressFamilies= with seccomp ourselves, and run the
    real daemon with ONNX Runtime and LiteRT/XNNPACK models under it."""
    header = next(
        (
            p
            for p in (Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), Path("/usr/include/asm/unistd_64.h"))
            if p.exists()
        ),
        None,
    )
    if header is None:
        pytest.skip("no asm/unistd_64.h to map system call names to numbers (linux-libc-dev)")
    numbers = dict(re.findall(r"#define __NR_(\w+) (\d+)", header.read_text()))
    allowed = unit_syscalls()
    assert "sched_setaffinity" not in allowed and "reboot" not in allowed
    nrs = [numbers["socket"], *sorted(int(numbers[n]) for n in allowed if n in numbers)]
    fams = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}
    restrict = next(line for line in UNIT.read_text().splitlines() if line.startswith("RestrictAddressFamilies="))
    families = [int(fams[f]) for f in restrict.split("=", 1)[1].split()]
    wrapper = tmp_path / "sandbox.py"
    wrapper.write_text(SANDBOX)
    models = tmp_path / "models"
    install(models, samples, "silero_vad")
    install(models, samples, "face_detection")

    # Sanity of the filter itself, in a throwaway process.
    probe = subprocess.run(
        [
            sys.executable,
            str(wrapper),
            ",".join(map(str, nrs)),
            ",".join(map(str, families)),
            sys.executable,
            "-c",
            "import os, socket\n"
            "for call in (lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW),\n"
            "             lambda: os.sched_setaffinity(0, {0})):\n"
            "    try: call()\n"
            "    except OSError as e: print(e.errno)\n"
            "socket.socket(socket.AF_INET6); print('ok')",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.split() == ["97", "1", "ok"], probe.stdout + probe.stderr

    # start_daemon runs sys.executable; run it through the wrapper by handing the wrapper the args.
    workdir = tmp_path / "agent"
    workdir.mkdir()
    env = dict(
        os.environ,
        EDGE_AGENT_AGENT__STATE_DIR=str(workdir / "state"),
        EDGE_AGENT_AGENT__RUNTIME_DIR=str(workdir / "run"),
    )
    sock = workdir / "agent.sock"
    log = workdir / "agent.log"
    cmd = [
        sys.executable,
        str(wrapper),
        ",".join(map(str, nrs)),
        ",".join(map(str, families)),
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--socket",
        str(sock),
        "--models-dir",
        str(models),
        "--log-format",
        "json",
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        client = AgentClient(sock, timeout=30)
        deadline = time.monotonic() + 60
        while not sock.exists() or _live(client) is False:
            assert proc.poll() is None, f"agent died under the filter ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        feeds = {
            "input": np.zeros((1, 576), np.float32),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64),
        }
        assert set(client.infer("silero_vad", feeds)) == {"output", "stateN"}
        image = np.zeros((1, 128, 128, 3), np.float32)
        assert set(client.infer("face_detection", {"input": image})) == {"regressors", "classificators"}
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


def _live(client: AgentClient) -> bool:
    try:
        return client.request("GET", "/v2/health/live")[0] == 200
    except ClientError:
        return False


# --- the install script --------------------------------------------------------------------------------------------


def test_install_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "edge-agent"
    watched = [
        Path("/etc/systemd/system/edge-agent.service"),
        Path("/etc/systemd/system/edge-agent.service.d"),
        Path("/etc/sysusers.d/edge-agent.conf"),
        Path("/etc/tmpfiles.d/edge-agent.conf"),
        Path("/etc/edge-agent"),
        prefix,
    ]
    before = {p: p.exists() for p in watched}
    result = subprocess.run(
        [str(INSTALL), "--dry-run", "--prefix", str(prefix)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        f"-m venv {prefix}",
        f"{prefix}/bin/python -m pip install",
        f"{ROOT}[fast]",
        "/etc/sysusers.d/edge-agent.conf",
        "systemd-sysusers",
        "systemd-tmpfiles --create",
        "/etc/systemd/system/edge-agent.service",
        f"ExecStart={prefix}/bin/edge-agent run --config",
        "systemctl daemon-reload",
        "systemctl enable edge-agent.service",
        "systemctl restart edge-agent.service",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert {p: p.exists() for p in watched} == before

    no_start = subprocess.run(
        [str(INSTALL), "--dry-run", "--no-start", "--prefix", str(prefix)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_start.returncode == 0
    assert "systemctl enable" in no_start.stdout and "systemctl restart" not in no_start.stdout


def test_install_rejects_bad_options(tmp_path: Path) -> None:
    for args in (["--frobnicate"], ["--prefix", "relative/dir", "--dry-run"]):
        result = subprocess.run([str(INSTALL), *args], check=False, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, args
        assert "install-service:" in result.stderr
