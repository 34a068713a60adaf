"""What every ``edge-fleet`` command shares: usage errors, the broker flags and how broker
settings are resolved (``--config FILE`` [broker] table, then ``EDGE_FLEET_*`` environment
variables, then flags), and which modules belong to the ``fleet`` extra. The main CLI and each
sub-CLI (server, simulate, upload, bundles) import this; none imports another CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cloud_sync.mqtt.settings import BrokerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Top-level modules of the `fleet` extra: a command that needs one says which extra to install.
FLEET_EXTRA = frozenset({"rich", "cryptography", "securesystemslib", "fastapi", "uvicorn", "sqlalchemy", "alembic",
                         "psycopg", "multipart"})
_BROKER_KEYS = ("url", "protocol", "username", "password", "ca_file", "cert_file", "key_file", "client_id")


class UsageError(Exception):
    """Bad flags or config: exit code 2 (every edge-fleet command)."""


def broker_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[BrokerSettings, str]:
    """Merge config file, environment and flags; returns (broker, topic prefix)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    prefix = "edge/v1"
    if args.config:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{args.config}: {exc}") from None
        broker = data.get("broker", {})
        unknown = sorted(set(broker) - set(_BROKER_KEYS))
        if unknown:
            raise UsageError(f"{args.config}: key 'broker.{unknown[0]}': unknown key")
        values.update(broker)
        prefix = data.get("fleet", {}).get("prefix", prefix)
    for key in _BROKER_KEYS:
        if env.get(f"EDGE_FLEET_{key.upper()}"):
            values[key] = env[f"EDGE_FLEET_{key.upper()}"]
    prefix = env.get("EDGE_FLEET_PREFIX", prefix)
    for key in _BROKER_KEYS:
        flag = getattr(args, key, None)
        if flag:
            values[key] = flag
    prefix = args.prefix or prefix
    settings = BrokerSettings(**{k: str(v) for k, v in values.items()})  # type: ignore[arg-type]
    try:
        settings.validate()
    except ValueError as exc:
        raise UsageError(f"broker.{exc}") from None
    return settings, prefix


def add_broker_args(cmd: argparse.ArgumentParser) -> None:
    """The broker flags every MQTT-speaking command takes (resolved by :func:`broker_settings`)."""
    g = cmd.add_argument_group("broker")
    g.add_argument("--config", help="TOML file with a [broker] table (url, ca_file, cert_file, key_file, ...)")
    g.add_argument("--broker", dest="url", help="mqtt://HOST:PORT or mqtts://HOST:PORT (env EDGE_FLEET_URL)")
    g.add_argument("--protocol", choices=["5", "3.1.1"])
    g.add_argument("--ca-file", dest="ca_file")
    g.add_argument("--cert-file", dest="cert_file")
    g.add_argument("--key-file", dest="key_file")
    g.add_argument("--username")
    g.add_argument("--password")
    g.add_argument("--prefix", help="topic prefix (default edge/v1)")
