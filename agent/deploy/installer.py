"""The install state machine: download → verify → stage → load → test → swap → health → commit.

Every step is persisted (``DeploymentStore``) before the next begins, so a crash at any
point is undone by :meth:`Deployer.recover` at the next start: an unfinished install leaves
no trace, and a version that was swapped in but never committed is rolled back. The
previous version stays loaded during and after the swap: requests in flight finish on it,
and a rollback is a pointer switch, not a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from agent.config import ShadowSection, UpdatesSection
from agent.core.ports import EventSink, ModelSwapper
from agent.deploy.health import HealthPolicy, verdict
from agent.deploy.state import SHADOW, Deployment, DeploymentStore
from agent.errors import AgentError, DeployError, PipelineError, ShadowNotFoundError
from agent.health.system import release_free_heap
from agent.models.shadow import Shadow, ShadowPolicy, Shadows
from agent.models.store import ACTIVE, ModelVersion
from agent.runtimes import get_backend
from cloud_sync.errors import CloudSyncError, cap_message
from cloud_sync.fsutil import fsync_dir, write_atomic

if TYPE_CHECKING:
    from agent.models.served import ServedModel
    from cloud_sync.bundles.manifest import Manifest
    from cloud_sync.updater.client import BundleUpdater

log = structlog.get_logger(__name__)

#: Called after each persisted step with (model, state): plugins may observe (or, in crash tests, pause) here.
StepHook = Callable[[str, str], Awaitable[None]]
STEP_HOOKS: list[StepHook] = []  # filled by plugins (``[agent] plugins``) before the deployer is built


@dataclass(frozen=True)
class DeviceFacts:
    """What a bundle's constraints are checked against."""

    agent_version: str
    accelerators: frozenset[str] = frozenset()


@dataclass
class _Attempt:
    """What one install has made so far: what undoing it must take away."""

    record: Deployment
    staging: Path | None = None
    candidate: ServedModel | None = None
    manifest: Manifest | None = None
    swapped: bool = False


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+", maxsplit=1)[0].split(".") if p.isdigit())


