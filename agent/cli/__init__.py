"""``edge-agent``: the daemon and the local tools that talk to it.

Exit codes (DESIGN.md section 3): 0 ok, 1 operation failed, 2 usage or config error.
Errors are one line on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from agent.errors import AgentError, UsageError

EPILOG = "Docs: docs/cli.md. Exit codes: 0 ok, 1 operation failed, 2 usage/config error."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Edge ML agent daemon and local tools.", epilog=EPILOG)
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd ExecStart)")
    run.add_argument("--config", help="TOML config file (default: $EDGE_AGENT_CONFIG or built-in defaults)")
    run.add_argument("--models-dir", help="models directory DIR/NAME/VERSION/model.{onnx,tflite}")
    run.add_argument("--socket", help="Unix socket path for the local API")
    run.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (loopback recommended)")
    run.add_argument("--profile", help="device profile name (default: detect)")
    run.add_argument("--log-format", choices=["auto", "json", "console"])

    def client_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--socket", help="agent socket (default: from --config / environment / defaults)")
        cmd.add_argument("--tcp", metavar="HOST:PORT", help="talk to the TCP listener instead")
        cmd.add_argument("--token-file", help="bearer token for control commands over TCP "
                                              "(default: the config's api.tcp_token_file)")
        cmd.add_argument("--config", help="config file used to find the socket")
        cmd.add_argument("--json", action="store_true", help="print JSON instead of tables")
        cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent")

    client_args(sub.add_parser("status", help="agent, profile and model status"))
    client_args(sub.add_parser("models", help="loaded models with runtime, delegate and tensors"))
    stats = sub.add_parser("stats", help="where requests' time goes, per model version (mean µs)")
    client_args(stats)
    stats.add_argument("model", nargs="?", help="model name, or NAME@VERSION (default: all)")
    pred = sub.add_parser("predict", help="run a model on files (image, WAV, .npy, JSON)")
    client_args(pred)
    pred.add_argument("model", help="model name, or NAME@VERSION")
    pred.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="FILE for a single-input model, or NAME=FILE per input")
    pred.add_argument("--normalize", choices=["unit", "signed", "none"], default="unit",
                      help="image pixel scaling: [0,1], [-1,1] or raw 0..255 (default: unit)")
    pred.add_argument("--raw-output", action="store_true", help="return quantized outputs without dequantizing")

    dep = sub.add_parser("deploy", help="install a signed bundle from the configured TUF repository")
    client_args(dep)
    dep.add_argument("model", help="model name")
    dep.add_argument("--version", type=int, help="bundle version (default: the latest)")
    dep.add_argument("--no-wait", action="store_true", help="return once the deployment has started")
    dep.add_argument("--wait-timeout", type=float, default=900.0, help="seconds to follow it (default 900)")
    dep.add_argument("--shadow", action="store_true",
                     help="run it beside the serving version on a sample of live traffic instead of swapping it in")
    dep.add_argument("--sample", type=float, help="shadow: fraction of requests mirrored (default: [shadow] sample)")
    dep.add_argument("--min-samples", type=int, help="shadow policy: judge after this many compared samples")
    dep.add_argument("--min-agreement", type=float, help="shadow policy: discard under this agreement, else promote")
    dep.add_argument("--max-latency-ratio", type=float,
                     help="shadow policy: discard when shadow p50 / serving p50 is over this")
    client_args(sub.add_parser("shadows", help="running shadow versions: agreement, latency, drops"))
    for verb, text in (("promote", "swap the shadow version in (with the health window)"),
                       ("discard", "stop the shadow version and remove it")):
        cmd = sub.add_parser(verb, help=text)
        client_args(cmd)
        cmd.add_argument("model", help="model name")
        if verb == "promote":
            cmd.add_argument("--no-wait", action="store_true", help="return once the swap has started")
            cmd.add_argument("--wait-timeout", type=float, default=900.0, help="seconds to follow it (default 900)")
    rb = sub.add_parser("rollback", help="serve the previous version of a model again")
    client_args(rb)
    rb.add_argument("model", help="model name")

    det = sub.add_parser("detect", help="show detected hardware and the delegate/EP each runtime would use")
    det.add_argument("--config", help="config file (for agent.profile and agent.hardware_root)")
    det.add_argument("--root", help="read hardware facts below this directory (a tree copied from a device) "
                                    "instead of agent.hardware_root")
    det.add_argument("--profile", help="force a device profile")
    det.add_argument("--profiles-dir", help="load profiles from this directory")
    det.add_argument("--json", action="store_true", help="print JSON")

    demo = sub.add_parser("demo", help="the end-to-end demo on this machine (see README)")
    demo.add_argument("--workdir", default=".demo", help="where the demo keeps its files (default: .demo)")
    demo.add_argument("--serve", action="store_true",
                      help="after the loop, keep the devices and the fleet service (web console) up until Ctrl-C")
    demo.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                      help="the fleet service's (and console's) address (default: 127.0.0.1 on a free port)")
    return p


def _load_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Any:
    from agent.config import load_config

    return load_config(getattr(args, "config", None), overrides=overrides)


def _client(args: argparse.Namespace) -> Any:
    from agent.client import AgentClient

    if args.tcp:
        token_file = args.token_file or _load_config(args).api.tcp_token_file
        try:
            token = Path(token_file).read_text().strip() if token_file else None
        except OSError as exc:
            raise UsageError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        return AgentClient(tcp=args.tcp, timeout=args.timeout, token=token)
    path = args.socket or _load_config(args).socket_path
    return AgentClient(path, timeout=args.timeout)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    # The daemon renders no terminal UI: keep rich/pygments (which structlog would pick up for
    # pretty tracebacks, ~12 MB) out of a long-running process's memory.
    for module in ("rich", "pygments"):
        sys.modules.setdefault(module, None)  # type: ignore[arg-type]
    from agent.config import with_overrides
    from agent.daemon import run
    from agent.logs import configure_logging

    flags = {"models.dir": args.models_dir, "api.socket": args.socket, "api.tcp": args.tcp,
             "agent.profile": args.profile, "logging.format": args.log_format}
    config = _load_config(args, flags)
    configure_logging(config.logging.level, config.logging.format)  # so a discarded overrides file is logged alike
    # set by the fleet with set-config; an unusable file is moved aside, never fatal
    config = with_overrides(config, lambda remote: _load_config(
        args, {**remote, **{k: v for k, v in flags.items() if v is not None}}))
    configure_logging(config.logging.level, config.logging.format)
    return run(config)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cli.tables import models_table, status_tables

    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
    elif args.command == "models":
        models_table(status, detail=True)
    else:
        status_tables(status)
    return 0


def _model_ref(ref: str) -> tuple[str, int | None]:
    """NAME or NAME@VERSION."""
    name, _, ver = ref.partition("@")
    version = int(ver) if ver.isdigit() else None
    if ver and version is None:
        raise UsageError(f"bad model reference {ref!r}: expected NAME or NAME@VERSION")
    return name, version


def cmd_stats(args: argparse.Namespace) -> int:
    from agent.cli.tables import stats_table

    name, version = _model_ref(args.model) if args.model else (None, None)
    with _client(args) as client:
        stats = client.stats(name, version)
    if args.json:
        _print_json(stats)
    else:
        stats_table(stats)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from agent.cli.inputs import load_input

    name, version = _model_ref(args.model)
    with _client(args) as client:
        meta = client.model_metadata(name, version)
        specs = {m["name"]: m for m in meta["inputs"]}
        feeds = {}
        for item in args.inputs:
            key, sep, path = item.partition("=")
            if not sep:
                if len(specs) != 1:
                    raise AgentError(f"model '{name}' has inputs {', '.join(specs)}: give NAME=FILE for each")
                key, path = next(iter(specs)), item
            if key not in specs:
                raise AgentError(f"model '{name}' has no input '{key}' (inputs: {', '.join(specs)})")
            feeds[key] = load_input(Path(path), specs[key], args.normalize)
        outputs = client.infer(name, feeds, version=version, raw_output=args.raw_output)
    if args.json:
        _print_json(dict(outputs))
        return 0
    for out_name, value in outputs.items():
        flat = value.reshape(-1)
        preview = ", ".join(f"{x:.6g}" for x in flat[:8]) + (", ..." if flat.size > 8 else "")
        stats = f" min={flat.min():.6g} max={flat.max():.6g}" if flat.size > 8 else ""
        print(f"{out_name} {value.dtype}{list(value.shape)}: [{preview}]{stats}")
    return 0


def _shadow_body(args: argparse.Namespace) -> dict[str, Any]:
    if not args.shadow:
        given = [f for f in ("sample", "min_samples", "min_agreement", "max_latency_ratio")
                 if getattr(args, f) is not None]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} applies to --shadow only")
        return {}
    policy = {f: getattr(args, f) for f in ("sample", "min_samples", "min_agreement", "max_latency_ratio")
              if getattr(args, f) is not None}
    return {"mode": "shadow", **({"shadow": policy} if policy else {})}


def cmd_deploy(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = orjson.dumps({"version": args.version, **_shadow_body(args)})
        status, _, data = client.request("POST", f"/v1/agent/models/{args.model}:deploy", body)
        started = client._decode(status, data)
        if args.no_wait:
            print(f"deployment {started['id']} of {args.model} started")
            return 0
        return _follow(client, args.model, started["id"], args.wait_timeout, shadow=args.shadow)


def _follow(client: Any, model: str, deployment: str, timeout: float, *, shadow: bool = False,
            seen: int = 0) -> int:
    """Print a deployment's steps until it ends (or, for a shadow, until it mirrors)."""
    import time

    ends = ("committed", "rolled_back", "failed", "discarded", *(("shadowing",) if shadow else ()))
    with client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, data = client.request("GET", f"/v1/agent/deployments/{model}")
            record = client._decode(status, data)
            if record.get("id") != deployment:
                raise AgentError(f"another deployment of {model} replaced this one: {record.get('id')}")
            for state, _ts in record["history"][seen:]:
                print(f"{model}@{record.get('version') or '?'}: {state}", flush=True)
            seen = len(record["history"])
            if record["state"] in ends and not record.get("running"):
                if record.get("error"):
                    raise AgentError(f"{record['state']}: {record['error']['code']}: {record['error']['message']}")
                if record["state"] == "shadowing":
                    print(f"{model}@{record.get('version')} runs as a shadow of version {record.get('previous')}: "
                          f"see `edge-agent shadows`, then `edge-agent promote|discard {model}`")
                return 0
            time.sleep(0.25)
    raise AgentError(f"the deployment did not finish within {timeout:g} s (it goes on in the agent)")


