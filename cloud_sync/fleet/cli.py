"""``edge-fleet``: the fleet console.

The commands are declared here so ``--help`` documents the whole contract; the ones whose
issue has not landed yet exit 1 with a message that says so instead of pretending.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PLANNED = {
    "keys": "TUF key management (init, rotate)",
    "bundle": "build a signed model bundle",
    "publish": "add a bundle to the TUF repository",
    "serve": "serve the repository over HTTP with Range support",
    "deploy": "staged deployment over MQTT",
    "command": "send a command to a device or group",
    "devices": "list devices from retained MQTT state",
    "watch": "follow a device's results, telemetry or events",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-fleet", description="Fleet console for edge-agent devices.",
                                     epilog="Exit codes: 0 ok, 1 operation failed, 2 usage/config error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in PLANNED.items():
        cmd = sub.add_parser(name, help=f"{text} (not implemented yet)")
        cmd.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    print(f"edge-fleet: error: '{args.command}' is not implemented yet in this version", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
