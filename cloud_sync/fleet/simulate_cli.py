"""``edge-fleet simulate``: argparse wiring for the fleet simulator (cloud_sync/fleet/simulator.py).

Broker settings are resolved like every other ``edge-fleet`` command (``broker_settings``).
Exit codes: 0 stopped cleanly, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from cloud_sync.fleet.simulator import SimulatorSettings
    from cloud_sync.mqtt.settings import BrokerSettings

EPILOG = "Docs: docs/fleet-simulator.md. Exit codes: 0 ok, 1 operation failed, 2 usage/config error."
DESCRIPTION = """\
Run N simulated devices in this process. A tool for tests, demos and capacity planning, not a device:
each simulated device uses the device side of the link (MQTT session with birth and Last Will,
reconnect with backoff and jitter, the outbox, idempotent commands) with a stand-in model registry.
It answers ping, status, reload, deploy, rollback and logs; a deploy emits the same events as a real
install (deploy.started ... committed, or failed with an error code) and then updates the birth's
model list. Devices send telemetry periodically and, with --results-per-s, results."""


def add_command(sub: Any, broker_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``simulate`` on the main parser's subparsers."""
    p = sub.add_parser("simulate", help="simulate N devices in one process (tests, demos, capacity planning)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    broker_args(p)
    sim = p.add_argument_group("simulation")
    sim.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices (1-100000)")
    sim.add_argument("--group", action="append", default=[], metavar="G", help="group every device joins (repeatable)")
    sim.add_argument("--install-time", type=float, default=5.0, metavar="S",
                     help="seconds a deploy takes from started to committed (default 5)")
    sim.add_argument("--failure-rate", type=float, default=0.0, metavar="P",
                     help="probability 0..1 that a deploy fails (download, load or test vectors; default 0)")
    sim.add_argument("--telemetry-interval", type=float, default=10.0, metavar="S", help="per device (default 10)")
    sim.add_argument("--results-per-s", type=float, default=0.0, metavar="R",
                     help="results each device sends per second (default 0)")
    sim.add_argument("--model", action="append", default=[], metavar="NAME@VERSION[:RUNTIME]",
                     help="model every device serves at start (repeatable; default silero-vad@1:onnx)")
    sim.add_argument("--id-prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ... (default sim)")
    sim.add_argument("--seed", type=int, help="random seed: the same seed gives the same failures and figures")
    sim.add_argument("--ramp", type=float, default=0.0, metavar="S", help="spread the first connects over S seconds")
    sim.add_argument("--backoff-min", type=float, default=0.5, metavar="S",
                     help="reconnect backoff floor (default 0.5)")
    sim.add_argument("--backoff-max", type=float, default=10.0, metavar="S",
                     help="reconnect backoff ceiling (default 10; a device's default is 60)")
    sim.add_argument("--outbox-dir", type=Path, metavar="DIR",
                     help="one SQLite outbox file per device here (default: in memory)")
    sim.add_argument("--driver", choices=("hub", "threads"), default="hub",
                     help="hub: one thread drives every session (default); threads: two per device, as on a "
                          "real device (at most 300 devices: paho's select() loop)")
    sim.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: on Ctrl-C/SIGTERM)")
    sim.add_argument("--status-interval", type=float, default=5.0, metavar="S",
                     help="print a status line every S seconds (default 5; 0: never)")
    sim.add_argument("--log-level", default="error", choices=("debug", "info", "warning", "error"),
                     help="library log level on stderr (default error: a thousand devices are noisy)")
    p.set_defaults(fleet_handler=run)


def _line(stats: dict[str, Any], elapsed: float) -> str:
    return (f"[{elapsed:7.1f} s] online {stats['online']}/{stats['devices']}, reconnects {stats['reconnects']}, "
            f"commands {stats['commands']}, deploys {stats['deploys_committed']} committed / "
            f"{stats['deploys_failed']} failed, telemetry {stats['telemetry']}, results {stats['results']}, "
            f"outbox depth {stats['outbox_depth']}")


def run(args: argparse.Namespace) -> int:
    """Run the simulation until the duration ends or SIGINT/SIGTERM; exit 2 on bad flags."""
    import dataclasses

    from cloud_sync.fleet.clilog import stderr_logging
    from cloud_sync.fleet.options import UsageError, broker_settings
    from cloud_sync.fleet.simulator import SimModel, SimulatorSettings

    try:
        broker, prefix = broker_settings(args)
        broker = dataclasses.replace(broker, backoff_min_s=args.backoff_min, backoff_max_s=args.backoff_max)
        broker.validate()
        extra: dict[str, Any] = {"models": tuple(SimModel.parse(m) for m in args.model)} if args.model else {}
        settings = SimulatorSettings(devices=args.devices, id_prefix=args.id_prefix, groups=tuple(args.group),
                                     install_time_s=args.install_time, failure_rate=args.failure_rate,
                                     telemetry_interval_s=args.telemetry_interval, results_per_s=args.results_per_s,
                                     seed=args.seed, ramp_s=args.ramp, outbox_dir=args.outbox_dir,
                                     driver=args.driver, **extra)
    except (UsageError, ValueError) as exc:
        print(f"edge-fleet: error: {_reason(exc)}", file=sys.stderr)
        return 2
    with stderr_logging(args.log_level):
        return _simulate(settings, broker, prefix, args)


def _simulate(settings: SimulatorSettings, broker: BrokerSettings, prefix: str, args: argparse.Namespace) -> int:
    from cloud_sync.fleet.simulator import FleetSimulator

    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda _s, _f: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    simulator = FleetSimulator(settings, broker, prefix)
    ids = settings.device_ids()
    print(f"simulating {len(ids)} devices ({ids[0]} .. {ids[-1]}) on {broker.url}, prefix {prefix}; "
          f"Ctrl-C to stop", flush=True)
    started = time.monotonic()
    try:
        simulator.start()
        deadline = started + args.duration if args.duration else None
        while not done.is_set():
            wait = args.status_interval or 3600.0
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0))
            if done.wait(wait):
                break
            if args.status_interval:
                print(_line(simulator.stats(), time.monotonic() - started), flush=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        print("stopping: every device sends its offline state", flush=True)
        simulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(_line(simulator.stats(), time.monotonic() - started), flush=True)
    return 0


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        return f"{where}: {err['msg']}"
    return str(exc)
