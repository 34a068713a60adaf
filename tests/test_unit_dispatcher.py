"""The MQTT command dispatcher (``cloud_sync.mqtt.commands.Dispatcher``) without a broker.

Messages are handed to ``handle`` directly; replies go to a recording function; the log of
answered ids is a real SQLite ``CommandLog`` in a temp dir. Handlers are small coroutines
that count their calls and, for long-running commands, wait until the test lets them finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from agent.errors import DeployError, ModelNotFoundError
from agent.link.commands import ModelArgs
from cloud_sync.errors import CommandError, TrustError
from cloud_sync.mqtt.commands import Command, CommandLog, Dispatcher, Spec, parse
from cloud_sync.mqtt.session import IncomingMessage

DEVICE = "dev-1"
COMMANDS = f"edge/v1/devices/{DEVICE}/commands"
GROUP = "edge/v1/groups/lab/commands"
RESPONSES = f"edge/v1/devices/{DEVICE}/responses"
MAX_BYTES = 1024


@dataclass
class Reply:
    topic: str
    payload: dict[str, Any]
    correlation: bytes | None


@dataclass
class Rig:
    dispatcher: Dispatcher
    log: CommandLog
    replies: list[Reply]
    events: list[dict[str, Any]]
    calls: list[tuple[str, Any]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, body: Any, *, topic: str = COMMANDS, response_topic: str | None = None,
                   correlation: bytes | None = None, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else orjson.dumps(body)
        await asyncio.wait_for(self.dispatcher.handle(IncomingMessage(topic, payload, response_topic, correlation)), 5)

    def answers(self) -> list[dict[str, Any]]:
        return [r.payload for r in self.replies]

    async def wait_done(self, cid: str) -> None:
        task = self.dispatcher.running.get(cid)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), 5)


class Echo(BaseModel):
    text: str


def make_specs(rig_calls: list[tuple[str, Any]], gate: asyncio.Event, started: asyncio.Event) -> dict[str, Spec]:
    async def ping(c: Command, a: None) -> dict[str, Any]:
        rig_calls.append((c.name, a))
        return {"pong": True}

    async def echo(c: Command, a: Echo) -> dict[str, Any]:
        rig_calls.append((c.name, a))
        return {"text": a.text}

    async def deploy(c: Command, a: ModelArgs) -> dict[str, Any]:
        rig_calls.append((c.name, a))
        started.set()
        await gate.wait()
        return {"model": a.model, "version": a.version or 7}

    async def refuse(c: Command, _a: None) -> None:
        rig_calls.append((c.name, None))
        raise DeployError("no_previous", "'vad' has no version older than 1 to go back to")

    async def missing(c: Command, _a: None) -> None:
        rig_calls.append((c.name, None))
        raise ModelNotFoundError("model 'x' not found")

    async def untrusted(c: Command, _a: None) -> None:
        rig_calls.append((c.name, None))
        raise TrustError("targets: bad signature")

    async def broken(c: Command, _a: None) -> None:
        rig_calls.append((c.name, None))
        raise ValueError("boom")

    async def slow_fail(c: Command, _a: None) -> None:
        rig_calls.append((c.name, None))
        started.set()
        await gate.wait()
        raise DeployError("health_regression", "error rate too high")

    return {"ping": Spec(ping), "echo": Spec(echo, Echo), "deploy": Spec(deploy, ModelArgs, long_running=True),
            "refuse": Spec(refuse), "missing": Spec(missing), "untrusted": Spec(untrusted),
            "broken": Spec(broken), "slow-fail": Spec(slow_fail, long_running=True)}


def build(db: Path, replies: list[Reply], events: list[dict[str, Any]], calls: list[tuple[str, Any]],
          gate: asyncio.Event, started: asyncio.Event) -> tuple[Dispatcher, CommandLog]:
    log = CommandLog(db)

    def reply(topic: str, payload: Mapping[str, Any], correlation: bytes | None) -> None:
        replies.append(Reply(topic, dict(payload), correlation))

    def event(payload: Mapping[str, Any]) -> None:
        events.append(dict(payload))

    dispatcher = Dispatcher(make_specs(calls, gate, started), log, reply, event, default_reply_topic=RESPONSES,
                            own_topics={COMMANDS, GROUP}, max_bytes=MAX_BYTES, device_id=DEVICE)
    return dispatcher, log


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    replies: list[Reply] = []
    events: list[dict[str, Any]] = []
    calls: list[tuple[str, Any]] = []
    gate, started = asyncio.Event(), asyncio.Event()
    dispatcher, log = build(tmp_path / "commands.db", replies, events, calls, gate, started)
    r = Rig(dispatcher, log, replies, events, calls, gate, started)
    yield r
    log.close()


async def _cancel_running(r: Rig) -> None:
    for task in list(r.dispatcher.running.values()):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


# -- parsing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code", "cid"), [
    (b"{not json", "bad_request", None),
    (b"[1, 2]", "bad_request", None),
    (b'"ping"', "bad_request", None),
    (b'{"name": "ping"}', "bad_request", None),
    (b'{"id": "", "name": "ping"}', "bad_request", ""),  # echoed as sent: the fleet sent it
    (b'{"id": 5, "name": "ping"}', "bad_request", None),
    (orjson.dumps({"id": "x" * 129, "name": "ping"}), "bad_request", "x" * 129),
    (b'{"id": "c1"}', "bad_request", "c1"),
    (b'{"id": "c1", "name": ""}', "bad_request", "c1"),
    (b'{"id": "c1", "name": "ping", "args": [1]}', "bad_args", "c1"),
])
async def test_a_message_that_is_not_a_command_is_answered_with_its_code(rig: Rig, raw: bytes, code: str,
                                                                         cid: str | None) -> None:
    await rig.send(None, raw=raw)
    [reply] = rig.replies
    assert reply.topic == RESPONSES
    assert reply.payload["id"] == cid  # the id when it can be read, so the fleet can match the answer
    assert reply.payload["ok"] is False and reply.payload["status"] == "done"
    assert reply.payload["error"]["code"] == code
    assert reply.payload["device_id"] == DEVICE
    assert rig.calls == []


async def test_too_large_is_answered_with_a_null_id(rig: Rig) -> None:
    body = orjson.dumps({"id": "big", "name": "echo", "args": {"text": "x" * MAX_BYTES}})
    await rig.send(None, raw=body, response_topic="fleet/replies/9", correlation=b"corr")

    [reply] = rig.replies
    assert (reply.topic, reply.correlation) == ("fleet/replies/9", b"corr")
    assert reply.payload["id"] is None  # an oversized payload is never parsed, not even for its id
    assert reply.payload["error"]["code"] == "too_large"
    assert str(len(body)) in reply.payload["error"]["message"]
    assert rig.calls == []
    assert rig.log.get("big") is None


async def test_too_large_answer_carries_the_payload_digest_for_311_callers(rig: Rig) -> None:
    """MQTT 3.1.1 has no correlation data: the caller matches the id-less answer by what it sent."""
    import hashlib

    body = orjson.dumps({"id": "big", "name": "echo", "args": {"text": "y" * MAX_BYTES}})
    await rig.send(None, raw=body)
    [reply] = rig.replies
    assert reply.topic == RESPONSES and reply.correlation is None and reply.payload["id"] is None
    error = reply.payload["error"]
    assert error["code"] == "too_large" and error["payload_bytes"] == len(body)
    assert error["payload_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("topic", [COMMANDS, GROUP])
async def test_a_command_naming_another_device_is_refused(rig: Rig, topic: str) -> None:
    await rig.send({"id": "w1", "name": "echo", "args": {"text": "hi"}, "device_id": "dev-2"}, topic=topic,
                   response_topic="fleet/replies/1", correlation=b"c")
    [reply] = rig.replies
    assert (reply.topic, reply.correlation) == ("fleet/replies/1", b"c")
    assert reply.payload["id"] == "w1" and reply.payload["ok"] is False
    assert reply.payload["error"]["code"] == "wrong_device" and "'dev-2'" in reply.payload["error"]["message"]
    assert rig.calls == [], "never executed"
    assert rig.log.get("w1") is None, "not remembered: the id is still free for its real addressee"


async def test_a_command_naming_this_device_runs(rig: Rig) -> None:
    await rig.send({"id": "r1", "name": "ping", "device_id": DEVICE})
    assert rig.answers()[0]["ok"] is True and rig.calls == [("ping", None)]


@pytest.mark.parametrize("device_id", [5, "", ["dev-1"], "x" * 257])
async def test_a_malformed_device_id_is_a_bad_request(rig: Rig, device_id: Any) -> None:
    await rig.send({"id": "m1", "name": "ping", "device_id": device_id})
    [reply] = rig.replies
    assert reply.payload["error"]["code"] == "bad_request" and "'device_id'" in reply.payload["error"]["message"]
    assert rig.calls == []


def test_parse_keeps_the_reply_address() -> None:
    command = parse(IncomingMessage(COMMANDS, b'{"id": "c1", "name": "ping", "args": null}', "r/t", b"\x01"),
                    MAX_BYTES)
    assert command == Command("c1", "ping", {}, COMMANDS, "r/t", b"\x01")


async def test_commands_on_foreign_topics_are_dropped(rig: Rig) -> None:
    for topic in ("edge/v1/devices/other/commands", "edge/v1/groups/other/commands", RESPONSES):
        await rig.send({"id": f"c-{topic}", "name": "ping"}, topic=topic)
    assert rig.replies == []
    assert rig.calls == []
    assert rig.dispatcher.handled == 0


async def test_group_commands_are_handled(rig: Rig) -> None:
    await rig.send({"id": "g1", "name": "ping"}, topic=GROUP)
    assert rig.answers() == [{"id": "g1", "ok": True, "result": {"pong": True}, "status": "done",
                              "device_id": DEVICE}]


# -- validation ---------------------------------------------------------------------------------------------------


async def test_unknown_command(rig: Rig) -> None:
    await rig.send({"id": "u1", "name": "reboot"})
    [answer] = rig.answers()
    assert answer["error"]["code"] == "unknown_command"
    assert "'reboot'" in answer["error"]["message"] and "ping" in answer["error"]["message"]
    assert rig.calls == []


@pytest.mark.parametrize(("name", "args", "names"), [
    ("deploy", {}, "args.model: Field required"),
    ("deploy", {"model": ""}, "args.model:"),
    ("deploy", {"model": "vad", "version": 0}, "args.version:"),
    ("deploy", {"model": "vad", "version": "two"}, "args.version:"),
    ("deploy", {"model": "vad", "force": True}, "args.force: unknown argument"),
    ("echo", {"text": 5}, "args.text:"),
    ("ping", {"x": 1}, "'ping' takes no arguments"),
])
async def test_bad_args_name_the_argument(rig: Rig, name: str, args: dict[str, Any], names: str) -> None:
    await rig.send({"id": "b1", "name": name, "args": args})
    [answer] = rig.answers()
    assert answer["ok"] is False and answer["status"] == "done"
    assert answer["error"]["code"] == "bad_args"
    assert names in answer["error"]["message"]
    assert rig.calls == []  # validated before the handler runs, and never run


async def test_handler_gets_the_validated_args(rig: Rig) -> None:
    await rig.send({"id": "e1", "name": "echo", "args": {"text": "hi"}})
    assert rig.calls == [("echo", Echo(text="hi"))]
    assert rig.answers()[0]["result"] == {"text": "hi"}


# -- errors from handlers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "code", "message"), [
    ("refuse", "no_previous", "'vad' has no version older than 1 to go back to"),
    ("missing", "not_found", "model 'x' not found"),
    ("untrusted", "untrusted", "targets: bad signature"),
])
async def test_an_edge_error_answers_its_own_code(rig: Rig, name: str, code: str, message: str) -> None:
    await rig.send({"id": "h1", "name": name})
    assert rig.answers() == [{"id": "h1", "ok": False, "status": "done", "device_id": DEVICE,
                              "error": {"code": code, "message": message}}]


async def test_an_unexpected_exception_answers_internal(rig: Rig) -> None:
    await rig.send({"id": "i1", "name": "broken"})
    [answer] = rig.answers()
    assert answer["error"] == {"code": "internal", "message": "ValueError: boom"}
    assert "Traceback" not in orjson.dumps(answer).decode()


# -- idempotency --------------------------------------------------------------------------------------------------


async def test_a_retried_id_gets_the_stored_answer_without_running_again(rig: Rig) -> None:
    await rig.send({"id": "r1", "name": "echo", "args": {"text": "once"}}, response_topic="a", correlation=b"1")
    await rig.send({"id": "r1", "name": "echo", "args": {"text": "twice"}}, response_topic="b", correlation=b"2")

    assert len(rig.calls) == 1
    first, second = rig.replies
    assert first.payload == second.payload
    assert second.payload["result"] == {"text": "once"}
    assert (second.topic, second.correlation) == ("b", b"2")  # answered where the retry asked


async def test_a_stored_error_answer_is_repeated_too(rig: Rig) -> None:
    await rig.send({"id": "r2", "name": "broken"})
    await rig.send({"id": "r2", "name": "broken"})
    assert len(rig.calls) == 1
    assert rig.answers()[0] == rig.answers()[1]


async def test_answered_ids_survive_a_restart(tmp_path: Path, rig: Rig) -> None:
    await rig.send({"id": "p1", "name": "echo", "args": {"text": "before"}})
    rig.log.close()

    replies: list[Reply] = []
    calls: list[tuple[str, Any]] = []
    dispatcher, log = build(tmp_path / "commands.db", replies, [], calls, asyncio.Event(), asyncio.Event())
    try:
        await asyncio.wait_for(dispatcher.handle(IncomingMessage(COMMANDS, b'{"id": "p1", "name": "ping"}')), 5)
    finally:
        log.close()
    assert calls == []
    assert replies[0].payload["result"] == {"text": "before"}


async def test_concurrent_copies_of_one_command_run_once(rig: Rig) -> None:
    message = {"id": "d1", "name": "echo", "args": {"text": "x"}}
    await asyncio.gather(rig.send(message), rig.send(message))
    assert len(rig.calls) == 1
    answers = rig.answers()
    assert sorted(a["status"] for a in answers) == ["accepted", "done"]
    accepted = next(a for a in answers if a["status"] == "accepted")
    assert accepted == {"id": "d1", "ok": True, "status": "accepted", "result": {"running": True},
                        "device_id": DEVICE}


def test_command_log_is_bounded(tmp_path: Path) -> None:
    log = CommandLog(tmp_path / "c.db", keep=2)
    try:
        for cid in ("a", "b", "c"):
            log.put(cid, {"id": cid, "ok": True})
        assert log.get("a") is None
        assert log.get("b") == {"id": "b", "ok": True}
        assert log.get("c") == {"id": "c", "ok": True}
    finally:
        log.close()


def _foreign_db(path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE answered (id TEXT, body TEXT)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: p.write_bytes(bytes(range(256)) * 32), "not a database"),
    (_foreign_db, "not a command log"),
    (lambda p: p.mkdir(), "cannot open"),
], ids=["garbage", "other-shape", "directory"])
def test_unusable_command_log_raises_store_error_and_is_replaced(tmp_path: Path, damage, reason: str) -> None:
    from cloud_sync.errors import StoreError
    from cloud_sync.stores import Quarantine, open_or_replace

    path = tmp_path / "commands.db"
    damage(path)
    with pytest.raises(StoreError, match=reason) as info:
        CommandLog(path)
    assert info.value.path == str(path)
    quarantine = Quarantine()
    log = open_or_replace(path, "command_log", lambda: CommandLog(path), quarantine=quarantine)
    try:
        log.put("a", {"id": "a"})
        assert log.get("a") == {"id": "a"}
    finally:
        log.close()
    [notice] = quarantine.reported
    assert notice.store == "command_log" and Path(notice.moved_to).name.startswith("commands.db.corrupt-")
    assert notice.reason == info.value.reason


def test_command_log_failing_while_running_is_logged_not_raised(tmp_path: Path) -> None:
    log = CommandLog(tmp_path / "c.db")
    log.put("a", {"id": "a"})
    log._db.execute("DROP TABLE answered")  # the store breaks under the running agent
    assert log.get("a") is None  # treated as "not answered yet"
    log.put("b", {"id": "b"})  # logged, not raised
    log.close()


# -- long-running commands ---------------------------------------------------------------------------------------


async def test_long_running_answers_accepted_then_final_and_an_event(rig: Rig) -> None:
    await rig.send({"id": "L1", "name": "deploy", "args": {"model": "vad"}}, response_topic="r", correlation=b"c")
    await asyncio.wait_for(rig.started.wait(), 5)
    assert rig.answers() == [{"id": "L1", "ok": True, "status": "accepted", "device_id": DEVICE}]
    assert "L1" in rig.dispatcher.running

    # A retry while it runs: told it is running, not run again.
    await rig.send({"id": "L1", "name": "deploy", "args": {"model": "vad"}})
    assert rig.answers()[-1] == {"id": "L1", "ok": True, "status": "accepted", "result": {"running": True},
                                 "device_id": DEVICE}
    assert len(rig.calls) == 1

    rig.gate.set()
    await rig.wait_done("L1")

    final = rig.replies[-1]
    assert (final.topic, final.correlation) == ("r", b"c")
    assert final.payload == {"id": "L1", "ok": True, "status": "done", "result": {"model": "vad", "version": 7},
                             "device_id": DEVICE}
    assert rig.events == [{"type": "command.completed", "id": "L1", "name": "deploy", "ok": True, "error": None}]
    assert "L1" not in rig.dispatcher.running
    assert rig.log.get("L1") == {k: v for k, v in final.payload.items() if k != "device_id"}

    # After it finished: the stored final answer.
    await rig.send({"id": "L1", "name": "deploy", "args": {"model": "vad"}})
    assert rig.replies[-1].payload == final.payload
    assert len(rig.calls) == 1


async def test_long_running_failure_is_final_answer_and_event(rig: Rig) -> None:
    await rig.send({"id": "L2", "name": "slow-fail"})
    await asyncio.wait_for(rig.started.wait(), 5)
    rig.gate.set()
    await rig.wait_done("L2")

    error = {"code": "health_regression", "message": "error rate too high"}
    assert rig.answers()[-1] == {"id": "L2", "ok": False, "status": "done", "error": error, "device_id": DEVICE}
    assert rig.events == [{"type": "command.completed", "id": "L2", "name": "slow-fail", "ok": False,
                           "error": error}]


async def test_cancelled_long_running_command_answers_cancelled(rig: Rig) -> None:
    await rig.send({"id": "L3", "name": "deploy", "args": {"model": "vad", "version": 2}})
    await asyncio.wait_for(rig.started.wait(), 5)

    await _cancel_running(rig)  # what the link does when the agent stops

    cancelled = {"id": "L3", "ok": False, "status": "done",
                 "error": {"code": "cancelled", "message": "the agent is stopping"}}
    assert rig.answers()[-1] == {**cancelled, "device_id": DEVICE}
    assert rig.log.get("L3") == cancelled  # a retry after the restart is told, not run again
    assert rig.dispatcher.running == {}

    await rig.send({"id": "L3", "name": "deploy", "args": {"model": "vad", "version": 2}})
    assert rig.answers()[-1] == {**cancelled, "device_id": DEVICE}
    assert len(rig.calls) == 1


async def test_short_commands_answer_once_with_done(rig: Rig) -> None:
    await rig.send({"id": "s1", "name": "ping"})
    assert rig.answers() == [{"id": "s1", "ok": True, "result": {"pong": True}, "status": "done",
                              "device_id": DEVICE}]
    assert rig.events == []  # only long-running commands announce their completion
    assert rig.dispatcher.handled == 1


def test_command_error_carries_its_code() -> None:
    exc = CommandError("bad_args", "args.x: nope")
    assert exc.to_dict() == {"code": "bad_args", "message": "args.x: nope"}


class BlockingLog(CommandLog):
    """A command log whose ``put`` waits until the test lets it finish."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, cid: str, response: Mapping[str, Any]) -> None:
        self.entered.set()
        self.release.wait(5)
        super().put(cid, response)


async def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` on the loop until it holds or ``timeout`` passes; returns whether it held."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_command_cancelled_while_its_answer_is_stored_is_still_answered(tmp_path: Path) -> None:
    replies: list[Reply] = []
    log = BlockingLog(tmp_path / "commands.db")

    async def work(_c: Command, _a: None) -> dict[str, Any]:
        return {"done": True}

    dispatcher = Dispatcher({"work": Spec(work, long_running=True)}, log,
                            lambda t, p, c: replies.append(Reply(t, dict(p), c)), lambda _e: None,
                            default_reply_topic=RESPONSES, own_topics={COMMANDS}, max_bytes=MAX_BYTES)
    try:
        await asyncio.wait_for(dispatcher.handle(IncomingMessage(COMMANDS, b'{"id": "w1", "name": "work"}')), 5)
        task = dispatcher.running["w1"]
        assert await asyncio.to_thread(log.entered.wait, 5)  # the handler returned; its answer is being stored

        task.cancel()  # the link stops
        log.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

        answered = await eventually(lambda: any(r.payload.get("status") == "done" for r in replies), 1.0)
        assert answered, [r.payload for r in replies]
    finally:
        log.release.set()
        log.close()