class Deployer:
    """Installs signed bundles into ``models_dir`` and swaps them in through ``models``.

    Owns the running deployments (one per model at a time) and their persisted records.
    """

    def __init__(self, settings: UpdatesSection, *, models_dir: Path, state_dir: Path, models: ModelSwapper,
                 sink: EventSink, device: DeviceFacts, step_hooks: Sequence[StepHook] = (),
                 updater: BundleUpdater | None = None, cache_dir: Path | None = None,
                 shadow: ShadowSection | None = None) -> None:
        self.cfg = settings
        self.shadow_cfg = shadow or ShadowSection()
        self.shadows = Shadows()  # candidates running beside their serving version (docs/shadow.md)
        self._shadowed: dict[str, _Attempt] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.models_dir = models_dir
        self.state_dir = state_dir
        self.cache_dir = cache_dir or settings.cache_dir or state_dir / "cache"
        self.models = models
        self.sink = sink
        self.device = device
        self.step_hooks = tuple(step_hooks)
        self.store = DeploymentStore(state_dir / "deployments")
        self.tasks: dict[str, asyncio.Task[Deployment]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._begun: set[str] = set()
        self._last_progress = 0.0  # monotonic time of the last download progress log
        self._updater = updater  # built from the settings at the first deployment when not given

    # -- wiring ------------------------------------------------------------------------------------------
    def updater(self) -> BundleUpdater:
        if self._updater is None:
            if not self.cfg.repo_url or not self.cfg.trusted_root:
                raise DeployError("not_configured", "signed updates need [updates] repo_url and trusted_root")
            from cloud_sync.updater.client import BundleUpdater

            self._updater = BundleUpdater(self.cfg.metadata_dir or self.state_dir / "tuf", self.cfg.repo_url,
                                          trusted_root=self.cfg.trusted_root, cache_dir=self.cache_dir,
                                          max_bundle_bytes=self.cfg.max_bundle_bytes,
                                          bandwidth=self.cfg.bandwidth_bytes_s, progress=self._progress,
                                          deadline=self.cfg.download_deadline_s,
                                          min_rate=self.cfg.download_min_rate_bytes_s,
                                          rate_grace=self.cfg.download_rate_grace_s)
        return self._updater

    def _progress(self, url: str, received: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last_progress >= 1.0 or (total and received >= total):
            self._last_progress = now
            log.info("deploy.download_progress", url=url, received=received, total=total)

    def _event(self, record: Deployment, **extra: Any) -> None:
        payload = {"type": f"deploy.{record.state}", "model": record.model, "version": record.version,
                   "previous": record.previous, **extra}
        if record.error:
            payload["error"] = record.error
        self.sink.event(payload)

    async def _hooks(self, record: Deployment) -> None:
        for hook in self.step_hooks:
            await hook(record.model, record.state)

    async def _step(self, record: Deployment, state: str, **extra: Any) -> None:
        record.state = state
        await asyncio.to_thread(self.store.save, record)
        log.info("deploy.step", model=record.model, version=record.version, state=state, **extra)
        self._event(record, **extra)
        await self._hooks(record)

    # -- running deployments ---------------------------------------------------------------------------------
    async def start(self, name: str, version: int | None, mode: str = "swap",
                    policy: ShadowPolicy | None = None) -> Deployment:
        """Begin a deployment and run it in the background; follow it with ``record``/``running``.
        ``mode`` ``shadow`` stops after the tests and runs the candidate beside the serving version.

        Raises:
            DeployError: one is already running for this model, or a shadow of it (``busy``); a
                shadow of a model that serves nothing (``not_serving``).
        """
        self._loop = asyncio.get_running_loop()
        record = await self.begin(name, version, mode)
        task = asyncio.get_running_loop().create_task(self.run(record, policy), name=f"deploy-{name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures live in the record
        self.tasks[name] = task
        return record

    def running(self, name: str) -> bool:
        task = self.tasks.get(name)
        return task is not None and not task.done()

    async def wait(self, name: str) -> Deployment:
        """The outcome of ``name``'s running deployment.

        Raises:
            DeployError: it failed or was rolled back.
        """
        return await asyncio.shield(self.tasks[name])

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel running deployments; each undoes what it did (the device keeps serving)."""
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout)
        for shadow in self.shadows.all():
            with contextlib.suppress(AgentError):
                await self.discard(shadow.name, "the agent stopped", by="stop")

    # -- deploy ---------------------------------------------------------------------------------------------
    async def deploy(self, name: str, version: int | None = None) -> Deployment:
        """Install ``name`` (``version`` or the latest) from the TUF repository.

        Raises:
            DeployError: it failed (nothing changed) or was rolled back; ``code`` says why.
        """
        return await self.run(await self.begin(name, version))

    async def begin(self, name: str, version: int | None, mode: str = "swap") -> Deployment:
        """Persist a new deployment record (state ``started``) so callers can follow it at once.

        Raises:
            DeployError: a deployment or a shadow of this model is already running (``busy``); a
                shadow of a model that serves nothing (``not_serving``).
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked() or name in self._begun:
            raise DeployError("busy", f"a deployment of '{name}' is already running")
        self._refuse_if_shadowed(name)
        if mode == "shadow" and not self.models.versions(name):
            raise DeployError("not_serving", f"'{name}' serves no version for a shadow to run beside")
        self._begun.add(name)  # before the first wait: a second caller meanwhile is refused
        try:
            previous = self.models.default_version(name) if self.models.versions(name) else None
            record = Deployment(name, version, previous, mode=mode)
            await asyncio.to_thread(self.store.save, record)
        except BaseException:
            self._begun.discard(name)
            raise
        return record

    async def run(self, record: Deployment, policy: ShadowPolicy | None = None) -> Deployment:
        async with self._locks.setdefault(record.model, asyncio.Lock()):
            self._begun.discard(record.model)
            attempt = _Attempt(record)

            async def steps() -> Deployment:
                await self._install(attempt)
                if record.mode == "shadow":
                    return await self._start_shadow(attempt, policy or self._default_policy())
                return await self._swap(attempt)

            return await self._guarded(attempt, steps)

    async def _guarded(self, attempt: _Attempt, steps: Callable[[], Awaitable[Deployment]]) -> Deployment:
        """Run ``steps``; any failure undoes what ``attempt`` made and ends the record (failed or rolled back)."""
        record = attempt.record
        name = record.model
        try:
            return await steps()
        except (AgentError, CloudSyncError, OSError) as exc:
            code = getattr(exc, "code", "io_error") if not isinstance(exc, OSError) else "io_error"
            message = cap_message(str(exc))  # a hostile bundle's names end up in errors: never whole
            await self._undo(record, attempt.candidate, attempt.staging, attempt.swapped, code, message)
            outcome = "rolled back" if attempt.swapped else "failed"
            raise DeployError(code, cap_message(f"deploy of {name}@{record.version or 'latest'} "
                                                f"{outcome}: {message}")) from exc
        except asyncio.CancelledError:
            await asyncio.shield(self._undo(record, attempt.candidate, attempt.staging, attempt.swapped, "cancelled",
                                            "the agent stopped"))
            raise
        except Exception as exc:  # a bug must still leave the device serving and the record final
            message = cap_message(f"{type(exc).__name__}: {exc}")
            log.error("deploy.internal_error", model=name, version=record.version, error=message,
                      traceback=cap_message("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                                            16 * 1024))
            await self._undo(record, attempt.candidate, attempt.staging, attempt.swapped, "internal", message)
            raise DeployError("internal", cap_message(f"deploy of {name} failed: {message}")) from exc

    async def _install(self, attempt: _Attempt) -> None:
        """Download, verify, stage, load and test: everything short of serving."""
        record, models = attempt.record, self.models
        name, version, previous = record.model, record.version, record.previous
        self._event(record)
        await self._hooks(record)  # begin() saved this step itself
        updater = self.updater()
        await asyncio.to_thread(updater.refresh)  # new metadata every time: find() alone never refreshes again
        info = await asyncio.to_thread(updater.find, name, version)
        record.version = info.version
        if info.version == previous:
            raise DeployError("already_active", f"'{name}' version {info.version} is already serving")
        self._check_disk(info.length)
        await self._step(record, "downloading", bytes=info.length)
        bundle = await asyncio.to_thread(updater.download, name, info.version)
        await self._step(record, "verified")  # TUF checked signatures, length and hashes
        from cloud_sync.bundles.archive import ExtractLimits, extract_bundle  # only when installing

        staging = attempt.staging = self.models_dir / name / f".staging-{info.version}"
        await asyncio.to_thread(shutil.rmtree, staging, True)
        limits = ExtractLimits(max_member_bytes=self.cfg.max_member_bytes,
                               max_total_bytes=self.cfg.max_bundle_bytes * 4, max_members=self.cfg.max_members)
        try:
            manifest = await asyncio.to_thread(extract_bundle, bundle, staging, limits)
        finally:
            bundle.unlink(missing_ok=True)  # extracted or refused: the archive is not needed again
        self._check_manifest(manifest, name, info.version)
        attempt.manifest = manifest
        await self._step(record, "staged")
        entry = ModelVersion(name, info.version, staging, staging / manifest.model, manifest.runtime)
        # A shadow runs on its own thread with few runtime threads: the serving version keeps the CPU.
        if record.mode == "shadow":
            candidate = await models.prepare(entry, warm_up=False, threads=self.shadow_cfg.threads)
        else:
            candidate = await models.prepare(entry, warm_up=False)
        attempt.candidate = candidate
        await self._step(record, "loaded", delegate=candidate.session.delegate)
        self._check_processing(manifest, candidate)
        await asyncio.to_thread(self._run_test_vectors, candidate, manifest, staging)
        await self._step(record, "tested", vectors=len(manifest.test_vectors))

    async def _swap(self, attempt: _Attempt, *, reload: bool = False) -> Deployment:
        """Promote the staged files, serve the candidate, watch the health window, commit.

        ``reload``: load the version again from its final place with the normal runtime threads
        (a promoted shadow ran on fewer)."""
        record, models = attempt.record, self.models
        manifest, candidate, staging = attempt.manifest, attempt.candidate, attempt.staging
        assert manifest is not None and candidate is not None and staging is not None and record.version is not None
        name, version, previous = record.model, record.version, record.previous
        final = await asyncio.to_thread(self._promote, staging, name, version)
        attempt.staging = None
        entry = ModelVersion(name, version, final, final / manifest.model, manifest.runtime)
        if reload:
            attempt.candidate = None
            await asyncio.to_thread(candidate.close)
            candidate = attempt.candidate = await models.prepare(entry)
        candidate.source = entry
        models.register(candidate)
        await asyncio.to_thread(self._write_active, name, version)
        candidate.nonfinite_check = manifest.nonfinite_outputs()  # NaN answers count as errors in the window
        models.set_active(name, version)  # the swap: new requests go to the new version
        attempt.swapped = True
        await self._step(record, "swapped")
        self.sink.inventory_changed()
        await self._step(record, "health", window_s=self.cfg.health_window_s)
        reason = await self._health_window(candidate, previous)
        if reason:
            raise DeployError("health_regression", reason)
        candidate.nonfinite_check = None
        record.state = "committed"
        await asyncio.to_thread(self.store.save, record)
        self._event(record)
        log.info("deploy.committed", model=name, version=version, previous=previous)
        await self._gc(name, version, previous)
        release_free_heap()  # the old version's memory and the staging churn
        return record

    def pinning(self, name: str) -> str | None:
        """Why ``name``'s versions must stay loaded now (``agent.models.residency``): a deployment or
        rollback under way, or a shadow beside it; None otherwise."""
        lock = self._locks.get(name)
        if lock is not None and lock.locked():
            return "deployment"
        task = self.tasks.get(name)
        if task is not None and not task.done():
            return "deployment"
        if self.shadows.get(name) is not None or name in self._shadowed:
            return "shadow"
        return None

    # -- shadows ----------------------------------------------------------------------------------------
    def _refuse_if_shadowed(self, name: str) -> None:
        shadow = self.shadows.get(name)
        if shadow is not None:
            raise DeployError("busy", f"a shadow of '{name}' (version {shadow.candidate.version}) is running: "
                                      "promote or discard it first")

    def _default_policy(self) -> ShadowPolicy:
        c = self.shadow_cfg
        return ShadowPolicy(c.sample, c.min_samples, c.min_agreement, c.max_latency_ratio)

    def policy(self, overrides: dict[str, Any] | None) -> ShadowPolicy:
        """``[shadow]``'s defaults with a deploy command's overrides (None values keep the default)."""
        base = self._default_policy()
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        return ShadowPolicy(**{**base.to_dict(), **given})

    async def _start_shadow(self, attempt: _Attempt, policy: ShadowPolicy) -> Deployment:
        """The candidate passed its tests: it now answers a sample of live traffic, beside the serving one."""
        from agent.models.agreement import RawComparator, make_comparator

        record, candidate, manifest = attempt.record, attempt.candidate, attempt.manifest
        assert candidate is not None and manifest is not None and attempt.staging is not None
        name = record.model
        if not self.models.versions(name):
            raise DeployError("not_serving", f"'{name}' no longer serves a version for the shadow to run beside")
        serving = self.models.get(name)
        record.previous = serving.version
        post = manifest.postprocess.model_dump() if manifest.postprocess is not None else None
        labels = await asyncio.to_thread(_labels, attempt.staging, manifest)
        try:
            comparator = make_comparator(post, serving.outputs, candidate.outputs, labels)
        except PipelineError as exc:  # the serving version's outputs do not fit: compare tensors
            log.warning("shadow.raw_comparison", model=name, reason=str(exc))
            comparator = RawComparator()
        process = None
        if self.shadow_cfg.process:
            from agent.models.shadow_process import ShadowProcess

            init = {"file": str(candidate.source.file), "runtime": candidate.runtime,
                    "delegates": [(d.name, d.library, dict(d.options)) for d in self.models.delegates_for(
                                  candidate.runtime) if d.name == candidate.session.delegate],
                    "threads": self.shadow_cfg.threads, "post": post, "labels": labels,
                    "serving_outputs": list(serving.outputs),
                    "options": {"allow_spinning": False, "memory_arena": False, "inter_op_threads": 1}}
            process = await asyncio.to_thread(ShadowProcess, init, nice=self.shadow_cfg.nice,
                                                idle_class=self.shadow_cfg.idle_class)
        shadow = Shadow(serving, candidate, comparator, policy, decide=self._decide,
                        queue_size=self.shadow_cfg.queue_size, nice=0 if process else self.shadow_cfg.nice,
                        deployment=record.id, process=process, yield_to_serving=self.shadow_cfg.yield_to_serving)
        self._shadowed[name] = attempt
        self.shadows.add(shadow)
        await self._step(record, "shadowing", serving_version=serving.version, kind=comparator.kind,
                         sample=policy.sample)
        shadow.start()
        self.sink.inventory_changed()
        log.info("shadow.started", model=name, version=record.version, serving_version=serving.version,
                 kind=comparator.kind, policy=policy.to_dict())
        return record

    def _decide(self, name: str, action: str, reason: str) -> None:
        """A shadow's policy decided (its own thread): promote or discard on the event loop."""
        loop = self._loop
        if loop is None:
            return

        def act() -> None:
            if action == "promote":
                with contextlib.suppress(AgentError):
                    self.promote_start(name, by="policy")
            else:
                task = loop.create_task(self.discard(name, reason, by="policy"), name=f"discard-{name}")
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

        loop.call_soon_threadsafe(act)

    def _mirroring(self, name: str, version: int | None) -> tuple[Shadow, _Attempt]:
        """The shadow of ``name`` (of ``version``, when given) still mirroring.

        Raises:
            ShadowNotFoundError: none, or one of another version (the one asked for ended meanwhile).
            DeployError: it is already being promoted (``busy``).
        """
        shadow, attempt = self.shadows.get(name), self._shadowed.get(name)
        if shadow is None or attempt is None:
            raise ShadowNotFoundError(f"no shadow of '{name}' is running")
        if version is not None and attempt.record.version != version:
            raise ShadowNotFoundError(f"no shadow of '{name}' version {version} is running (the shadow running is "
                                      f"version {attempt.record.version})")
        if shadow.state != "mirroring":
            raise DeployError("busy", f"the shadow of '{name}' is already {shadow.state}")
        return shadow, attempt

    def promote_start(self, name: str, by: str = "command", version: int | None = None) -> Deployment:
        """Swap a shadow in (the normal swap with its health window), in the background. ``version``:
        only if the shadow is that version (a fleet's promote must not reach a later shadow).

        Raises:
            ShadowNotFoundError: no shadow of ``name`` (of ``version``) is running.
            DeployError: it is already being promoted (``busy``).
        """
        shadow, attempt = self._mirroring(name, version)
        shadow.state = "promoting"
        shadow.decision = shadow.decision or {"action": "promote", "reason": "promote requested", "by": by}
        self._loop = asyncio.get_running_loop()
        task = self._loop.create_task(self._promote_shadow(shadow, attempt), name=f"promote-{name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.tasks[name] = task
        return attempt.record

    async def _promote_shadow(self, shadow: Shadow, attempt: _Attempt) -> Deployment:
        name = shadow.name
        async with self._locks.setdefault(name, asyncio.Lock()):
            figures = shadow.describe()
            await asyncio.to_thread(shadow.stop)
            self.shadows.pop(name)
            self._shadowed.pop(name, None)
            record = attempt.record
            record.previous = self.models.default_version(name) if self.models.versions(name) else None
            log.info("shadow.promoted", model=name, version=record.version, agreement=figures["agreement"],
                     compared=figures["compared"], by=(shadow.decision or {}).get("by"))
            self.sink.event({"type": "shadow.promoted", "model": name, "version": record.version,
                             "previous": record.previous, "decision": shadow.decision, "shadow": _brief(figures)})
            return await self._guarded(attempt, lambda: self._swap(attempt, reload=True))

    async def discard(self, name: str, reason: str = "discard requested", by: str = "command",
                      version: int | None = None) -> dict[str, Any]:
        """Stop a shadow and remove its files; the serving version is untouched. ``version``: only if
        the shadow is that version.

        Raises:
            ShadowNotFoundError: no shadow of ``name`` (of ``version``) is running.
            DeployError: it is being promoted (``busy``).
        """
        shadow, attempt = self._mirroring(name, version)
        shadow.state = "discarded"
        shadow.decision = shadow.decision if by == "policy" else {"action": "discard", "reason": reason, "by": by}
        self.shadows.pop(name)
        self._shadowed.pop(name, None)
        figures = shadow.describe()
        await asyncio.to_thread(shadow.stop)
        if attempt.candidate is not None:
            await asyncio.to_thread(attempt.candidate.close)
        if attempt.staging is not None:
            await asyncio.to_thread(shutil.rmtree, attempt.staging, True)
        record = attempt.record
        record.state = "discarded"
        record.error = {"code": "policy" if by == "policy" else "manual", "message": cap_message(reason)}
        await asyncio.to_thread(self.store.save, record)
        self._event(record, shadow=_brief(figures))
        self.sink.inventory_changed()
        log.info("shadow.discarded", model=name, version=record.version, reason=reason, by=by,
                 agreement=figures["agreement"], compared=figures["compared"])
        return {"model": name, "version": record.version, "discarded": True, "reason": reason, "by": by,
                "shadow": figures}

    def _check_disk(self, length: int) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.models_dir).free
        need = 3 * length + self.cfg.min_free_bytes  # archive, extracted copy, margin
        if free < need:
            raise DeployError("disk_full", f"{free} bytes free under {self.models_dir}, need {need}")

    def _check_manifest(self, manifest: Manifest, name: str, version: int) -> None:
        if manifest.name != name or manifest.version != version:
            raise DeployError("bad_manifest", f"bundle says {manifest.name}@{manifest.version}, "
                                              f"the signed target is {name}@{version}")
        if self.cfg.require_test_vectors and not manifest.test_vectors:
            raise DeployError("test_vectors_failed", "the bundle has no test vectors and [updates] "
                                                     "require_test_vectors is set")
        c = manifest.constraints
        have_version = self.device.agent_version
        if c.min_agent_version and _version_tuple(have_version) < _version_tuple(c.min_agent_version):
            raise DeployError("incompatible", f"needs agent {c.min_agent_version}, this is {have_version}")
        for runtime in {manifest.runtime, *c.runtimes}:
            try:
                get_backend(runtime).version()
            except AgentError as exc:
                raise DeployError("runtime_unavailable", f"runtime '{runtime}' is not available here: {exc}") from exc
        have = self.device.accelerators
        missing = [a for a in c.accelerators if a not in have]
        if missing:
            raise DeployError("runtime_unavailable", f"needs accelerator {', '.join(missing)}; this device has "
                                                     f"{', '.join(sorted(have)) or 'none'}")

    @staticmethod
    def _check_processing(manifest: Manifest, served: ServedModel) -> None:
        """The manifest's pre/post-processing must fit the model's tensors: refused before the swap."""
        from agent.errors import PipelineError

        if manifest.preprocess is None and manifest.postprocess is None:
            return
        from agent.pipelines.postprocess import make_postprocessor
        from agent.pipelines.preprocess import make_preprocessor

        try:
            if manifest.preprocess is not None:
                make_preprocessor(manifest.preprocess.model_dump(), served.session.inputs, served.session.outputs)
            if manifest.postprocess is not None:
                make_postprocessor(manifest.postprocess.model_dump(), served.session.outputs, None)
        except PipelineError as exc:
            raise DeployError("bad_pipeline", f"manifest processing does not fit the model: {exc}") from exc

    def _run_test_vectors(self, served: ServedModel, manifest: Manifest, root: Path) -> None:
        """Each vector must reproduce its expected outputs, and every output must be finite unless
        the manifest allows otherwise; doubles as the warm-up.

        Raises:
            ManifestError: a vector's tensor does not fit (``bad_manifest``).
            DeployError: ``test_vectors_failed``.
        """
        from agent.models.served import all_finite
        from cloud_sync.bundles.build import tensor_array

        if not manifest.test_vectors:
            self.models.warm_up(served)
            return
        allowed = manifest.nonfinite_outputs()
        for i, vector in enumerate(manifest.test_vectors):
            where = f"test_vectors[{i}]"
            feeds = {n: tensor_array(v.model_dump(), root, field=f"{where}.inputs.{n}")
                     for n, v in vector.inputs.items()}
            try:
                outputs = served.worker.run_sync(feeds)
            except AgentError as exc:
                raise DeployError("test_vectors_failed", f"{where}: the model failed: {exc}") from exc
            for out_name, value in vector.expected.items():
                want = tensor_array(value.model_dump(), root, field=f"{where}.expected.{out_name}")
                got = outputs.get(out_name)
                if got is None:
                    raise DeployError("test_vectors_failed", f"{where}.expected.{out_name}: the model has no such "
                                                             f"output (it has {', '.join(outputs) or 'none'})")
                if got.shape != want.shape:
                    raise DeployError("test_vectors_failed", f"{where}.expected.{out_name}: output shape "
                                                             f"{list(got.shape)}, expected {list(want.shape)}")
                try:
                    close = bool(np.allclose(got, want, rtol=vector.rtol, atol=vector.atol,
                                             equal_nan=out_name in allowed))
                    worst = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
                except (TypeError, ValueError) as exc:  # an output numpy cannot compare (strings, objects)
                    raise DeployError("test_vectors_failed", f"{where}.expected.{out_name}: output cannot be "
                                                             f"compared: {exc}") from exc
                if not close:
                    raise DeployError("test_vectors_failed",
                                      f"{where}.expected.{out_name}: output differs (max abs error "
                                      f"{worst:.3g}, rtol {vector.rtol:g}, atol {vector.atol:g})")
            if not all_finite(outputs, allowed):
                bad = [n for n in outputs if not all_finite({n: outputs[n]}, allowed)]
                raise DeployError("test_vectors_failed", f"{where}: output {', '.join(bad)} holds NaN or infinity "
                                                         "(allow_nonfinite is not set for it)")

    def _promote(self, staging: Path, name: str, version: int) -> Path:
        final = self.models_dir / name / str(version)
        if final.exists():  # a reinstall of a version that is on disk but not serving
            final.rename(self.models_dir / name / f".replaced-{version}-{int(time.time())}")
        staging.rename(final)
        fsync_dir(final.parent)
        return final

    def _write_active(self, name: str, version: int | None) -> None:
        path = self.models_dir / name / ACTIVE
        if version is None:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        else:
            write_atomic(path, f"{version}\n".encode())

    async def _health_window(self, served: ServedModel, previous: int | None) -> str | None:
        policy = HealthPolicy(self.cfg.health_min_requests, self.cfg.health_max_error_rate,
                              self.cfg.health_max_latency_ratio, self.cfg.health_latency_floor_ms / 1e3)
        old = self.models.find(served.name, previous) if previous else None
        # Runtime-call times, not request latencies: the queue grows with the load of the moment (a stream
        # starting during the deploy), and would make a good version look slower than the old one's history.
        baseline = list(old.stats.compute_times) if old is not None else []
        stats = served.stats
        # A request the new version rejects (its inputs changed) failed for the client as much as one that
        # failed to run: both count as errors here, and so do answers holding NaN or infinity.
        start_requests, start_errors = stats.requests + stats.rejected, stats.errors + stats.rejected
        start_calls, start_nonfinite = stats.execution_count, stats.nonfinite

        def in_window() -> list[float]:  # only runtime calls made during the window
            new = stats.execution_count - start_calls
            return list(stats.compute_times)[-new:] if new else []

        def judged(latencies: list[float]) -> str | None:
            requests = stats.requests + stats.rejected - start_requests
            errors = stats.errors + stats.rejected - start_errors
            return verdict(policy, requests, errors, latencies, baseline, nonfinite=stats.nonfinite - start_nonfinite)

        deadline = time.monotonic() + self.cfg.health_window_s
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
            reason = judged([])  # the error rate is decisive at once; latency is judged at the end
            if reason:
                return reason
        return judged(in_window())

    async def _undo(self, record: Deployment, candidate: ServedModel | None, staging: Path | None,  # noqa: PLR0917
                    swapped: bool, code: str, message: str) -> None:
        name, version = record.model, record.version
        try:
            if swapped and version is not None:
                self.models.set_active(name, record.previous)  # back to the old version first: no gap
                await asyncio.to_thread(self._write_active, name, record.previous)
                await self.models.unload(name, version)
                await asyncio.to_thread(self._reject, name, version)
                self.sink.inventory_changed()
            elif candidate is not None:
                await asyncio.to_thread(candidate.close)
            if staging is not None:
                await asyncio.to_thread(shutil.rmtree, staging, True)
        finally:
            record.state = "rolled_back" if swapped else "failed"
            message = cap_message(message)
            record.error = {"code": code, "message": message}
            await asyncio.to_thread(self.store.save, record)
            self._event(record)
            log.warning("deploy.undone", model=name, version=version, state=record.state, code=code,
                        reason=message)

    def _reject(self, name: str, version: int) -> None:
        """Move a bad version aside so a restart does not bring it back."""
        path = self.models_dir / name / str(version)
        if path.exists():
            path.rename(self.models_dir / name / f".rejected-{version}-{int(time.time())}")
            fsync_dir(path.parent)

    async def _gc(self, name: str, current: int, previous: int | None) -> None:
        """Keep ``keep_versions`` newest versions on disk and current + previous in memory."""
        await asyncio.to_thread(self._gc_disk, name, current, previous)
        for v in self.models.versions(name):
            if v not in (current, previous):
                await self.models.unload(name, v)

    def _gc_disk(self, name: str, current: int, previous: int | None) -> None:
        model_dir = self.models_dir / name
        versions = sorted((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), reverse=True)
        keep = {current, *( [previous] if previous else [])}
        for v in versions:
            if len(keep) >= self.cfg.keep_versions:
                break
            keep.add(v)
        for v in versions:
            if v not in keep:
                shutil.rmtree(model_dir / str(v), ignore_errors=True)
                log.info("deploy.gc_removed", model=name, version=v)
        for p in model_dir.iterdir():
            if p.name.startswith((".rejected-", ".replaced-")):
                shutil.rmtree(p, ignore_errors=True)

    # -- rollback and recovery -------------------------------------------------------------------------------
    async def rollback(self, name: str) -> dict[str, Any]:
        """Serve the previous version again and set the current one aside.

        Raises:
            DeployError: no other version to go back to.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self._refuse_if_shadowed(name)
            models = self.models
            if not models.versions(name):
                raise DeployError("not_found", f"model '{name}' is not loaded")
            current = models.default_version(name)
            on_disk = await asyncio.to_thread(self._versions_on_disk, name)
            older = [v for v in on_disk if v < current]
            if not older:
                raise DeployError("no_previous", f"'{name}' has no version older than {current} to go back to")
            target = older[0]
            if models.find(name, target) is None:
                entry = next((e for e in await asyncio.to_thread(self._entries, name) if e.version == target), None)
                if entry is None:
                    raise DeployError("no_previous", f"'{name}' version {target} on disk holds no model file to go "
                                                     "back to")
                models.register(await models.prepare(entry))
            models.set_active(name, target)
            await asyncio.to_thread(self._write_active, name, target)
            await models.unload(name, current)
            await asyncio.to_thread(self._reject, name, current)
            self.sink.inventory_changed()
            self.sink.event({"type": "deploy.rolled_back", "model": name, "version": current, "previous": target,
                       "error": {"code": "manual", "message": "rollback requested"}})
            log.info("deploy.manual_rollback", model=name, version=current, to=target)
            return {"model": name, "from": current, "to": target}

    def _versions_on_disk(self, name: str) -> list[int]:
        return sorted((int(p.name) for p in (self.models_dir / name).iterdir() if p.name.isdigit()), reverse=True)

    def _entries(self, name: str) -> list[ModelVersion]:
        from agent.models.store import scan

        return scan(self.models_dir).get(name, [])

    def recover(self) -> list[Deployment]:
        """Undo deployments a crash interrupted; call before the models are loaded."""
        undone = []
        for record in self.store.all():
            if record.final:
                continue
            name, version = record.model, record.version
            if version is not None:
                shutil.rmtree(self.models_dir / name / f".staging-{version}", ignore_errors=True)
            interrupted = record.state
            if record.state in SHADOW:  # a shadow is an experiment: it does not outlive the process
                record.state = "discarded"
            elif record.state in ("swapped", "health") or (record.state == "tested" and version is not None):
                active_now = (self.models_dir / name / ACTIVE)
                if version is not None and (record.state != "tested" or active_now.exists()
                                            or (self.models_dir / name / str(version)).exists()):
                    self._write_active(name, record.previous)
                    self._reject(name, version)
                record.state = "rolled_back" if interrupted in ("swapped", "health") else "failed"
            else:
                record.state = "failed"
            record.error = {"code": "interrupted", "message": f"the agent stopped during '{interrupted}'"}
            self.store.save(record)
            undone.append(record)
            log.warning("deploy.recovered", model=name, version=version, interrupted=interrupted,
                        state=record.state)
        return undone


def _brief(figures: dict[str, Any]) -> dict[str, Any]:
    """What an event carries of a shadow's figures."""
    return {k: figures[k] for k in ("kind", "compared", "dropped", "errors", "agreement", "metrics", "latency_ms",
                                    "latency_ratio", "serving_version")}


def _labels(root: Path, manifest: Manifest) -> list[str] | None:
    labels = getattr(manifest, "labels", None)
    if not labels:
        return None
    path = root / labels
    return path.read_text().splitlines() if path.is_file() else None
