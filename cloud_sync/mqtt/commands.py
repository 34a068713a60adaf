"""Commands from the fleet: parse and validate, run each id at most once, answer exactly once.

Parsing is pure; the dispatcher owns idempotency (a bounded, persisted log of answered ids),
the addressee check (a payload naming another ``device_id`` is refused ``wrong_device``),
the reply address (MQTT 5 response topic + correlation data, else ``.../responses``) and the
one mapping from errors to a response's ``error.code``: an ``EdgeError`` answers with its own
stable ``code``, anything else is a bug and answers ``internal``. Arguments are validated once,
here, and handed to the handler already parsed. Long-running handlers answer ``accepted`` at
once and a final response when done.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, ValidationError

from cloud_sync.errors import CommandError, EdgeError, StoreError
from cloud_sync.mqtt.session import IncomingMessage

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Command:
    id: str
    name: str
    args: dict[str, Any]
    topic: str
    reply_topic: str | None
    correlation: bytes | None
    device_id: str | None = None  # the addressee the payload names, if it names one


Handler = Callable[[Command, Any], Awaitable[Any]]  # (command, its validated args model or None)


@dataclass(frozen=True)
class Spec:
    handler: Handler
    args: type[BaseModel] | None = None  # validates ``args``, handed to the handler; None: no arguments
    long_running: bool = False


def parse(message: IncomingMessage, max_bytes: int) -> Command:
    """Raises CommandError (code bad_request / too_large) for anything that is not a command."""
    if len(message.payload) > max_bytes:
        raise CommandError("too_large", f"command payload of {len(message.payload)} bytes exceeds {max_bytes}")
    try:
        body = orjson.loads(message.payload)
    except orjson.JSONDecodeError as exc:
        raise CommandError("bad_request", f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CommandError("bad_request", "command must be a JSON object")
    cid, name, args = body.get("id"), body.get("name"), body.get("args", {})
    if not isinstance(cid, str) or not cid or len(cid) > 128:
        raise CommandError("bad_request", "'id' must be a non-empty string of at most 128 characters")
    if not isinstance(name, str) or not name:
        raise CommandError("bad_request", "'name' must be a non-empty string")
    device_id = body.get("device_id")
    if device_id is not None and (not isinstance(device_id, str) or not device_id or len(device_id) > 256):
        raise CommandError("bad_request", "'device_id' must be a non-empty string of at most 256 characters")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError("bad_args", "'args' must be an object")
    return Command(cid, name, args, message.topic, message.response_topic, message.correlation, device_id)


def peek_id(payload: bytes) -> str | None:
    """Best-effort id of a command that failed to parse, so the error can still name it."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    cid = body.get("id") if isinstance(body, dict) else None
    return cid if isinstance(cid, str) else None


def validate_args(spec: Spec, command: Command) -> BaseModel | None:
    if spec.args is None:
        if command.args:
            raise CommandError("bad_args", f"'{command.name}' takes no arguments")
        return None
    try:
        return spec.args.model_validate(command.args)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "args"
        reason = "unknown argument" if err["type"] == "extra_forbidden" else err["msg"]
        raise CommandError("bad_args", f"args.{where}: {reason}") from None


_ANSWERED_COLUMNS = ["id", "response", "at"]


