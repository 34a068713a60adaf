"""``edge-fleet``: the fleet console.

Exit codes: 0 ok, 1 operation failed (including a command answered with an error or a
rollout that did not complete), 2 usage or config error. Errors are one line on stderr.
Broker settings come from ``--config FILE`` ([broker] table), then ``EDGE_FLEET_*``
environment variables, then flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from cloud_sync.fleet.console import FleetClient, FleetError, rollout
from cloud_sync.fleet.options import FLEET_EXTRA, UsageError, add_broker_args, broker_settings

EPILOG = "Docs: docs/fleet.md. Exit codes: 0 ok, 1 operation failed, 2 usage/config error."
SHADOW_OPTIONS = ("sample", "min_samples", "min_agreement", "max_latency_ratio")

def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    delta = max(0.0, time.time() - ts)
    return f"{delta:.0f} s ago" if delta < 120 else f"{delta / 60:.0f} min ago"


def cmd_devices(client: FleetClient, args: argparse.Namespace) -> int:
    devices = client.devices(args.wait)
    if args.json:
        _print_json([{"id": d.id, "online": d.online, "state": d.state} for d in devices])
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"devices ({len(devices)})", title_justify="left")
    for col in ("device", "online", "last seen", "agent", "profile", "health", "models"):
        table.add_column(col)
    for d in devices:
        models = ", ".join(f"{m['name']}@{m['version']} ({m.get('runtime')}/{m.get('delegate')})" for m in d.models)
        table.add_row(d.id, "[green]yes[/green]" if d.online else "[red]no[/red]", _ago(d.seen),
                      str(d.state.get("agent_version", "-")), str(d.state.get("profile", "-")),
                      _health(d.state.get("health")), models or "-")
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def _health(summary: Any) -> str:
    """One cell: cpu, memory, hottest zone, throttling, disk, stuck models (from the retained state)."""
    if not isinstance(summary, dict):
        return "-"
    parts = [f"cpu {summary.get('cpu_percent', '-')}%", f"mem {summary.get('memory_percent', '-')}%"]
    if summary.get("max_temperature_c") is not None:
        parts.append(f"{summary['max_temperature_c']:.0f}°C")
    if summary.get("disk_free_percent") is not None:
        parts.append(f"disk {summary['disk_free_percent']:.0f}% free")
    if summary.get("throttled"):
        parts.append("[red]THROTTLED[/red]")
    if summary.get("stuck"):
        parts.append(f"[red]stuck: {', '.join(summary['stuck'])}[/red]")
    ok = not summary.get("throttled") and not summary.get("stuck")
    return ("[green]ok[/green] " if ok else "") + " ".join(parts)


def _parse_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {pair!r}: expected KEY=VALUE")
        try:
            out[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out[key] = raw
    return out


def cmd_command(client: FleetClient, args: argparse.Namespace) -> int:
    cargs = _parse_args(args.args)
    if args.group:
        members = [d.id for d in client.members(args.group)]
        cid = client.send(None, args.name, cargs, group=args.group)
        finals = client.responses(cid, args.timeout, expect=max(len(members), 1))
        _print_json(finals)
        missing = sorted(set(members) - {f.get("device_id") for f in finals})
        if missing:
            print(f"edge-fleet: no answer from {', '.join(missing)} within {args.timeout:g} s", file=sys.stderr)
        return 0 if finals and all(f.get("ok") for f in finals) and not missing else 1
    response = client.command(args.device, args.name, cargs, args.timeout)
    _print_json(response)
    return 0 if response.get("ok") else 1


def shadow_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--shadow`` and its policy options as the deploy command's ``shadow`` object (None without
    ``--shadow``), checked by the contract's model. Raises UsageError."""
    from pydantic import ValidationError

    from cloud_sync.mqtt.contract import ShadowArgs

    given = {k: getattr(args, k) for k in SHADOW_OPTIONS if getattr(args, k) is not None}
    if not args.shadow:
        if given:
            raise UsageError(f"--{next(iter(given)).replace('_', '-')} needs --shadow")
        return None
    try:
        return ShadowArgs.model_validate(given).model_dump(exclude_none=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None


def cmd_deploy(client: FleetClient, args: argparse.Namespace) -> int:
    model, sep, version = args.target.partition("@")
    if not sep or not version.isdigit():
        raise UsageError(f"{args.target!r}: expected MODEL@VERSION")
    shadow = args.shadow_args
    if args.to:
        targets = [args.to]
    else:
        targets = [d.id for d in client.members(args.group) if d.online]
        if not targets:
            raise FleetError(f"no online device in group '{args.group}'")

    def progress(kind: str, info: dict[str, Any]) -> None:
        if kind == "wave":
            print(f"wave {info['index'] + 1}: deploying {model}@{version} to {', '.join(info['devices'])}", flush=True)
        elif kind == "response":
            result: dict[str, Any] = info["result"] if isinstance(info.get("result"), dict) else {}
            state = (result.get("state") or info.get("status") if info.get("ok")
                     else f"failed ({(info.get('error') or {}).get('message')})")
            print(f"  {info['device']}: {state}", flush=True)
        elif kind == "aborted":
            print(f"rollout aborted: {len(info['failed'])} failed; not contacted: {', '.join(info['skipped'])}",
                  flush=True)

    deploy_args: dict[str, Any] = {"model": model, "version": int(version)}
    if shadow is not None:
        deploy_args.update({"mode": "shadow", "shadow": shadow} if shadow else {"mode": "shadow"})
    report = rollout(client, targets, "deploy", deploy_args, canary=args.canary,
                     wave_size=args.wave_size, abort_after=args.abort_after, timeout=args.timeout, progress=progress)
    print(f"succeeded: {len(report.succeeded)}, failed: {len(report.failed)}, skipped: {len(report.skipped)}")
    return 0 if report.ok else 1


def cmd_watch(client: FleetClient, args: argparse.Namespace) -> int:
    base = f"{client.prefix}/devices/{args.device}"
    kinds = [k for k in ("results", "telemetry", "events", "state") if getattr(args, k)] or ["results", "telemetry",
                                                                                            "events"]
    topics = [f"{base}/results/#" if k == "results" else f"{base}/{k}" for k in kinds]
    client.subscribe(topics)
    for seen, msg in enumerate(client.messages(args.timeout if args.timeout else 10**9), start=1):
        leaf = msg.topic[len(base) + 1:]
        sys.stdout.write(f"{leaf} {msg.payload.decode(errors='replace')}\n")
        sys.stdout.flush()
        if args.count and seen >= args.count:
            break
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-fleet", description="Fleet console for edge-agent devices.", epilog=EPILOG)
    p.add_argument("--verbose", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker_args = add_broker_args

    dev = sub.add_parser("devices", help="devices from retained state: online, last seen, models")
    broker_args(dev)
    dev.add_argument("--wait", type=float, default=1.0, help="seconds to collect state messages (default 1)")
    dev.add_argument("--json", action="store_true")

    com = sub.add_parser("command", help="send a command and print the response")
    broker_args(com)
    com.add_argument("--group", help="send to every member of this group instead of one DEVICE")
    com.add_argument("words", nargs="+", metavar="[DEVICE] NAME [KEY=VALUE ...]",
                     help="device id (unless --group), command name (ping, status, deploy, rollback, reload, "
                          "shadows, promote, discard, set-config, stream-start, stream-stop, logs) and its "
                          "arguments (JSON values allowed)")
    com.add_argument("--timeout", type=float, default=30.0)

    dep = sub.add_parser("deploy", help="staged rollout of MODEL@VERSION to a device or group")
    broker_args(dep)
    dep.add_argument("target", metavar="MODEL@VERSION")
    to = dep.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", help="one device")
    to.add_argument("--group", help="every online member of a group")
    dep.add_argument("--canary", default="1", help="first wave: a count or a percentage like 10%% (default 1)")
    dep.add_argument("--wave-size", type=int, help="devices per later wave (default: all the rest)")
    dep.add_argument("--abort-after", type=int, default=1, help="stop after this many failures (default 1)")
    dep.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each wave")
    dep.add_argument("--via-server", metavar="URL", help="let the fleet service run the rollout (persisted, "
                                                         "resumable; see docs/fleet-server.md) and follow it")
    dep.add_argument("--token", help="API token of an operator for --via-server (env EDGE_FLEET_TOKEN)")
    sha = dep.add_argument_group("shadow deployment (docs/shadow.md)")
    sha.add_argument("--shadow", action="store_true", help="run beside the serving version until promoted or "
                                                           "discarded, instead of swapping it in")
    sha.add_argument("--sample", type=float, help="share of the live traffic mirrored (0 < F <= 1)")
    sha.add_argument("--min-samples", type=int, help="samples compared before the policy decides")
    sha.add_argument("--min-agreement", type=float, help="policy: discard below this agreement (0..1)")
    sha.add_argument("--max-latency-ratio", type=float, help="policy: discard when shadow p50 / serving p50 is over")

    rol = sub.add_parser("rollout", help="promote or discard the shadows of a fleet-service shadow rollout",
                         epilog=EPILOG)
    rol.add_argument("action", choices=("promote", "discard"))
    rol.add_argument("deployment", metavar="DEPLOYMENT", help="the deployment id (printed by deploy --via-server)")
    rol.add_argument("--server", metavar="URL", help="the fleet service, e.g. http://127.0.0.1:8080 "
                                                     "(env EDGE_FLEET_SERVER)")
    rol.add_argument("--token", help="API token of an operator (env EDGE_FLEET_TOKEN)")
    rol.add_argument("--timeout", type=float, default=600.0,
                     help="seconds to follow the devices' answers (default 600; 0: do not wait)")
    rol.set_defaults(fleet_handler=_rollout_action)

    wat = sub.add_parser("watch", help="print a device's results, telemetry and events as they arrive")
    broker_args(wat)
    wat.add_argument("device")
    for kind in ("results", "telemetry", "events", "state"):
        wat.add_argument(f"--{kind}", action="store_true", help=f"show {kind}")
    wat.add_argument("--count", type=int, help="stop after this many messages")
    wat.add_argument("--timeout", type=float, help="stop after this many seconds")

    try:  # keys, bundle, publish, serve
        bundles_cli = importlib.import_module("cloud_sync.fleet.bundles_cli")
    except ModuleNotFoundError as exc:  # an install without the fleet extra: say so when they are used
        if (exc.name or "").split(".")[0] not in FLEET_EXTRA:
            raise
        for name in ("keys", "bundle", "publish", "serve"):
            cmd = sub.add_parser(name, help="(needs the fleet extra)", add_help=False, prefix_chars="\0")
            cmd.add_argument("rest", nargs=argparse.REMAINDER)
            cmd.set_defaults(missing=exc.name)
    else:
        bundles_cli.add_commands(sub)
    from cloud_sync.fleet.server import cli as server_cli  # argparse only: the fleet extra loads on use

    server_cli.add_commands(sub, broker_args)
    from cloud_sync.fleet import simulate_cli, upload_cli  # argparse only; each handler imports what it needs

    simulate_cli.add_command(sub, broker_args)
    upload_cli.add_command(sub)
    return p


def _rollout_action(args: argparse.Namespace) -> int:
    import os

    from cloud_sync.fleet import server_deploy

    args.server = args.server or os.environ.get("EDGE_FLEET_SERVER")
    if not args.server:
        print("edge-fleet: error: rollout needs --server URL (or $EDGE_FLEET_SERVER)", file=sys.stderr)
        return 2
    try:
        return server_deploy.act(args)
    except FleetError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


MQTT_COMMANDS = {"devices": cmd_devices, "command": cmd_command, "deploy": cmd_deploy, "watch": cmd_watch}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "command":
        words = list(args.words)
        if not args.group and len(words) < 2:
            parser.error("command: give DEVICE NAME, or --group GROUP NAME")
        args.device = None if args.group else words.pop(0)
        args.name, args.args = words[0], words[1:]
    if getattr(args, "missing", None):
        print(f"edge-fleet: error: '{args.command}' needs the fleet extra (pip install 'edge-agent[fleet]'): "
              f"{args.missing} is not installed", file=sys.stderr)
        return 2
    if getattr(args, "fleet_handler", None) is not None:  # simulate, upload: they map their own errors
        return int(args.fleet_handler(args))
    if getattr(args, "server_handler", None) is not None:
        from cloud_sync.fleet.server import cli as server_cli

        return server_cli.run(args)
    try:
        if args.command == "deploy":  # checked before connecting anywhere
            args.shadow_args = shadow_options(args)
        if args.command == "deploy" and args.via_server:
            from cloud_sync.fleet import server_deploy

            model, sep, version = args.target.partition("@")
            if not sep or not version.isdigit():
                raise UsageError(f"{args.target!r}: expected MODEL@VERSION")
            return server_deploy.deploy(args, model, int(version), args.shadow_args)
        if args.command not in MQTT_COMMANDS:
            bundles_cli = importlib.import_module("cloud_sync.fleet.bundles_cli")
            return int(bundles_cli.run(args))
        settings, prefix = broker_settings(args)
        with FleetClient(settings, prefix) as client:
            return MQTT_COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in FLEET_EXTRA:
            raise
        print(f"edge-fleet: error: '{args.command}' needs the fleet extra (pip install 'edge-agent[fleet]'): "
              f"{exc.name} is not installed", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
