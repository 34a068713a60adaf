"""The daemon: wires config, hardware profile, model registry and the API, and owns the
start/stop sequence. SIGTERM and SIGINT take the same graceful path: stop accepting,
let in-flight requests finish, unload, remove the socket."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.api.http import HTTPServer
from agent.api.server import bind_unix_socket, build_server, remove_socket
from agent.config import Config, parse_hostport
from agent.deploy.installer import Deployer
from agent.deploy.state import Deployment
from agent.hardware import DeviceProfile, HardwareInfo, ProfileChoice, detect, load_profiles, select_profile
from agent.health.collector import HealthCollector
from agent.health.metrics import Metrics
from agent.health.system import CpuSampler, SystemSnapshot, read_system, release_free_heap
from agent.health.watchdog import Watchdog, WatchdogPolicy
from agent.models.registry import ModelRegistry
from agent.pipelines.manager import StreamManager
from agent.systemd import Notifier
from agent.version import __version__

if TYPE_CHECKING:
    from agent.cloud import CloudLink

log = structlog.get_logger(__name__)


def all_profiles(config: Config) -> list[DeviceProfile]:
    """Packaged profiles, overridden by name by those in ``agent.profiles_dir``."""
    profiles = {p.name: p for p in load_profiles()}
    if config.agent.profiles_dir is not None:
        profiles.update({p.name: p for p in load_profiles(config.agent.profiles_dir)})
    return list(profiles.values())


class Agent:
    """Everything one running agent holds; the API reads its state from here."""

    def __init__(self, config: Config, hardware: HardwareInfo | None = None,
                 profile: ProfileChoice | None = None) -> None:
        self.config = config
        self.version = __version__
        self.metrics = Metrics()
        self.health = HealthCollector(root=config.agent.hardware_root, state_dir=config.agent.state_dir,
                                      extra=self._health_extra).register(self.metrics.registry)
        self.telemetry_sampler = CpuSampler()  # telemetry's own CPU interval, apart from /metrics scrapes
        self.hardware = hardware or detect(config.agent.hardware_root)
        self.profile = profile or select_profile(self.hardware, all_profiles(config), config.agent.profile)
        self.threads = config.runtime.threads or self.profile.profile.threads
        self.registry = ModelRegistry(config, self.profile.profile.runtimes, self.threads, self.metrics)
        self.started_at = time.time()
        self.stopping = False
        self._server: HTTPServer | None = None
        self.listeners: list[str] = []
        self.link: CloudLink | None = None
        self.deployer = Deployer(self, emit=self._emit)
        w = config.watchdog
        self.watchdog = Watchdog(self, WatchdogPolicy(w.stuck_after_s, w.failures_before_recovery, w.max_recoveries,
                                                      w.window_s), emit=self._emit)
        self._watchdog_task: asyncio.Task[None] | None = None
        self.streams = StreamManager(self)
        self.deploy_tasks: dict[str, asyncio.Task[Any]] = {}
        self._bound = False

    async def start(self) -> None:
        """Load models, then listen. Raises AgentError if the socket cannot be bound."""
        log.info("agent.starting", version=self.version, device_id=self.config.agent.device_id,
                 profile=self.profile.profile.name, profile_reason=self.profile.reason,
                 models_dir=str(self.config.models_dir))
        recovered = await asyncio.to_thread(self.deployer.recover)  # undo what a crash interrupted
        await self.registry.load_all()
        if not self.registry.ready:
            log.warning("agent.no_models", models_dir=str(self.config.models_dir))
        if self.config.mqtt.url:
            # The link starts before the API and never blocks: a broker that is down only delays sync.
            from agent.cloud import CloudLink  # paho and the command handlers only when a link is configured

            self.link = CloudLink(self)
            await self.link.start()
        for record in recovered:
            self._emit({"type": f"deploy.{record.state}", "model": record.model, "version": record.version,
                        "previous": record.previous, "error": record.error})
        if self.config.watchdog.enabled:
            self._watchdog_task = asyncio.get_running_loop().create_task(self.watchdog.run(), name="model-watchdog")
        self._server = build_server(self)
        sock = bind_unix_socket(self.config.socket_path, self.config.api.socket_mode)
        self._bound = True
        await self._server.listen_unix(sock)
        self.listeners.append(f"unix:{self.config.socket_path}")
        if self.config.api.tcp:
            host, port = parse_hostport(self.config.api.tcp)
            await self._server.listen_tcp(host, port)
            self.listeners.append(f"tcp:{self.config.api.tcp}")
        await self.streams.start_configured()
        release_free_heap()
        log.info("agent.ready", listeners=self.listeners,
                 models=[f"{m.name}@{m.version}" for m in self.registry.served()],
                 seconds=round(time.time() - self.started_at, 3))

    def _health_extra(self) -> list[Metric]:
        """Stream, link and outbox gauges for /metrics, read at scrape time."""
        families: list[Metric] = []
        streams = self.streams.status()
        for key, help_text in (("inferred", "Inferences run by a stream"), ("dropped_frames", "Stale frames skipped"),
                               ("audio_overflow_samples", "Audio samples dropped on overflow"),
                               ("results", "Results published by a stream"), ("errors", "Stream item failures"),
                               ("reconnects", "Source reopen attempts")):
            family = CounterMetricFamily(f"edge_agent_stream_{key}", help_text, labels=["stream"])
            for s in streams:
                family.add_metric([s["name"]], float(s.get(key) or 0))
            families.append(family)
        for key, help_text in (("input_fps", "Items captured per second"), ("age_ms_p50", "Frame age at result, p50"),
                               ("age_ms_p99", "Frame age at result, p99"),
                               ("real_time_factor", "Audio processing time / audio duration")):
            gauge = GaugeMetricFamily(f"edge_agent_stream_{key}", help_text, labels=["stream"])
            for s in streams:
                if s.get(key) is not None:
                    gauge.add_metric([s["name"]], float(s[key]))
            families.append(gauge)
        if self.link is None:
            return families
        s, o = self.link.session.stats(), self.link.outbox.stats().to_dict()
        up = GaugeMetricFamily("edge_agent_link_connected", "MQTT link up (1) or down (0)")
        up.add_metric([], float(s["connected"]))
        reconnects = CounterMetricFamily("edge_agent_link_reconnects", "MQTT reconnects")
        reconnects.add_metric([], s["reconnects"])
        depth = GaugeMetricFamily("edge_agent_outbox_depth", "Messages waiting in the outbox")
        depth.add_metric([], o["depth"])
        dropped = CounterMetricFamily("edge_agent_outbox_dropped", "Messages dropped by the outbox bound",
                                      labels=["kind"])
        for kind, n in o["dropped"].items():
            dropped.add_metric([kind], n)
        return [*families, up, reconnects, depth, dropped]

    def system(self) -> SystemSnapshot:
        return read_system(root=self.config.agent.hardware_root, state_dir=self.config.agent.state_dir,
                           nvidia_smi=self.health.nvidia_smi, sampler=self.telemetry_sampler)

    def stuck_workers(self, threshold_s: float | None = None) -> list[str]:
        """Models whose inference call has run longer than the in-process watchdog can fix
        (three times its threshold): then systemd's watchdog should restart the process."""
        threshold_s = threshold_s if threshold_s is not None else self.config.watchdog.stuck_after_s * 3
        now = time.monotonic()
        return [f"{m.name}@{m.version}" for m in self.registry.served()
                if m.worker.busy_since is not None and now - m.worker.busy_since > threshold_s]

    def _emit(self, payload: Any) -> None:
        if self.link is not None:
            self.link.event(payload)

    def start_deploy(self, name: str, version: int | None) -> tuple[Deployment, asyncio.Task[Deployment]]:
        """Run a deployment in the background (API and commands share this).

        Raises:
            DeployError: one is already running for this model.
        """
        record = self.deployer.begin(name, version)
        task = asyncio.get_running_loop().create_task(self.deployer.run(record), name=f"deploy-{name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures live in the record
        self.deploy_tasks[name] = task
        return record, task

    async def stop(self) -> None:
        self.stopping = True
        log.info("agent.stopping")
        await self.streams.stop_all()  # before the API and models go: streams infer through them
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        for task in self.deploy_tasks.values():
            task.cancel()
        for task in self.deploy_tasks.values():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        if self._server is not None:
            await self._server.stop(self.config.agent.shutdown_timeout_s)
        if self.link is not None:
            await self.link.stop()
        await asyncio.to_thread(self.registry.close)
        if self._bound:  # never remove a socket another agent is serving on
            remove_socket(self.config.socket_path)
        log.info("agent.stopped")

    def status(self) -> dict[str, Any]:
        models = [m.describe() for m in self.registry.served()]
        models += [f.describe() for f in self.registry.failures.values()]
        for m in models:
            if m["state"] == "AVAILABLE":
                m["default"] = self.registry.default_version(m["name"]) == m["version"]
        return {
            "agent": {"version": self.version, "device_id": self.config.agent.device_id,
                      "started_at": self.started_at, "uptime_s": round(time.time() - self.started_at, 3),
                      "listeners": self.listeners, "models_dir": str(self.config.models_dir),
                      "config": self.config.source},
            "profile": {"name": self.profile.profile.name, "reason": self.profile.reason, "threads": self.threads},
            "hardware": self.hardware.to_dict(),
            "models": sorted(models, key=lambda m: (m["name"], -m["version"])),
            "link": self.link.session.stats() if self.link is not None else None,
            "outbox": self.link.outbox.stats().to_dict() if self.link is not None else None,
            "system": self.system().to_dict(),
            "deployments": [r.to_dict() for r in self.deployer.store.all()],
            "streams": self.streams.status(),
        }


async def _watchdog(agent: Agent, notifier: Notifier, interval: float) -> None:
    """Ping systemd at half its timeout, but only while every inference worker is responsive."""
    while True:
        stuck = agent.stuck_workers()
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
        served = [f"{m.name}@{m.version}" for m in agent.registry.served()]
        if not stop.is_set():  # a SIGTERM during start-up: never claim readiness while stopping
            notifier.ready(f"serving {len(served)} model(s) on {', '.join(agent.listeners)}")
        if notifier.watchdog_interval:
            pinger = loop.create_task(_watchdog(agent, notifier, notifier.watchdog_interval), name="watchdog")
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


def run(config: Config) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