class CommandLog:
    """Answered command ids with their final response: bounded, persisted in SQLite.

    Losing it costs only idempotency for the ids it held, so after opening, a read or write
    that fails is logged and treated as "not answered" / "not stored", never raised.
    """

    def __init__(self, path: Path, keep: int = 1000) -> None:
        """Open (or create) the log at ``path``.

        Raises:
            StoreError: the file is not a command log, is corrupt or cannot be opened; it is left
                untouched (``cloud_sync.stores.open_or_replace`` moves it aside).
        """
        where = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create directory: {exc}", path=where, store="command log") from exc
        try:
            self._db = sqlite3.connect(where, check_same_thread=False, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open: {exc}", path=where, store="command log") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            names = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
            if names - {"answered"}:
                raise StoreError(f"not a command log (has {sorted(names - {'answered'})})", path=where,
                                 store="command log")
            self._db.execute("CREATE TABLE IF NOT EXISTS answered (id TEXT PRIMARY KEY, response BLOB, at REAL)")
            columns = [r[1] for r in self._db.execute("PRAGMA table_info(answered)")]
            if columns != _ANSWERED_COLUMNS:
                raise StoreError(f"not a command log (answered has columns {columns})", path=where,
                                 store="command log")
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise StoreError(f"corrupt database: {'; '.join(problems)}", path=where, store="command log")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"unreadable or corrupt database: {exc}", path=where, store="command log") from exc
        except StoreError:
            self._db.close()
            raise
        self.path = path
        self._lock = threading.Lock()
        self.keep = keep

    def get(self, cid: str) -> dict[str, Any] | None:
        try:
            with self._lock:
                row = self._db.execute("SELECT response FROM answered WHERE id = ?", (cid,)).fetchone()
            response = orjson.loads(row[0]) if row else None
        except (sqlite3.Error, orjson.JSONDecodeError, TypeError) as exc:
            log.error("command_log.read_failed", path=str(self.path), id=cid, reason=str(exc))
            return None
        return response if isinstance(response, dict) else None

    def put(self, cid: str, response: Mapping[str, Any]) -> None:
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?, ?)",
                                 (cid, orjson.dumps(response), time.time()))
                self._db.execute("DELETE FROM answered WHERE id NOT IN "
                                 "(SELECT id FROM answered ORDER BY at DESC LIMIT ?)", (self.keep,))
        except sqlite3.Error as exc:
            log.error("command_log.write_failed", path=str(self.path), id=cid, reason=str(exc))

    def close(self) -> None:
        with self._lock:
            self._db.close()


Reply = Callable[[str, Mapping[str, Any], bytes | None], None]
Event = Callable[[Mapping[str, Any]], object]


