"""A real agent daemon for the benchmarks: started on a Unix socket in a work directory, ready or gone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from agent.client import AgentClient
from agent.errors import ClientError


def start_agent(work: Path, config: Path, models: Path, env: dict[str, str], *, cwd: Path | None = None,
                timeout: float = 60) -> subprocess.Popen[bytes]:
    """``edge-agent run`` on ``work/agent.sock`` (its output in ``work/agent.log``), once it answers ready.

    ``cwd``: run the agent from another source tree (with ``PYTHONPATH`` in ``env``).
    Raises SystemExit with the log's end if it is not ready within ``timeout`` seconds.
    """
    log = work / "agent.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--models-dir",
                             str(models), "--socket", str(work / "agent.sock"), "--log-format", "json"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=cwd)
    client = AgentClient(work / "agent.sock", timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.request("GET", "/v2/health/ready")[0] == 200:
                    return proc
            except ClientError:
                time.sleep(0.05)
    finally:
        client.close()
    proc.kill()
    proc.wait()
    raise SystemExit(f"the agent{f' from {cwd}' if cwd else ''} did not start:\n{log.read_text()[-3000:]}")