def cmd_shadows(args: argparse.Namespace) -> int:
    from agent.cli.tables import shadows_table

    with _client(args) as client:
        status, _, data = client.request("GET", "/v1/agent/shadows")
        shadows = client._decode(status, data)["shadows"]
    if args.json:
        _print_json(shadows)
    elif shadows:
        shadows_table(shadows)
    else:
        print("no shadow versions running")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    client = _client(args)
    with client:
        status, _, data = client.request("POST", f"/v1/agent/models/{args.model}:promote", b"")
        record = client._decode(status, data)
    print(f"{args.model}@{record.get('version')}: promoting (was a shadow of version {record.get('previous')})",
          flush=True)
    if args.no_wait:
        return 0
    return _follow(client, args.model, record["id"], args.wait_timeout, seen=len(record["history"]))


def cmd_discard(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status, _, data = client.request("POST", f"/v1/agent/models/{args.model}:discard", b"")
        result = client._decode(status, data)
    if args.json:
        _print_json(result)
        return 0
    shadow = result.get("shadow") or {}
    print(f"{args.model}@{result['version']}: discarded after {shadow.get('compared', 0)} compared samples "
          f"(agreement {shadow.get('agreement')})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status, _, data = client.request("POST", f"/v1/agent/models/{args.model}:rollback", b"")
        result = client._decode(status, data)
    print(f"{result['model']}: now serving version {result['to']} (version {result['from']} set aside)")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from agent.cli.tables import detect_tables
    from agent.hardware import detect, load_profiles, select_profile
    from agent.hardware.plan import plan
    from agent.runtimes import BACKENDS

    config = _load_config(args)
    # The configured root is this device's own (``/``, or the host's tree mounted into a container), so
    # its runtimes decide; ``--root`` is a tree copied from another device, for which they cannot.
    on_device = args.root is None
    hw = detect(args.root or config.agent.hardware_root)
    profiles = load_profiles(args.profiles_dir)
    choice = select_profile(hw, profiles, args.profile or config.agent.profile)
    backends = {name: cls() for name, cls in BACKENDS.items()}
    runtimes = []
    for name, backend in backends.items():
        try:
            version = backend.version()
            spec, skipped = backend.choose(choice.profile.runtimes.get(name, ()))
            why = "first usable in profile" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
            runtimes.append({"runtime": name, "version": version, "delegate": spec.name, "why": why})
        except AgentError as exc:
            runtimes.append({"runtime": name, "version": "-", "delegate": "unavailable", "why": str(exc)})
    probes = {name: backend.probe for name, backend in backends.items()} if on_device else None
    device_plan = plan(hw, choice, profiles, probes).to_dict()
    report = {"hardware": hw.to_dict(), "profile": choice.profile.name, "reason": choice.reason,
              "accelerators": device_plan["accelerators"], "formats": device_plan["formats"],
              "plan_checked_by": device_plan["checked_by"], "runtimes": runtimes,
              "runtimes_checked_on": "this device" if on_device else "this machine, not the device the tree is from"}
    if args.json:
        _print_json(report)
    else:
        detect_tables(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.cli.demo import run_demo

    return run_demo(Path(args.workdir), serve=args.serve, listen=args.listen)


COMMANDS = {"run": cmd_run, "status": cmd_status, "models": cmd_status, "predict": cmd_predict, "stats": cmd_stats,
            "detect": cmd_detect, "demo": cmd_demo, "deploy": cmd_deploy, "rollback": cmd_rollback,
            "shadows": cmd_shadows, "promote": cmd_promote, "discard": cmd_discard}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "run":  # local tools: only warnings, on stderr, never mixed into stdout
        from agent.logs import configure_logging

        configure_logging("debug" if args.verbose else "warning", "console")
    try:
        return COMMANDS[args.command](args)
    except AgentError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
