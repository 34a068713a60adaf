"""The daemon: wires the components and owns the start/stop sequence; nothing else.

Every component gets its own config section and the ports it uses (``agent.core.ports``),
never this object. SIGTERM and SIGINT take the same graceful path: stop accepting, let
in-flight requests finish, unload, remove the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from agent.api.http import HTTPServer
from agent.api.server import bind_unix_socket, build_server, remove_socket
from agent.config import Config, parse_hostport
from agent.core.metrics import Metrics
from agent.core.uplink import Uplink
from agent.deploy.installer import STEP_HOOKS, Deployer, DeviceFacts
from agent.hardware import DeviceProfile, HardwareInfo, ProfileChoice, detect, load_profiles, select_profile
from agent.health.gauges import AgentFamilies, ModelFamilies, ShadowFamilies, SystemFamilies
from agent.health.monitor import SystemMonitor
from agent.health.system import AUTO, release_free_heap, resolve_nvidia_smi
from agent.health.watchdog import Watchdog, WatchdogPolicy
from agent.logs import configure_logging
from agent.models.instances import Scaler
from agent.models.registry import ModelRegistry
from agent.models.residency import Residency
from agent.operations import AgentInfo, Operations
from agent.pipelines.manager import StreamManager
from agent.plugins import load_plugins
from agent.systemd import Notifier
from agent.version import __version__
from cloud_sync.stores import QUARANTINE

if TYPE_CHECKING:
    from agent.link import CloudLink

log = structlog.get_logger(__name__)


def all_profiles(config: Config) -> list[DeviceProfile]:
    """Packaged profiles, overridden by name by those in ``agent.profiles_dir``."""
    profiles = {p.name: p for p in load_profiles()}
    if config.agent.profiles_dir is not None:
        profiles.update({p.name: p for p in load_profiles(config.agent.profiles_dir)})
    return list(profiles.values())


class Agent:
    """The wiring of one running agent: builds each component with its ports, starts and stops them."""

    def __init__(self, config: Config, hardware: HardwareInfo | None = None,
                 profile: ProfileChoice | None = None) -> None:
        self.config = config
        load_plugins(config.agent.plugins)
        hardware = hardware or detect(config.agent.hardware_root)
        choice = profile or select_profile(hardware, all_profiles(config), config.agent.profile)
        threads = config.runtime.threads or choice.profile.threads
        self.metrics = Metrics()
        self.uplink = Uplink()  # events and results go nowhere until the link attaches
        self.models = ModelRegistry(config.models_dir, model_options=config.model,
                                    versions_policy=config.models.versions, runtime=config.runtime,
                                    delegates=choice.profile.runtimes, threads=threads, metrics=self.metrics,
                                    cache_dir=config.cache_dir, elastic=config.scaling.enabled)
        self.deployer = Deployer(config.updates, models_dir=config.models_dir, state_dir=config.agent.state_dir,
                                 models=self.models, sink=self.uplink,
                                 device=DeviceFacts(__version__, frozenset(a.kind for a in hardware.accelerators)),
                                 step_hooks=STEP_HOOKS, cache_dir=config.cache_dir, shadow=config.shadow)
        w = config.watchdog
        self.watchdog = Watchdog(WatchdogPolicy(w.stuck_after_s, w.failures_before_recovery, w.max_recoveries,
                                                w.window_s), self.models, self.uplink, self.metrics)
        self.scaler = Scaler(config.scaling, self.models, self.uplink,
                             options=lambda n: config.model_options(n).instances,
                             hardware_root=config.agent.hardware_root, cpu_budget=choice.profile.threads)
        self.streams = StreamManager(config.stream, self.models, self.uplink)
        deployer, streams = self.deployer, self.streams
        self.residency = Residency(
            self.models, self.uplink, self.metrics, unload_after=lambda n: config.model_options(n).unload_after_s,
            pinned=lambda m: deployer.pinning(m.name) or ("stream" if streams.uses(m.name, m.version) else None),
            interval_s=config.models.idle_check_s)
        info = AgentInfo(__version__, config.agent.device_id, config.models_dir, config.source, choice.profile.name,
                         choice.reason, threads, hardware.to_dict())
        nvidia_smi = resolve_nvidia_smi(AUTO)  # once: a driver installed later needs a restart anyway
        self.metrics.sources += [SystemFamilies(config.agent.hardware_root, config.agent.state_dir, nvidia_smi),
                                 ModelFamilies(self.models), AgentFamilies(self.streams.status, self.uplink.status),
                                 ShadowFamilies(self.deployer.shadows.describe)]
        monitor = SystemMonitor(config.agent.hardware_root, config.agent.state_dir, nvidia_smi)
        self.ops = Operations(info, models=self.models, deployer=self.deployer, streams=self.streams,
                              monitor=monitor, uplink=self.uplink, state_dir=config.agent.state_dir,
                              stuck_after_s=w.stuck_after_s, on_settings=self._settings_changed)
        self.server: HTTPServer = build_server(self.ops, self.models, self.metrics, config.api)
        self.link: CloudLink | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._scaler_task: asyncio.Task[None] | None = None
        self._residency_task: asyncio.Task[None] | None = None
        self._bound = False

    async def start(self) -> None:
        """Load models, then listen. Raises AgentError if the socket cannot be bound."""
        config, info = self.config, self.ops.info
        log.info("agent.starting", version=info.version, device_id=info.device_id, profile=info.profile,
                 profile_reason=info.profile_reason, models_dir=str(info.models_dir))
        recovered = await asyncio.to_thread(self.deployer.recover)  # undo what a crash interrupted
        await self.models.load_all()
        if not self.models.ready:
            log.warning("agent.no_models", models_dir=str(info.models_dir))
        if config.mqtt.url:
            # The link starts before the API and never blocks: a broker that is down only delays sync,
            # and a link that cannot start at all (unusable state directory, TLS files) leaves the API up.
            try:
                from agent.link import CloudLink  # paho and the command handlers only when a link is configured

                self.link = CloudLink(config.mqtt, config.agent.device_id, config.agent.state_dir, self.ops)
                await self.link.start()
            except Exception as exc:
                log.exception("cloud.link_failed", reason=str(exc))
                self.link = None
                self.uplink.fail(f"{type(exc).__name__}: {exc}"[:500])
            else:
                self.uplink.attach(self.link)
                QUARANTINE.attach(self.uplink.event)  # corrupt stores found so far, then as they are found
        for record in recovered:
            self.uplink.event({"type": f"deploy.{record.state}", "model": record.model, "version": record.version,
                               "previous": record.previous, "error": record.error})
        if config.watchdog.enabled:
            self._watchdog_task = asyncio.get_running_loop().create_task(self.watchdog.run(), name="model-watchdog")
        if config.scaling.enabled:
            self._scaler_task = asyncio.get_running_loop().create_task(self.scaler.run(), name="instance-scaler")
        if any(m.unload_after_s is not None for m in config.model.values()):
            self._residency_task = asyncio.get_running_loop().create_task(self.residency.run(),
                                                                          name="model-residency")
        sock = bind_unix_socket(config.socket_path, config.api.socket_mode)
        self._bound = True
        await self.server.listen_unix(sock)
        info.listeners.append(f"unix:{config.socket_path}")
        if config.api.tcp:
            host, port = parse_hostport(config.api.tcp)
            await self.server.listen_tcp(host, port)
            info.listeners.append(f"tcp:{config.api.tcp}")
        await self.streams.start_configured()
        release_free_heap()
        log.info("agent.ready", listeners=info.listeners, models=[m.key for m in self.models.served()],
                 seconds=round(time.time() - info.started_at, 3))

    def _settings_changed(self, config: Config, changed: Mapping[str, Any]) -> None:
        """A ``set-config`` was applied: the parts that change at run time take it."""
        if "mqtt.telemetry_interval_s" in changed and self.link is not None:
            self.link.set_telemetry_interval(config.mqtt.telemetry_interval_s)
        if "logging.level" in changed:
            configure_logging(config.logging.level, config.logging.format)

    async def stop(self) -> None:
        self.ops.stopping = True
        log.info("agent.stopping")
        await self.streams.stop_all()  # before the API and models go: streams infer through them
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        if self._scaler_task is not None:
            self._scaler_task.cancel()
        if self._residency_task is not None:
            self._residency_task.cancel()
        await self.residency.stop()  # loads under way end: their waiters are answered
        await self.deployer.stop()
        await self.server.stop(self.config.agent.shutdown_timeout_s)
        if self.link is not None:
            QUARANTINE.attach(None)
            self.uplink.attach(None)
            await self.link.stop()
        await self.models.close()
        if self._bound:  # never remove a socket another agent is serving on
            remove_socket(self.config.socket_path)
        log.info("agent.stopped")


async def _watchdog(ops: Operations, notifier: Notifier, interval: float) -> None:
    """Ping systemd at half its timeout, but only while every inference worker is responsive."""
    while True:
        stuck = ops.stuck_workers()
        if stuck:
            log.error("agent.watchdog_withheld", stuck=stuck)
        else:
            notifier.watchdog()
        await asyncio.sleep(interval)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    notifier = Notifier()
    notifier.status("loading models")
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pinger: asyncio.Task[None] | None = None
    try:
        await agent.start()
        served = [m.key for m in agent.models.served()]
        if not stop.is_set():  # a SIGTERM during start-up: never claim readiness while stopping
            notifier.ready(f"serving {len(served)} model(s) on {', '.join(agent.ops.info.listeners)}")
        if notifier.watchdog_interval:
            pinger = loop.create_task(_watchdog(agent.ops, notifier, notifier.watchdog_interval), name="watchdog")
        await stop.wait()
    finally:
        notifier.stopping()
        if pinger is not None:
            pinger.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.stop()
        notifier.close()
    return 0


#: How long a thread running Python code keeps the interpreter lock when another wants it
#: (CPython's default is 5 ms). The event loop answers every client and shares the lock with the
#: model threads (formatting answers) and the executor threads: at 5 ms, a health check waited up
#: to 5 ms for a thread that was formatting a large answer.
SWITCH_INTERVAL_S = 0.001


def run(config: Config) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
