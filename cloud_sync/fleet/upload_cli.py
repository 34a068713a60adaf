"""``edge-fleet upload``: send a model to the fleet service (``POST /api/models``), or publish it
straight into a local repository directory with ``--repo`` (the same pipeline, in-process).

Exit codes: 0 published, 1 refused (one line: ``code: message``), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

EPILOG = ("Docs: docs/model-upload.md. Exit codes: 0 published, 1 refused or failed, 2 usage error. "
          "Environment: EDGE_FLEET_SERVER, EDGE_FLEET_TOKEN.")


class UsageError(Exception):
    """Bad flags: exit 2."""


def add_command(sub: Any) -> None:
    """Register ``upload`` on the main parser's subparsers."""
    p = sub.add_parser("upload", help="upload a model (ONNX, TFLite or .tar.gz) and publish it as a signed bundle",
                       description="Validate a model (it must load in ONNX Runtime or LiteRT), build its bundle with "
                                   "a test vector, sign it with the repository's online keys and publish it. "
                                   "Through the fleet service (--server) or into a local repository (--repo).",
                       epilog=EPILOG)
    p.add_argument("file", type=Path, metavar="FILE", help="model.onnx, model.tflite or a .tar.gz holding one model "
                                                           "plus optional manifest.json fields and files")
    p.add_argument("--name", required=True, help="model name (a-z, 0-9, '.', '_', '-')")
    p.add_argument("--version", required=True, help="positive integer; published versions are immutable")
    p.add_argument("--pre", metavar="JSON|@FILE", help="preprocessing object, e.g. '{\"type\": \"image\"}'")
    p.add_argument("--post", metavar="JSON|@FILE", help="postprocessing object")
    p.add_argument("--test-input", type=Path, metavar="FILE",
                   help=".npy (single-input model) or .npz (one array per input name): recorded as a test vector")
    p.add_argument("--description")
    p.add_argument("--rtol", type=float, help="test vector relative tolerance (default 1e-4)")
    p.add_argument("--atol", type=float, help="test vector absolute tolerance (default 1e-5)")
    p.add_argument("--json", action="store_true", help="print the published bundle as JSON")
    where = p.add_argument_group("destination (one of)")
    where.add_argument("--server", help="fleet service URL, e.g. http://127.0.0.1:8080 (env EDGE_FLEET_SERVER)")
    where.add_argument("--token", help="API token with the admin role (env EDGE_FLEET_TOKEN)")
    where.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the service (default 600)")
    where.add_argument("--repo", type=Path, help="publish into this repository directory instead (local mode)")
    where.add_argument("--keys", type=Path, help="with --repo: keys directory holding the online keys")
    p.set_defaults(fleet_handler=run)


def _json_arg(value: str | None, flag: str) -> str | None:
    """The JSON text of ``--pre``/``--post``: inline, or ``@FILE``."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as exc:
        raise UsageError(f"{flag} {value}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from cloud_sync.fleet.clilog import stderr_logging

    # stdout carries the result (--json); library logs go to stderr, warnings and up unless --verbose
    with stderr_logging("info" if getattr(args, "verbose", False) else "warning"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if not args.file.is_file():
            raise UsageError(f"{args.file}: no such file")
        if args.test_input is not None and not args.test_input.is_file():
            raise UsageError(f"--test-input {args.test_input}: no such file")
        pre, post = _json_arg(args.pre, "--pre"), _json_arg(args.post, "--post")
        server = args.server or os.environ.get("EDGE_FLEET_SERVER")
        if args.repo is not None:
            if args.keys is None:
                raise UsageError("--repo needs --keys (a keys directory with the online keys)")
            result = _local(args, pre, post)
        elif server:
            result = _remote(args, server, pre, post)
        else:
            raise UsageError("give --server URL (or EDGE_FLEET_SERVER), or --repo DIR --keys DIR")
    except UsageError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    except _RefusedError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print(f"published {result['name']}@{result['version']} ({result['runtime']}) as {result['target']} "
              f"({result['length']} bytes, sha256 {result['sha256']}, {result['test_vectors']} test vector(s))")
    return 0


class _RefusedError(Exception):
    """The upload was refused or failed: exit 1 with ``code: message``."""


def _local(args: argparse.Namespace, pre: str | None, post: str | None) -> dict[str, Any]:
    from cloud_sync.errors import CloudSyncError
    from cloud_sync.fleet.publishing import publish_upload
    from cloud_sync.repo import Repository

    tolerances = {k: getattr(args, k) for k in ("rtol", "atol") if getattr(args, k) is not None}
    try:
        published = publish_upload(Repository(args.repo, args.keys), args.file, args.name, args.version, pre=pre,
                                   post=post, test_input=args.test_input, filename=args.file.name,
                                   description=args.description, **tolerances)
    except CloudSyncError as exc:
        raise _RefusedError(f"{exc.code}: {exc}") from None
    return published.to_dict()


def _remote(args: argparse.Namespace, server: str, pre: str | None, post: str | None) -> dict[str, Any]:
    try:
        import httpx
    except ImportError:
        raise UsageError("--server needs httpx: pip install 'edge-agent[fleet]'") from None
    token = args.token or os.environ.get("EDGE_FLEET_TOKEN")
    if not token:
        raise UsageError("--server needs --token (or EDGE_FLEET_TOKEN): an API token with the admin role")
    data = {"name": args.name, "version": str(args.version)}
    for key, value in (("pre", pre), ("post", post), ("description", args.description), ("rtol", args.rtol),
                       ("atol", args.atol)):
        if value is not None:
            data[key] = str(value)
    url = server.rstrip("/") + "/api/models"
    with contextlib.ExitStack() as stack:
        files = {"file": (args.file.name, stack.enter_context(args.file.open("rb")), "application/octet-stream")}
        if args.test_input is not None:
            files["test_input"] = (args.test_input.name, stack.enter_context(args.test_input.open("rb")),
                                   "application/octet-stream")
        try:
            response = httpx.post(url, data=data, files=files, headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(args.timeout, connect=10.0))
        except httpx.HTTPError as exc:
            raise _RefusedError(f"cannot reach the fleet service at {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 201 and isinstance(body, dict):
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        raise _RefusedError(f"{error.get('code')}: {error.get('message')} (HTTP {response.status_code})")
    raise _RefusedError(f"HTTP {response.status_code}: {response.text[:200]}")
