"""``edge-fleet keys|bundle|publish|serve``: argparse wiring and handlers for signed bundles.

The main ``edge-fleet`` parser calls :func:`add_commands` and then :func:`run` for parsed
arguments that carry a ``bundles_handler``; :func:`main` builds a parser with only these
commands (used by tests). Errors are mapped once here: cloud_sync errors exit 1 with one
line on stderr, usage errors exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from cloud_sync.bundles import build_bundle, generate_test_vectors
from cloud_sync.bundles.build import Runner, find_model, runtime_for
from cloud_sync.errors import CloudSyncError
from cloud_sync.fleet.modelcheck import LoadedModel, load_model
from cloud_sync.fleet.options import UsageError
from cloud_sync.repo import ONLINE_ROLES, ROLES, Repository, RoleKeys, make_server

log = structlog.get_logger(__name__)

EPILOG = "Exit codes: 0 ok, 1 operation failed, 2 usage/config error."


def _pairs(values: Sequence[str] | None, what: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = cast(raw)
        except ValueError:
            raise UsageError(f"{what}: bad value in {item!r}") from None
    return out


def _roles(values: Sequence[str] | None, what: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    out = _pairs(values, what, cast)
    for role in out:
        if role not in ROLES:
            raise UsageError(f"{what}: unknown role {role!r} (roles: {', '.join(ROLES)})")
    return out


def _expiry(values: Sequence[str] | None) -> dict[str, timedelta]:
    return {role: timedelta(days=days) for role, days in _roles(values, "--expires", float).items()}


def _role_keys(args: argparse.Namespace, roles: Sequence[str], current: Mapping[str, RoleKeys]) -> dict[str, RoleKeys]:
    counts = _roles(args.num_keys, "--num-keys", int)
    thresholds = _roles(args.threshold, "--threshold", int)
    out = {}
    for role in roles:
        base = current.get(role, RoleKeys())
        try:
            out[role] = RoleKeys(counts.get(role, base.count), thresholds.get(role, base.threshold))
        except CloudSyncError as exc:
            raise UsageError(f"{role}: {exc}") from None
    return out


@contextlib.contextmanager
def _progress(text: str) -> Iterator[None]:
    """A spinner on a terminal; nothing when piped."""
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(text):
            yield
    else:
        yield


# -- handlers --------------------------------------------------------------------------------

def cmd_keys_init(args: argparse.Namespace) -> int:
    roles = _role_keys(args, ROLES, {})
    with _progress("generating keys"):
        repo = Repository.init(args.repo, args.keys, roles=roles, expiry=_expiry(args.expires))
    print(f"initialised {repo.dir} (root v1); private keys in {repo.keys.dir}")
    print(f"provision devices with {repo.metadata_dir / '1.root.json'}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    repo = Repository(args.repo, args.keys)
    root = repo.root().signed
    current = {r: RoleKeys(len(root.roles[r].keyids), root.roles[r].threshold) for r in ROLES}
    roles = _role_keys(args, args.role or ["root"], current)
    with _progress("rotating keys"):
        version = repo.rotate(roles=roles, expiry=_expiry(args.expires))
    print(f"rotated {', '.join(roles)}: root is now v{version}")
    return 0


def cmd_keys_export_online(args: argparse.Namespace) -> int:
    repo = Repository(args.repo, args.keys)
    repo.root()  # there must be a repository these keys sign
    copied = repo.keys.export(args.out, ONLINE_ROLES)
    online = Repository(args.repo, args.out).online_keys()
    print(f"exported {len(copied)} online keys ({', '.join(f'{r}: {n}' for r, n in online.items())}) to {args.out}; "
          "no root key: keep the root keys offline")
    return 0


def _load(model_path: Path, runtime: str | None) -> LoadedModel:
    """The model on the runtime's own package, following the device's conventions (modelcheck)."""
    return load_model(model_path, runtime or runtime_for(model_path))


def cmd_bundle_build(args: argparse.Namespace) -> int:
    model = Path(args.model)
    extra: dict[str, Any] = {}
    if args.manifest:
        try:
            extra = json.loads(Path(args.manifest).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--manifest {args.manifest}: {exc}") from None
        if not isinstance(extra, dict):
            raise UsageError(f"--manifest {args.manifest}: must hold a JSON object")
    files = [Path(f) for f in args.file or ()]
    if args.labels:
        files.append(Path(args.labels))
        extra["labels"] = Path(args.labels).name
    feeds = {name: np.load(path, allow_pickle=False) for name, path in _pairs(args.test_input, "--test-input",
                                                                                str).items()}
    vectors = None
    model_file = find_model(model) if model.is_dir() else model
    if feeds or args.describe:
        with _progress("loading the model"):
            session = _load(model_file, args.runtime)
        for key, specs in (("inputs", session.inputs), ("outputs", session.outputs)):
            extra.setdefault(key, [spec.spec() for spec in specs])
        if feeds:
            runner: Runner = lambda _path, f: session.run(f)  # noqa: E731
            vectors = generate_test_vectors(model_file, feeds, runner, rtol=args.rtol, atol=args.atol)
    with _progress("writing the bundle"):
        out = build_bundle(model, Path(args.out), name=args.name, version=args.version, runtime=args.runtime,
                           files=files, manifest_extra=extra, test_vectors=vectors, compress=not args.no_compress)
    print(out)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    repo = Repository(args.repo, args.keys)
    with _progress(f"publishing {args.bundle}"):
        target = repo.publish(Path(args.bundle), expiry=_expiry(args.expires))
    print(f"published {target.path} ({target.length} bytes, sha256 {target.hashes['sha256']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not (Path(args.repo) / "metadata").is_dir():
        raise UsageError(f"--repo {args.repo}: no metadata/ directory (run 'edge-fleet keys init')")
    server = make_server(Path(args.repo), args.host, args.port)
    print(f"serving {server.root} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# -- wiring ----------------------------------------------------------------------------------

def _repo_args(parser: argparse.ArgumentParser, *, keys: bool = True) -> None:
    parser.add_argument("--repo", required=True, type=Path, help="repository directory (published as is)")
    if keys:
        parser.add_argument("--keys", required=True, type=Path,
                            help="private keys directory (never inside --repo, never published)")


def _key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-keys", action="append", metavar="ROLE=N", help="keys for a role (default 1)")
    parser.add_argument("--threshold", action="append", metavar="ROLE=N", help="signatures a role needs (default 1)")
    parser.add_argument("--expires", action="append", metavar="ROLE=DAYS",
                        help="expiry per role (defaults: root 365, targets 90, snapshot 30, timestamp 7)")


def add_commands(subparsers: Any) -> None:
    """Register ``keys``, ``bundle``, ``publish`` and ``serve`` on an ``add_subparsers()`` object."""
    keys = subparsers.add_parser("keys", help="TUF key management (init, rotate, export-online)", epilog=EPILOG)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = keys_sub.add_parser("init", help="create Ed25519 keys and an empty signed repository", epilog=EPILOG)
    _repo_args(init)
    _key_args(init)
    init.set_defaults(bundles_handler=cmd_keys_init)
    rotate = keys_sub.add_parser("rotate", help="replace role keys in a new root that devices follow", epilog=EPILOG)
    _repo_args(rotate)
    rotate.add_argument("--role", action="append", choices=ROLES, help="role to rotate (repeatable; default root)")
    _key_args(rotate)
    rotate.set_defaults(bundles_handler=cmd_keys_rotate)
    export = keys_sub.add_parser("export-online", epilog=EPILOG,
                                 help="copy the online keys (targets, snapshot, timestamp) to a new directory for "
                                      "the fleet service; the root key stays offline")
    _repo_args(export)
    export.add_argument("--out", required=True, type=Path, help="new keys directory (must not hold keys yet)")
    export.set_defaults(bundles_handler=cmd_keys_export_online)

    bundle = subparsers.add_parser("bundle", help="build a model bundle", epilog=EPILOG)
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    build = bundle_sub.add_parser("build", help="write NAME-VERSION.bundle from a model file or directory",
                                  epilog=EPILOG)
    build.add_argument("model", metavar="MODEL_DIR|MODEL_FILE")
    build.add_argument("--name", required=True, help="model name (a-z, 0-9, '.', '_', '-')")
    build.add_argument("--version", required=True, type=int, help="positive integer version")
    build.add_argument("--runtime", choices=("onnx", "tflite"), help="default: from the model file suffix")
    build.add_argument("--file", action="append", metavar="FILE", help="extra file to include (repeatable)")
    build.add_argument("--labels", metavar="FILE", help="labels file (included and named in the manifest)")
    build.add_argument("--manifest", metavar="JSON", help="JSON file with more manifest fields (pre/post-processing, "
                       "constraints, inputs/outputs, test_vectors)")
    build.add_argument("--test-input", action="append", metavar="NAME=FILE.npy",
                       help="run the model on these inputs and record a test vector (repeat per input)")
    build.add_argument("--rtol", type=float, default=1e-4, help="test vector relative tolerance")
    build.add_argument("--atol", type=float, default=1e-5, help="test vector absolute tolerance")
    build.add_argument("--describe", action="store_true",
                       help="load the model (ONNX Runtime / LiteRT, CPU) to record its input/output specs "
                            "(implied by --test-input)")
    build.add_argument("--out", default=".", help="output directory (default: current)")
    build.add_argument("--no-compress", action="store_true", help="plain tar instead of tar.gz")
    build.set_defaults(bundles_handler=cmd_bundle_build)

    publish = subparsers.add_parser("publish", help="add a bundle to the TUF repository and re-sign", epilog=EPILOG)
    publish.add_argument("bundle", metavar="BUNDLE")
    _repo_args(publish)
    publish.add_argument("--expires", action="append", metavar="ROLE=DAYS", help="expiry per role, in days")
    publish.set_defaults(bundles_handler=cmd_publish)

    serve = subparsers.add_parser("serve", help="serve the repository over HTTP with Range support (development)",
                                  epilog=EPILOG)
    _repo_args(serve, keys=False)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.set_defaults(bundles_handler=cmd_serve)


def run(args: argparse.Namespace) -> int:
    """Run the handler of parsed ``args``; map errors to exit codes and one line on stderr."""
    try:
        return int(args.bundles_handler(args))
    except UsageError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    except CloudSyncError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        if getattr(args, "verbose", False):
            log.exception("fleet.command_failed", code=exc.code)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. runtime errors while generating vectors
        print(f"edge-fleet: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """A parser with only the bundle commands (tests, and ``python -m cloud_sync.fleet.bundles_cli``)."""
    parser = argparse.ArgumentParser(prog="edge-fleet", description="Signed model bundles.", epilog=EPILOG)
    parser.add_argument("--verbose", action="store_true", help="details on errors")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run(args)


if __name__ == "__main__":
    # Logging is the host CLI's business; standalone, keep stdout for results.
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    sys.exit(main())
