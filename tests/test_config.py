"""Config: TOML file, environment overrides, CLI overrides, systemd directories, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError


def test_defaults_work_without_a_file(tmp_path):
    cfg = load_config(environ={"HOME": str(tmp_path)})
    assert cfg.api.tcp is None, "TCP listener is off by default"
    assert cfg.api.socket_mode == 0o660
    assert cfg.socket_path.name == "agent.sock"
    assert cfg.models_dir == cfg.agent.state_dir / "models"
    assert cfg.model_options("anything").batching.enabled is False


def test_systemd_directories_are_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path / 'run'}:{tmp_path / 'other'}")
    cfg = load_config()
    assert cfg.agent.state_dir == tmp_path / "state"
    assert cfg.socket_path == tmp_path / "run" / "agent.sock"
    assert cfg.models_dir == tmp_path / "state" / "models"


def test_file_env_and_overrides_in_order(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[api]\nsocket = "rel/agent.sock"\nmax_body_bytes = 1000\n'
                    '[model.vad.batching]\nenabled = true\nmax_batch_size = 8\n')
    cfg = load_config(path, environ={"EDGE_AGENT_API__MAX_BODY_BYTES": "2000",
                                     "EDGE_AGENT_AGENT__DEVICE_ID": "cam-01"})
    assert cfg.api.socket == tmp_path / "rel" / "agent.sock", "relative paths are relative to the file"
    assert cfg.api.max_body_bytes == 2000 and cfg.agent.device_id == "cam-01"
    assert cfg.model_options("vad").batching.max_batch_size == 8
    cfg = load_config(path, overrides={"api.socket": "/x.sock", "api.tcp": None}, environ={})
    assert cfg.api.socket == Path("/x.sock") and cfg.api.max_body_bytes == 1000


@pytest.mark.parametrize(("text", "env", "key", "fragment"), [
    ("[api]\nmax_body_bytes = 'big'\n", {}, "api.max_body_bytes", "valid integer"),
    ("[api]\nsockett = '/x'\n", {}, "api.sockett", "unknown key"),
    ("[api]\ntcp = 'localhost'\n", {}, "api.tcp", "HOST:PORT"),
    ("[model.vad.batching]\nmax_batch_size = 0\n", {}, "model.vad.batching.max_batch_size", "greater than"),
    ("[model.'bad name']\n", {}, "model", "invalid model name"),
    ("[logging]\nlevel = 'loud'\n", {}, "logging.level", "'debug'"),
    ("", {"EDGE_AGENT_API__SOCKET_MODE": "'x'"}, "api.socket_mode", "valid integer"),
])
def test_errors_name_file_key_and_reason(tmp_path, text, env, key, fragment):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ=env)
    message = str(err.value)
    assert err.value.key == key and f"key '{key}'" in message and fragment in message
    where = next(iter(env)) if env else str(path)
    assert where in message


def test_malformed_and_missing_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[api\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


def test_broken_config_stops_startup_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[api]\nmax_body_bytes = -5\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "api.max_body_bytes" in lines[0] and str(path) in lines[0]
