"""The fleet simulator: N devices in one process, for tests, demos and capacity planning.

Each simulated device is made of the device side of the link in ``cloud_sync``: a
:class:`DeviceSession` (retained birth, Last Will, reconnect with backoff and jitter), an
:class:`Outbox` (seq'd telemetry, results and events, deleted on PUBACK) and a
:class:`Dispatcher` with its :class:`CommandLog` (idempotent command ids, ``accepted`` then
final responses). What the agent does with models is replaced by a stand-in registry: a
``deploy`` walks the event sequence of docs/deploy.md with a configurable install time and
failure rate, then the birth lists the new model; with ``"mode": "shadow"`` it stops in
``shadowing`` (docs/shadow.md) with made-up agreement figures in the birth and telemetry, until a
``promote`` (swap, health, committed) or ``discard``. Nothing here imports ``agent``.

Threads: one :class:`SessionHub` drives every session's sockets and outbox sender (or, with
``driver="threads"``, each session has the two threads a real device has); one asyncio loop
thread runs the dispatchers, telemetry and results. Not a device: never run it on one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import random
import threading
import time
import uuid
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_sync.errors import CommandError
from cloud_sync.mqtt.commands import Command, CommandLog, Dispatcher, Spec
from cloud_sync.mqtt.contract import (
    CPU_DELEGATES,
    DEPLOY_STEPS,
    LogsArgs,
    ModelArgs,
    RollbackArgs,
    ShadowActionArgs,
    ShadowArgs,
    deploy_event,
)
from cloud_sync.mqtt.hub import SessionHub
from cloud_sync.mqtt.session import DeviceSession, IncomingMessage
from cloud_sync.mqtt.settings import BrokerSettings, LinkSettings
from cloud_sync.outbox import MEMORY, Kind, Outbox

log = structlog.get_logger(__name__)

ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$"
MAX_THREADED_DEVICES = 300
# Share of the install time spent in each step (the download dominates, as on a device).
STEP_SHARES: dict[str, float] = {"started": 0.0, "downloading": 0.4, "verified": 0.05, "staged": 0.15,
                                 "loaded": 0.15, "tested": 0.1, "swapped": 0.0, "health": 0.15}
# Where a failing deploy fails: after which step's event, with which code (all before the swap).
FAILURES: tuple[tuple[str, str, str], ...] = (
    ("downloading", "download_failed", "connection reset while downloading (simulated)"),
    ("staged", "model_load_failed", "the runtime refused the model (simulated)"),
    ("loaded", "test_vectors_failed", "test_vectors[0].expected.output: output differs (simulated)"),
)
assert set(STEP_SHARES) == set(DEPLOY_STEPS)


def _package_version() -> str:
    try:
        return version("edge-agent")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


class SimModel(BaseModel):
    """A model a simulated device serves (or can be deployed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: int = Field(ge=1)
    runtime: Literal["onnx", "tflite"] = "onnx"

    @classmethod
    def parse(cls, text: str) -> SimModel:
        """``NAME@VERSION[:RUNTIME]``; raises ValueError."""
        spec, _, runtime = text.partition(":")
        name, sep, number = spec.partition("@")
        if not sep or not number.isdigit():
            raise ValueError(f"{text!r}: expected NAME@VERSION[:onnx|tflite]")
        return cls(name=name, version=int(number), runtime=runtime or "onnx")  # type: ignore[arg-type]


class SimulatorSettings(BaseModel):
    """What to simulate. Validated once; the CLI builds it from flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    devices: int = Field(ge=1, le=100_000)
    id_prefix: str = Field(default="sim", pattern=ID_RE)
    groups: tuple[str, ...] = ()
    install_time_s: float = Field(default=5.0, ge=0)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    results_per_s: float = Field(default=0.0, ge=0, description="per device")
    models: tuple[SimModel, ...] = (SimModel(name="silero-vad", version=1, runtime="onnx"),)
    seed: int | None = None
    ramp_s: float = Field(default=0.0, ge=0, description="spread the first connects over this many seconds")
    outbox_dir: Path | None = Field(default=None, description="one SQLite outbox per device here; None: in memory")
    driver: Literal["hub", "threads"] = "hub"
    profile: str = "sim-x86"
    agent_version: str = Field(default_factory=lambda: f"{_package_version()}+sim")

    @model_validator(mode="after")
    def _threads_cap(self) -> SimulatorSettings:
        # paho's own loop() uses select(), which fails for file descriptors >= 1024 (~3 per session).
        if self.driver == "threads" and self.devices > MAX_THREADED_DEVICES:
            raise ValueError(f"the threads driver runs at most {MAX_THREADED_DEVICES} devices (paho's select() "
                             "loop); use the hub driver")
        return self

    def device_ids(self) -> list[str]:
        width = max(4, len(str(self.devices - 1)))
        return [f"{self.id_prefix}-{i:0{width}d}" for i in range(self.devices)]


@dataclasses.dataclass
class Counters:
    """Simulator-wide tallies (touched on the loop thread only)."""

    commands: int = 0
    deploys_committed: int = 0
    deploys_failed: int = 0
    shadows_started: int = 0
    shadows_promoted: int = 0
    shadows_discarded: int = 0
    telemetry: int = 0
    results: int = 0


class SimDevice:
    """One simulated device: the real link pieces around a stand-in model registry."""

    def __init__(self, sim: FleetSimulator, device_id: str, link: LinkSettings, rng: random.Random) -> None:
        self.sim = sim
        self.id = device_id
        self.rng = rng
        cfg = sim.settings
        path = MEMORY if cfg.outbox_dir is None else cfg.outbox_dir / f"{device_id}.db"
        self.outbox = Outbox(path, max_messages=20_000, max_bytes=16 << 20, synchronous="OFF")
        self.commands = CommandLog(Path(MEMORY), keep=200)
        self.session = DeviceSession(link, self.outbox, on_message=self._incoming, hub=sim.hub)
        topics = self.session.topics
        own = {topics.commands} | {topics.group_commands(g) for g in link.groups}
        self.dispatcher = Dispatcher(self._specs(), self.commands, self._reply, self.event,
                                     default_reply_topic=topics.responses, own_topics=own,
                                     max_bytes=link.max_command_bytes, device_id=device_id)
        # the stand-in registry: versions on disk per model (with runtime), and the one serving
        self.disk: dict[str, dict[int, str]] = {m.name: {m.version: m.runtime} for m in cfg.models}
        self.active: dict[str, int] = {m.name: m.version for m in cfg.models}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.shadows: dict[str, dict[str, Any]] = {}  # model -> the running shadow's figures
        self.requests: collections.Counter[str] = collections.Counter()
        self.logs: collections.deque[str] = collections.deque(maxlen=1000)
        self.started_at = time.time()
        self.cpu = rng.uniform(5, 40)
        self.memory = rng.uniform(20, 60)
        self.temperature = rng.uniform(40, 60)
        self.health: dict[str, Any] | None = None
        self.results_carry = rng.random()

    # -- link plumbing ------------------------------------------------------------------------
    def _incoming(self, message: IncomingMessage) -> None:
        """Hub (or net) thread -> the simulator's loop."""
        self.sim.loop.call_soon_threadsafe(self.sim.spawn, self.dispatcher.handle(message))

    def _reply(self, topic: str, payload: Mapping[str, Any], correlation: bytes | None) -> None:
        if not self.session.publish_now(topic, payload, correlation=correlation):
            self._log("command.reply_not_sent", id=payload.get("id"))

    def _log(self, event: str, **values: Any) -> None:
        self.logs.append(orjson.dumps({"event": event, "timestamp": time.time(), "device_id": self.id,
                                       **values}).decode())

    def event(self, payload: Mapping[str, Any]) -> int:
        return self.session.enqueue("event", self.session.topics.events, {"ts": time.time(), **payload})

    def birth(self) -> dict[str, Any]:
        cfg = self.sim.settings
        return {"agent_version": cfg.agent_version, "profile": cfg.profile, "health": self.health,
                "started_at": self.started_at, "groups": list(self.session.settings.groups),
                "models": self.models(), "simulated": True, "shadows": [
                    {k: x[k] for k in ("model", "version", "serving_version", "state", "kind", "compared",
                                       "agreement")} for x in self.shadow_figures()]}

    def models(self) -> list[dict[str, Any]]:
        return [{"name": name, "version": v, "runtime": self.disk[name][v],
                 "delegate": CPU_DELEGATES[self.disk[name][v]]} for name, v in sorted(self.active.items())]

    def inventory_changed(self) -> None:
        self.session.set_birth(self.birth())

    def shadow_figures(self) -> list[dict[str, Any]]:
        """The running shadows in the shape of the agent's ``shadows`` (a few of its keys), figures made up."""
        out = []
        for shadow in self.shadows.values():
            shadow["offered"] += self.rng.randint(20, 60)
            shadow["compared"] = int(shadow["offered"] * shadow["sample"])
            shadow["dropped"] += self.rng.randint(0, 1)
            out.append({**shadow, "agreement": round(min(1.0, self.rng.gauss(0.97, 0.01)), 4)
                        if shadow["compared"] else None})
        return out

    # -- periodic messages ----------------------------------------------------------------------
    def _walk(self, value: float, low: float, high: float, step: float) -> float:
        return min(high, max(low, value + self.rng.uniform(-step, step)))

    def system(self) -> dict[str, Any]:
        """Plausible figures in the shape of the agent's system snapshot."""
        self.cpu = self._walk(self.cpu, 1, 99, 8)
        self.memory = self._walk(self.memory, 10, 95, 2)
        self.temperature = self._walk(self.temperature, 35, 80, 1.0)
        total = 4 << 30
        return {"taken_at": time.time(), "cpu_percent": round(self.cpu, 1),
                "load": {"1m": round(self.cpu / 50, 2), "5m": round(self.cpu / 60, 2), "15m": round(self.cpu / 70, 2)},
                "memory": {"total": total, "available": int(total * (1 - self.memory / 100)),
                           "percent": round(self.memory, 1)},
                "disk": {"total": 32 << 30, "free": 20 << 30, "used_percent": 37.5},
                "temperatures": {"cpu": round(self.temperature + self.cpu / 20, 1)}, "throttling": None,
                "gpus": []}

    def telemetry(self) -> None:
        system = self.system()
        self.session.enqueue("telemetry", self.session.topics.telemetry, {
            "ts": time.time(), "uptime_s": round(time.time() - self.started_at, 3), "system": system,
            "models": [{**m, "requests": self.requests[m["name"]], "errors": 0} for m in self.models()],
            "link": self.session.stats(), "outbox": self.outbox.stats().to_dict(), "streams": {},
            "shadows": self.shadow_figures()})
        # The retained state carries the latest health summary, as the agent's does.
        self.health = {"cpu_percent": system["cpu_percent"], "memory_percent": system["memory"]["percent"],
                       "max_temperature_c": system["temperatures"]["cpu"], "throttled": False,
                       "disk_free_percent": 62.5, "ts": time.time(), "stuck": [],
                       "outbox_depth": self.outbox.stats().depth}
        self.inventory_changed()

    def results(self, count: int) -> None:
        if not count or not self.active:
            return
        name, current = next(iter(sorted(self.active.items())))
        self.requests[name] += count
        now = time.time()
        topic = self.session.topics.results("sim")
        items: list[tuple[Kind, str, Mapping[str, Any]]] = [
            ("result", topic, {"ts": now, "stream": "sim", "model": f"{name}@{current}", "captured_at": now,
                               "score": round(self.rng.random(), 4), "label": "event"})
            for _ in range(count)]
        self.session.enqueue_many(items)

    # -- commands ---------------------------------------------------------------------------------
    def _specs(self) -> dict[str, Spec]:
        return {
            "ping": Spec(self._ping),
            "status": Spec(self._status),
            "reload": Spec(self._reload, long_running=True),
            "deploy": Spec(self._deploy, ModelArgs, long_running=True),
            "rollback": Spec(self._rollback, RollbackArgs, long_running=True),
            "promote": Spec(self._promote, ShadowActionArgs, long_running=True),
            "discard": Spec(self._discard, ShadowActionArgs),
            "logs": Spec(self._logs, LogsArgs),
        }

    async def _ping(self, command: Command, _args: Any = None) -> dict[str, Any]:
        self._count(command)
        return {"pong": True, "ts": time.time(), "device_id": self.id}

    async def _status(self, command: Command, _args: Any = None) -> dict[str, Any]:
        self._count(command)
        cfg = self.sim.settings
        return {"agent": {"version": cfg.agent_version, "device_id": self.id, "started_at": self.started_at,
                          "uptime_s": round(time.time() - self.started_at, 3), "simulated": True},
                "profile": {"name": cfg.profile}, "models": self.models(), "link": self.session.stats(),
                "outbox": self.outbox.stats().to_dict(), "system": self.system(),
                "deployments": list(self.deployments.values()), "streams": {}}

    async def _reload(self, command: Command, _args: Any = None) -> dict[str, Any]:
        self._count(command)
        self.inventory_changed()
        return {"added": [], "removed": [], "failed": []}

    async def _logs(self, command: Command, _args: Any = None) -> dict[str, Any]:
        self._count(command)
        return {"lines": list(self.logs)[-LogsArgs.model_validate(command.args).lines:]}

    def _count(self, command: Command) -> None:
        self.sim.counters.commands += 1
        self._log("command.received", id=command.id, name=command.name)

    def _emit(self, record: dict[str, Any], **extra: Any) -> None:
        payload = {"type": deploy_event(record["state"]), "model": record["model"], "version": record["version"],
                   "previous": record["previous"], **extra}
        if record["error"]:
            payload["error"] = record["error"]
        self.event(payload)
        self._log("deploy.step", model=record["model"], version=record["version"], state=record["state"])

    def _step(self, record: dict[str, Any], state: str, **extra: Any) -> None:
        record["state"] = state
        record["updated_at"] = time.time()
        record["history"].append([state, round(record["updated_at"], 3)])
        self._emit(record, **extra)

    async def _deploy(self, command: Command, _args: Any = None) -> dict[str, Any]:
        """The install state machine's events, with sleeps instead of work (docs/deploy.md)."""
        self._count(command)
        args = ModelArgs.model_validate(command.args)
        name = args.model
        running = self.deployments.get(name)
        if running is not None and running["state"] not in ("committed", "rolled_back", "failed", "discarded"):
            raise CommandError("busy", f"a deployment or shadow of '{name}' is already running")
        if args.mode == "shadow" and name not in self.active:
            raise CommandError("not_serving", f"no version of '{name}' serves: a shadow needs one to run beside")
        previous = self.active.get(name)
        now = time.time()
        record: dict[str, Any] = {"model": name, "version": args.version, "previous": previous, "state": "started",
                                  "error": None, "started_at": now, "updated_at": now, "history": [],
                                  "id": uuid.uuid4().hex, "mode": args.mode}
        self.deployments[name] = record
        self._step(record, "started")
        target = args.version or max(self.disk.get(name, {0: "onnx"})) + 1
        record["version"] = target
        runtime = self.disk.get(name, {}).get(previous or 0) or self.sim.runtime_of(name)
        failure = self.sim.plan_failure(self.rng)
        install = self.sim.settings.install_time_s
        step_details: dict[str, dict[str, Any]] = {
            "downloading": {"bytes": 2_300_000}, "loaded": {"delegate": CPU_DELEGATES[runtime]},
            "tested": {"vectors": 1}, "health": {"window_s": round(install * STEP_SHARES["health"], 3)}}
        try:
            if target == previous:
                raise CommandError("already_active", f"'{name}' version {target} is already serving")
            for state in DEPLOY_STEPS[1:]:
                if state == "swapped" and args.mode == "shadow":
                    self._shadowing(record, runtime, args.shadow or ShadowArgs())
                    return dict(record)
                if state == "swapped":
                    self.disk.setdefault(name, {})[target] = runtime
                    self.active[name] = target
                self._step(record, state, **step_details.get(state, {}))
                if state == "swapped":
                    self.inventory_changed()
                if failure is not None and failure[0] == state:
                    await asyncio.sleep(install * STEP_SHARES[state] * self.rng.random())
                    raise CommandError(failure[1], failure[2])
                await asyncio.sleep(install * STEP_SHARES[state])
        except CommandError as exc:
            record["state"], record["error"] = "failed", {"code": exc.code, "message": exc.message}
            record["updated_at"] = time.time()
            record["history"].append(["failed", round(record["updated_at"], 3)])
            self._emit(record)
            self.sim.counters.deploys_failed += 1
            raise CommandError(exc.code, f"deploy of {name}@{target} failed: {exc.message}") from None
        except asyncio.CancelledError:
            record["state"] = "failed"
            record["error"] = {"code": "cancelled", "message": "the simulator stopped"}
            self._emit(record)
            raise
        record["state"] = "committed"
        record["updated_at"] = time.time()
        record["history"].append(["committed", round(record["updated_at"], 3)])
        self._emit(record)
        self.sim.counters.deploys_committed += 1
        return dict(record)

    def _shadowing(self, record: dict[str, Any], runtime: str, args: ShadowArgs) -> None:
        name = record["model"]
        sample = args.sample if args.sample is not None else 0.1
        self.disk.setdefault(name, {})[record["version"]] = runtime  # staged, not serving
        self.shadows[name] = {"model": name, "version": record["version"], "serving_version": record["previous"],
                              "state": "mirroring", "kind": "raw", "sample": sample, "offered": 0, "compared": 0,
                              "dropped": 0, "errors": 0}
        self._step(record, "shadowing", serving_version=record["previous"], kind="raw", sample=sample)
        self.sim.counters.shadows_started += 1
        self.inventory_changed()

    def _shadow(self, command: Command) -> tuple[str, dict[str, Any], dict[str, Any]]:
        args = ShadowActionArgs.model_validate(command.args)
        name = args.model
        shadow, record = self.shadows.get(name), self.deployments.get(name)
        if shadow is None or record is None:
            raise CommandError("no_shadow", f"no shadow of '{name}' is running")
        if args.version is not None and record["version"] != args.version:
            raise CommandError("no_shadow", f"no shadow of '{name}' version {args.version} is running")
        if shadow["state"] != "mirroring":
            raise CommandError("busy", f"the shadow of '{name}' is being promoted")
        return name, shadow, record

    async def _promote(self, command: Command, _args: Any = None) -> dict[str, Any]:
        """The shadow swaps in: ``swapped``, ``health``, ``committed`` as for any deployment."""
        self._count(command)
        name, shadow, record = self._shadow(command)
        shadow["state"] = "promoting"
        self.event({"type": "shadow.promoted", "model": name, "version": record["version"],
                    "decision": {"action": "promote", "reason": "promote requested", "by": "command"}})
        self.active[name] = record["version"]
        self._step(record, "swapped")
        del self.shadows[name]
        self.inventory_changed()
        install = self.sim.settings.install_time_s
        self._step(record, "health", window_s=round(install * STEP_SHARES["health"], 3))
        await asyncio.sleep(install * STEP_SHARES["health"])
        self._step(record, "committed")
        self.sim.counters.shadows_promoted += 1
        self.sim.counters.deploys_committed += 1
        return dict(record)

    async def _discard(self, command: Command, _args: Any = None) -> dict[str, Any]:
        self._count(command)
        name, shadow, record = self._shadow(command)
        del self.shadows[name]
        self.disk[name].pop(record["version"], None)
        record["error"] = {"code": "manual", "message": "discard requested"}
        self._step(record, "discarded")
        self.sim.counters.shadows_discarded += 1
        self.inventory_changed()
        return {"model": name, "version": record["version"], "discarded": True, "reason": "discard requested",
                "by": "command", "figures": shadow}

    async def _rollback(self, command: Command, _args: Any = None) -> dict[str, Any]:
        self._count(command)
        name = RollbackArgs.model_validate(command.args).model
        if name not in self.active:
            raise CommandError("not_found", f"model '{name}' is not loaded")
        current = self.active[name]
        older = sorted((v for v in self.disk[name] if v < current), reverse=True)
        if not older:
            raise CommandError("no_previous", f"'{name}' has no version older than {current} to go back to")
        self.active[name] = older[0]
        del self.disk[name][current]  # set aside, as the agent does
        self.inventory_changed()
        self.event({"type": deploy_event("rolled_back"), "model": name, "version": current, "previous": older[0],
                    "error": {"code": "manual", "message": "rollback requested"}})
        return {"model": name, "from": current, "to": older[0]}


class FleetSimulator:
    """``start()`` N devices, ``stop()`` them (each sends its offline state, as a device does).

    Thread-safe for the read-only helpers (``online``, ``stats``); commands reach the devices
    only over MQTT, like for real ones.
    """

    def __init__(self, settings: SimulatorSettings, broker: BrokerSettings, prefix: str = "edge/v1",
                 *, max_command_bytes: int = 256 * 1024) -> None:
        self.settings = settings
        self.broker = broker
        self.prefix = prefix
        self.counters = Counters()
        self.hub: SessionHub | None = SessionHub() if settings.driver == "hub" else None
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="sim-loop", daemon=True)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._catalogue = {m.name: m.runtime for m in settings.models}
        self._max_command_bytes = max_command_bytes
        self.devices: list[SimDevice] = []
        self.started_at: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Create the devices and start connecting them; returns at once."""
        cfg = self.settings
        master = random.Random(cfg.seed)  # noqa: S311 - simulation, not cryptography
        if cfg.outbox_dir is not None:
            cfg.outbox_dir.mkdir(parents=True, exist_ok=True)
        for device_id in cfg.device_ids():
            broker = dataclasses.replace(self.broker, client_id=device_id)
            link = LinkSettings(device_id=device_id, prefix=self.prefix, groups=cfg.groups,
                                max_command_bytes=self._max_command_bytes,
                                telemetry_interval_s=cfg.telemetry_interval_s, broker=broker)
            self.devices.append(SimDevice(self, device_id, link, random.Random(master.random())))  # noqa: S311
        if self.hub is not None:
            self.hub.start()
        self._loop_thread.start()
        self.started_at = time.monotonic()
        asyncio.run_coroutine_threadsafe(self._main(), self.loop)
        log.info("sim.started", devices=cfg.devices, broker=self.broker.url, driver=cfg.driver,
                 outbox="memory" if cfg.outbox_dir is None else str(cfg.outbox_dir))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the timers and running deploys, send every device's offline state, disconnect."""
        if self.started_at is None:
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(timeout)
        with concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="sim-stop") as pool:
            list(pool.map(lambda d: d.session.stop(timeout=min(timeout, 5.0)), self.devices))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout)
        if self.hub is not None:
            self.hub.stop()
        for device in self.devices:
            device.outbox.close()
            device.commands.close()
        self.started_at = None
        log.info("sim.stopped", devices=len(self.devices), **dataclasses.asdict(self.counters))

    def __enter__(self) -> FleetSimulator:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- read-only helpers --------------------------------------------------------------------------
    def online(self) -> int:
        """Devices whose session is connected now (CONNACK received)."""
        return sum(1 for d in self.devices if d.session.connected)

    def device(self, device_id: str) -> SimDevice:
        return next(d for d in self.devices if d.id == device_id)

    def stats(self) -> dict[str, Any]:
        depth = sum(d.outbox.stats().depth for d in self.devices)
        return {"devices": len(self.devices), "online": self.online(),
                "reconnects": sum(d.session.reconnects for d in self.devices), "outbox_depth": depth,
                **dataclasses.asdict(self.counters)}

    # -- used by the devices ------------------------------------------------------------------------
    def runtime_of(self, model: str) -> str:
        """Runtime of a model the stand-in repository holds (``onnx`` for names it does not know)."""
        return self._catalogue.get(model, "onnx")

    def plan_failure(self, rng: random.Random) -> tuple[str, str, str] | None:
        if self.settings.failure_rate and rng.random() < self.settings.failure_rate:
            return FAILURES[rng.randrange(len(FAILURES))]
        return None

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task of the loop, kept until it is done (loop thread only)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the loop thread ------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        cfg = self.settings
        spread = cfg.ramp_s / max(len(self.devices), 1)
        for index, device in enumerate(self.devices):
            device.session.set_birth(device.birth())
            device.session.start()
            self.spawn(self._telemetry(device))
            if spread:
                await asyncio.sleep(spread)
            elif index % 100 == 99:
                await asyncio.sleep(0)  # let commands of early devices through while the rest start
        if cfg.results_per_s > 0:
            self.spawn(self._results())

    async def _telemetry(self, device: SimDevice) -> None:
        interval = self.settings.telemetry_interval_s
        await asyncio.sleep(device.rng.uniform(0, interval))  # devices do not tick in step
        while True:
            try:
                device.telemetry()
                self.counters.telemetry += 1
            except Exception:
                log.exception("sim.telemetry_failed", device=device.id)
            await asyncio.sleep(interval)

    async def _results(self) -> None:
        """One timer for every device's results: ``results_per_s`` each, in batches every 100 ms."""
        rate = self.settings.results_per_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            elapsed, last = now - last, now
            for device in self.devices:
                device.results_carry += rate * elapsed
                count = math.floor(device.results_carry)
                if count:
                    device.results_carry -= count
                    try:
                        device.results(count)
                        self.counters.results += count
                    except Exception:
                        log.exception("sim.results_failed", device=device.id)

    async def _cancel_all(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for device in self.devices:
            tasks += list(device.dispatcher.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
