"""The device install stays lean: the daemon, the local CLI and TUF verification work without
the ``cli`` and ``fleet`` extras (rich, cryptography, the fleet service's libraries).

The extras are installed in the test environment, so each check runs in a subprocess that
makes them unimportable first, as a device without them would be.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import AgentClient
from agent.errors import ClientError
from cloud_sync.bundles import build_bundle
from cloud_sync.repo import Repository, make_server
from tests.conftest import install

pytestmark = pytest.mark.timeout(90)

#: What only the extras bring; the device side must never import any of them.
EXTRAS = ("rich", "pygments", "PIL", "cryptography", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic",
          "psycopg", "multipart")
PRELUDE = (f"import sys\nfor m in {EXTRAS!r}:\n    sys.modules[m] = None  # as if not installed\n")


def run_without_extras(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + code, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def lean_daemon(tmp_path: Path, samples: dict[str, Path]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    install(tmp_path / "models", samples, "silero_vad")
    sock = tmp_path / "agent.sock"
    code = PRELUDE + "from agent.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "--models-dir", str(tmp_path / "models"),
                             "--socket", str(sock), "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT,
                            env={**__import__("os").environ, "EDGE_AGENT_AGENT__STATE_DIR": str(tmp_path / "state")})
    try:
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def wait_live(proc: subprocess.Popen[bytes], sock: Path, log: Path) -> AgentClient:
    client = AgentClient(sock, timeout=10)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if client.request("GET", "/v2/health/live")[0] == 200:
                return client
        except ClientError:
            pass
        assert time.monotonic() < deadline, f"not live within 60 s:\n{log.read_text()}"
        time.sleep(0.05)


def test_daemon_and_cli_run_without_the_extras(lean_daemon: tuple[subprocess.Popen[bytes], Path],
                                               tmp_path: Path) -> None:
    proc, sock = lean_daemon
    client = wait_live(proc, sock, tmp_path / "agent.log")
    feeds = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32),
             "sr": np.array(16000, np.int64)}
    outputs = client.infer("silero_vad", feeds)
    assert outputs["output"].shape == (1, 1)
    # The local CLI prints its tables as plain text without rich.
    out = run_without_extras("from agent.cli import main\nsys.exit(main(sys.argv[1:]))\n",
                             "models", "--socket", str(sock))
    assert out.returncode == 0, out.stderr
    assert "silero_vad" in out.stdout and "AVAILABLE" in out.stdout and "CPUExecutionProvider" in out.stdout
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_fleet_commands_name_the_missing_extra(tmp_path: Path) -> None:
    out = run_without_extras("from cloud_sync.fleet.cli import main\nsys.exit(main(sys.argv[1:]))\n",
                             "keys", "init", "--repo", str(tmp_path / "repo"), "--keys", str(tmp_path / "keys"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "pip install 'edge-agent[fleet]'" in out.stderr and "Traceback" not in out.stderr


def test_tuf_verifies_a_bundle_without_cryptography(tmp_path: Path, samples: dict[str, Path]) -> None:
    """A device verifies Ed25519 signatures with securesystemslib's own verifier (no ``cryptography``)."""
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    repo.publish(build_bundle(samples["silero_vad"], tmp_path / "out", name="vad", version=3))
    server = make_server(tmp_path / "repo", "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code = ("from pathlib import Path\nfrom cloud_sync.updater import BundleUpdater\n"
                "root = Path(sys.argv[1])\n"
                "u = BundleUpdater(root / 'tuf', sys.argv[2], trusted_root=Path(sys.argv[3]), cache_dir=root / 'c')\n"
                "u.refresh()\nprint(u.find('vad', None).version, u.download('vad', 3).stat().st_size)\n"
                "assert 'cryptography' not in {k for k, v in sys.modules.items() if v is not None}\n")
        root = str(tmp_path / "repo" / "metadata" / "1.root.json")
        out = run_without_extras(code, str(tmp_path / "device"), url, root)
        assert out.returncode == 0, out.stderr
        version, size = out.stdout.splitlines()[-1].split()
        assert version == "3" and int(size) > 0
        # And a tampered signature is still refused by that verifier.
        meta = tmp_path / "repo" / "metadata" / "timestamp.json"
        meta.write_text(meta.read_text().replace('"sig": "', '"sig": "00', 1))
        out = run_without_extras(code, str(tmp_path / "device2"), url, root)
        assert out.returncode != 0 and "ignature" in out.stderr, out.stderr
    finally:
        server.shutdown()
        server.server_close()