class Dispatcher:
    """Runs commands on the event loop. ``reply(topic, payload, correlation)`` publishes a response."""

    def __init__(self, specs: Mapping[str, Spec], log_store: CommandLog, reply: Reply, event: Event, *,
                 default_reply_topic: str, own_topics: set[str], max_bytes: int, device_id: str = "") -> None:
        self.device_id = device_id
        self.specs = dict(specs)
        self.log = log_store
        self.reply = reply
        self.event = event
        self.default_reply_topic = default_reply_topic
        self.own_topics = own_topics
        self.max_bytes = max_bytes
        self.running: dict[str, asyncio.Task[None]] = {}
        self._in_hand: set[str] = set()  # ids being looked up or answered right now
        self.handled = 0

    def _answer(self, command: Command | None, topic: str | None, correlation: bytes | None,
                response: dict[str, Any]) -> None:
        target = topic or self.default_reply_topic
        self.reply(target, {**response, "device_id": self.device_id}, correlation)

    async def handle(self, message: IncomingMessage) -> None:
        """Never raises: every problem becomes an error response (or a logged drop)."""
        if message.topic not in self.own_topics:
            log.warning("command.dropped", topic=message.topic, reason="not one of this device's command topics")
            return
        try:
            command = parse(message, self.max_bytes)
        except CommandError as exc:
            error: dict[str, Any] = exc.to_dict()
            if exc.code == "too_large":
                # The payload is not read, so the answer cannot name the id: MQTT 3.1.1 callers (no
                # correlation data) match it by the SHA-256 and size of what they sent.
                cid = None
                error.update(payload_bytes=len(message.payload),
                             payload_sha256=hashlib.sha256(message.payload).hexdigest())
            else:
                cid = peek_id(message.payload)
            log.warning("command.rejected", topic=message.topic, id=cid, code=exc.code, reason=exc.message)
            self._answer(None, message.response_topic, message.correlation,
                         {"id": cid, "ok": False, "error": error, "status": "done"})
            return
        if command.device_id is not None and command.device_id != self.device_id:
            # Delivered to this device's (or a group's) topic but addressed to someone else: a misrouted
            # or replayed command is never executed here.
            log.warning("command.rejected", topic=message.topic, id=command.id, code="wrong_device",
                        addressee=command.device_id[:128])
            error = CommandError("wrong_device", f"command addressed to device '{command.device_id[:128]}', "
                                                 f"this is '{self.device_id}'").to_dict()
            self._answer(command, command.reply_topic, command.correlation,
                         {"id": command.id, "ok": False, "error": error, "status": "done"})
            return
        await self._dispatch(command)

    async def _dispatch(self, command: Command) -> None:
        self.handled += 1
        if command.id in self.running or command.id in self._in_hand:
            self._answer(command, command.reply_topic, command.correlation,
                         {"id": command.id, "ok": True, "status": "accepted", "result": {"running": True}})
            return
        self._in_hand.add(command.id)  # a retry arriving while we look it up is not run twice
        try:
            await self._dispatch_new(command)
        finally:
            self._in_hand.discard(command.id)

    async def _dispatch_new(self, command: Command) -> None:
        previous = await asyncio.to_thread(self.log.get, command.id)
        if previous is not None:
            log.info("command.repeated", id=command.id, name=command.name)
            self._answer(command, command.reply_topic, command.correlation, previous)
            return
        spec = self.specs.get(command.name)
        try:
            if spec is None:
                raise CommandError("unknown_command",
                                   f"unknown command '{command.name}' (known: {', '.join(sorted(self.specs))})")
            args = validate_args(spec, command)
        except CommandError as exc:
            await self._finish(command, {"id": command.id, "ok": False, "error": exc.to_dict(), "status": "done"})
            return
        log.info("command.received", id=command.id, name=command.name)
        if spec.long_running:
            self._answer(command, command.reply_topic, command.correlation,
                         {"id": command.id, "ok": True, "status": "accepted"})
            task = asyncio.get_running_loop().create_task(self._run(spec, command, args),
                                                          name=f"command-{command.id}")
            self.running[command.id] = task
            task.add_done_callback(lambda _t: self.running.pop(command.id, None))
        else:
            await self._run(spec, command, args)

    async def _run(self, spec: Spec, command: Command, args: BaseModel | None) -> None:
        try:
            result = await spec.handler(command, args)
            response = {"id": command.id, "ok": True, "result": result, "status": "done"}
        except EdgeError as exc:  # the one mapping: a typed error answers with its own code
            response = {"id": command.id, "ok": False, "error": exc.to_dict(), "status": "done"}
        except asyncio.CancelledError:
            response = {"id": command.id, "ok": False, "status": "done",
                        "error": {"code": "cancelled", "message": "the agent is stopping"}}
            await self._finish(command, response, spec.long_running)
            raise
        except Exception as exc:
            log.exception("command.failed", id=command.id, name=command.name)
            response = {"id": command.id, "ok": False, "status": "done",
                        "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        await self._finish(command, response, spec.long_running)

    async def _finish(self, command: Command, response: dict[str, Any], long_running: bool = False) -> None:
        """Remember the answer (a retried id gets it again), send it, and announce a long command's end.

        Runs to its end even if the caller is cancelled meanwhile (the agent stopping): an
        answer that was computed is always stored and sent.
        """
        done = asyncio.ensure_future(self._store_and_send(command, response, long_running))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await done
            raise

    async def _store_and_send(self, command: Command, response: dict[str, Any], long_running: bool) -> None:
        await asyncio.to_thread(self.log.put, command.id, response)
        self._answer(command, command.reply_topic, command.correlation, response)
        log.info("command.answered", id=command.id, name=command.name, ok=response["ok"])
        if long_running:
            self.event({"type": "command.completed", "id": command.id, "name": command.name,
                        "ok": response["ok"], "error": response.get("error")})
