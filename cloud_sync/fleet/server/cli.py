"""``edge-fleet server`` and ``edge-fleet server token create|list|revoke``: argparse wiring and handlers.

Importing this module costs nothing beyond argparse: the fleet extra (FastAPI, SQLAlchemy, ...) is
imported only when a server command runs, so ``edge-fleet`` works on an install without it. Errors
are mapped here once: config/usage errors exit 2, other fleet-service errors exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

EPILOG = ("Docs: docs/fleet-server.md. The API address is printed on start; SIGTERM or SIGINT stop it cleanly. "
          "Exit codes: 0 ok, 1 failed, 2 usage/config error.")
_ROLES = ("viewer", "operator", "admin")


def _db_args(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument("--db", default=default,
                        help="sqlite:///FILE (default: <state dir>/fleet.db) or postgresql://USER:PASS@HOST/DB")
    parser.add_argument("--state-dir", dest="state_dir", default=default,
                        help="default $STATE_DIRECTORY or ~/.local/state/edge-fleet")


def add_commands(subparsers: Any, broker_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``server`` (with ``token``) on the main ``edge-fleet`` parser."""
    srv = subparsers.add_parser("server", help="the fleet service: MQTT ingestion into a database, REST API",
                                description="Run the fleet service: store what devices send (shared MQTT 5 "
                                            "subscription) in SQLite or PostgreSQL and serve the REST API.",
                                epilog=EPILOG)
    broker_args(srv)
    _db_args(srv)
    srv.add_argument("--listen", help="HOST:PORT of the API (default 127.0.0.1:8080; port 0 picks a free one)")
    srv.set_defaults(server_handler=cmd_run)
    actions = srv.add_subparsers(dest="server_command", metavar="ACTION")
    tok = actions.add_parser("token", help="API tokens (stored hashed; shown once)", epilog=EPILOG)
    tok_sub = tok.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = tok_sub.add_parser("create", help="create a token and print it (once) on stdout")
    create.add_argument("--role", required=True, choices=_ROLES,
                        help="viewer: read; operator: + commands, deploys; admin: + uploads, tokens")
    create.add_argument("--name", help="who or what uses it (default: the role)")
    create.add_argument("--expires-days", type=float, help="lifetime in days (default: no expiry)")
    create.set_defaults(server_handler=cmd_token_create)
    listing = tok_sub.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.set_defaults(server_handler=cmd_token_list)
    revoke = tok_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(server_handler=cmd_token_revoke)
    for sub in (create, listing, revoke):  # also accepted after the action; SUPPRESS keeps the server-level value
        sub.add_argument("--config", default=argparse.SUPPRESS, help="TOML file with a [server] table")
        _db_args(sub, default=argparse.SUPPRESS)


def _settings(args: argparse.Namespace, *, with_broker: bool) -> Any:
    from cloud_sync.fleet.server.config import load_settings

    broker = prefix = None
    if with_broker:
        from cloud_sync.fleet.options import broker_settings

        broker, prefix = broker_settings(args)
    return load_settings(args.config, overrides={"db": args.db, "state_dir": args.state_dir,
                                                 "listen": getattr(args, "listen", None)},
                         broker=broker, prefix=prefix)


def cmd_run(args: argparse.Namespace) -> int:
    from cloud_sync.fleet.server.service import configure_logging, run_server

    settings = _settings(args, with_broker=True)
    configure_logging("debug" if args.verbose else settings.log_level, settings.log_format)

    def ready(url: str) -> None:
        print(f"edge-fleet server: API at {url}/api (OpenAPI {url}/api/openapi.json, docs {url}/api/docs)",
              flush=True)
        print(f"edge-fleet server: console at {url}/ (log in with an API token: edge-fleet server token create "
              "--role viewer|operator|admin)", flush=True)

    asyncio.run(run_server(settings, ready=ready))
    return 0


def _tokens(args: argparse.Namespace) -> Any:
    from cloud_sync.fleet.server.auth import TokenStore
    from cloud_sync.fleet.server.db import Database
    from cloud_sync.fleet.server.service import configure_logging

    settings = _settings(args, with_broker=False)
    configure_logging("warning", settings.log_format)
    db = Database(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms, pool_size=1)
    db.migrate()
    return TokenStore(db)


def cmd_token_create(args: argparse.Namespace) -> int:
    store = _tokens(args)
    expires = args.expires_days * 86400 if args.expires_days is not None else None
    token, record = store.create(args.role, args.name or args.role, expires_in_s=expires)
    print(token, flush=True)
    print(f"edge-fleet: token {record['id']} '{record['name']}' ({record['role']}); it is shown only now",
          file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    import orjson

    sys.stdout.write(orjson.dumps(_tokens(args).list(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    _tokens(args).revoke(args.id)
    print(f"edge-fleet: token {args.id} revoked", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the parsed server command; one line on stderr for an error."""
    try:
        from cloud_sync.fleet.server.errors import FleetServerError
    except ImportError as exc:  # the fleet extra is missing
        print(f"edge-fleet: error: the server needs the fleet extra (pip install 'edge-agent[fleet]'): {exc}",
              file=sys.stderr)
        return 2
    from cloud_sync.fleet.options import UsageError

    try:
        return int(args.server_handler(args))
    except UsageError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    except FleetServerError as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
