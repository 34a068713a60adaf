"""Rollouts whose state lives in the database: waves of ``deploy`` commands, per-device status, abort, resume.

A deployment is planned once (targets resolved, waves fixed, one stable command id per device:
a hash of deployment and device) and then driven by :class:`RolloutRunner`, one step at a time,
by whichever instance holds its lease. A step reads the commands' outcomes (final responses, or the
devices' ``command.completed`` events, both stored by ingestion), sends the current wave, times out
stragglers, and when the wave is over either aborts (too many failures), finishes, or starts the
next wave. Every step is a few short transactions, so killing the service at any point loses
nothing: the next step (after a restart, or on another instance once the lease expires) carries on
from the table. A device is never sent a second deploy: a command is re-published only when the
service cannot know whether it went out (it died between recording and the broker's PUBACK), and
then with the same id, which the device's dispatcher answers without running it again.

A ``shadow`` rollout (docs/shadow.md) sends ``deploy`` with ``"mode": "shadow"``: a device has succeeded when
it answers in state ``shadowing`` (the candidate runs beside the serving version), not ``committed``. Once the
rollout is over, an operator's :meth:`Rollouts.act` sends ``promote`` or ``discard`` to the devices that got
there, each with a stable id too; those outcomes are the commands' own (ingestion stores them), read with the
deployment.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from paho.mqtt.enums import MQTTErrorCode
from pydantic import ValidationError

from cloud_sync.fleet.console import plan_waves
from cloud_sync.fleet.server import schema as s
from cloud_sync.fleet.server.db import Database
from cloud_sync.fleet.server.errors import BrokerUnavailableError, ConflictError, NotFoundError, RequestError
from cloud_sync.fleet.server.messages import NAME_RE
from cloud_sync.mqtt.contract import DEPLOY_MODES, SHADOW_STEPS, ShadowArgs

if TYPE_CHECKING:
    from cloud_sync.fleet.server.commands import CommandService

log = structlog.get_logger(__name__)

AMOUNT_RE = re.compile(r"^(\d{1,7})(%?)$")
FINAL = ("succeeded", "failed", "timeout", "skipped")
IN_FLIGHT = ("sending", "sent", "accepted")
LEASE_S = 15.0
RESEND_S = 30.0
#: Deploy commands sent per deployment per tick: a tick renews the lease, and sending a 25,000-device wave at
#: once took longer than the lease (45 s on a busy 2-vCPU machine), which would let another instance take over.
SEND_MAX = 2000
#: What an operator may do with the devices of a shadow rollout that reached ``shadowing`` (agent commands).
ACTIONS = ("promote", "discard")
#: How a device's action went: from its command's status and answer.
ACTION_STATES = ("sent", "accepted", "succeeded", "failed")


def command_id(deployment_id: str, device_id: str) -> str:
    """Stable across restarts and instances: the device deduplicates on it."""
    return hashlib.sha256(f"{deployment_id}/{device_id}".encode()).hexdigest()[:32]


def action_id(deployment_id: str, device_id: str, action: str) -> str:
    """Stable too: asking for the same action again re-sends what is unanswered under the same id."""
    return hashlib.sha256(f"{deployment_id}/{device_id}/{action}".encode()).hexdigest()[:32]


def shadow_args(mode: str, shadow: Mapping[str, Any] | ShadowArgs | None) -> dict[str, Any] | None:
    """The shadow arguments to store and send (the contract's :class:`ShadowArgs`, strictly: ``true`` is not a
    count nor ``"0.5"`` a share; unset keys left out so the agent's ``[shadow]`` defaults apply); None for a swap
    rollout. Raises: RequestError naming the field."""
    if mode not in DEPLOY_MODES:
        raise RequestError(f"mode: expected one of {', '.join(DEPLOY_MODES)}")
    if mode != "shadow":
        if shadow:
            raise RequestError("shadow: only with mode 'shadow'")
        return None
    try:
        args = shadow if isinstance(shadow, ShadowArgs) else ShadowArgs.model_validate(
            shadow if shadow is not None else {}, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise RequestError(f"shadow{'.' + where if where else ''}: {err['msg']}") from None
    values = args.model_dump(exclude_none=True)
    for key, value in values.items():  # JSON has no infinity: it would reach the device as null
        if not math.isfinite(value):
            raise RequestError(f"shadow.{key}: a finite number")
    return values


def shadowing(response: Any) -> bool:
    """Whether a successful deploy answer says the candidate runs as a shadow (not swapped in)."""
    result = response.get("result") if isinstance(response, dict) else None
    return isinstance(result, dict) and result.get("state") in SHADOW_STEPS


def action_state(status: str | None, ok: bool | None) -> str:
    """A device's action, from its command's status (``sent``, ``accepted``, ``done``) and ``ok``."""
    if status == "done":
        return "succeeded" if ok else "failed"
    return status if status in ACTION_STATES else "sent"


def amount(text: str, total: int, *, field: str, minimum: int = 0) -> int:
    """``"N"`` or ``"P%"`` of ``total`` (a percentage rounds up, so 5% of 10 is 1). Raises RequestError."""
    m = AMOUNT_RE.match(text)
    if not m:
        raise RequestError(f"{field}: expected a count like 3 or a percentage like 25%")
    value = int(m.group(1))
    if m.group(2):
        if value > 100:
            raise RequestError(f"{field}: a percentage is at most 100%")
        value = math.ceil(total * value / 100)
    return max(value, minimum)


def plan(targets: Sequence[str], *, canary: str, wave_size: str | None) -> list[list[str]]:
    """Waves: the canary (count or percentage), then the rest by ``wave_size`` (default: one wave)."""
    total = len(targets)
    first = amount(canary, total, field="canary", minimum=1 if total else 0)
    size = amount(wave_size, total, field="wave_size", minimum=1) if wave_size else None
    return plan_waves(list(targets), str(first), size)


def wave_failed(failures: int, wave_len: int, threshold: str) -> bool:
    """True when ``failures`` in a wave of ``wave_len`` reach the abort threshold."""
    return failures >= amount(threshold, wave_len, field="abort_threshold", minimum=1)


class Rollouts:
    """Create, read, abort and resume deployments (what the API calls). Blocking: call from a thread."""

    def __init__(self, db: Database, clock: Any = time.time) -> None:
        self.db = db
        self.clock = clock

    def create(self, *, model: str, version: int, devices: Sequence[str] | None = None, group: str | None = None,
               online_only: bool = True, canary: str = "1", wave_size: str | None = None,
               abort_threshold: str = "1", wave_timeout_s: float = 600.0, created_by: str | None = None,
               mode: str = "swap", shadow: Mapping[str, Any] | ShadowArgs | None = None) -> dict[str, Any]:
        """Plan and store a deployment (status ``running``); the runner picks it up. ``mode`` ``shadow``
        deploys as a shadow (``shadow``: its sample and policy, see :class:`ShadowArgs`).

        Raises:
            RequestError: bad parameters, unknown devices, or nothing to deploy to.
        """
        if not NAME_RE.match(model):
            raise RequestError("model: letters, digits, '_', '.', '-' (at most 128)")
        shadow_values = shadow_args(mode, shadow)
        if (devices is None) == (group is None):
            raise RequestError("give either devices or group")
        amount(abort_threshold, 1, field="abort_threshold")
        d, g = s.devices, s.device_groups
        with self.db.read() as conn:
            if devices is not None:
                wanted = sorted(set(devices))
                known = set(conn.execute(sa.select(d.c.id).where(d.c.id.in_(wanted))).scalars())
                unknown = [x for x in wanted if x not in known]
                if unknown:
                    raise RequestError(f"devices: never seen: {', '.join(unknown[:10])}")
                targets = wanted
            else:
                q = sa.select(d.c.id).join(g, g.c.device_id == d.c.id).where(g.c.group == group).order_by(d.c.id)
                if online_only:
                    q = q.where(d.c.online.is_(True))
                targets = list(conn.execute(q).scalars())
        if not targets:
            raise RequestError(f"no {'online ' if online_only else ''}device in group '{group}'" if group
                               else "devices: empty")
        waves = plan(targets, canary=canary, wave_size=wave_size)
        now = self.clock()
        dep_id = uuid.uuid4().hex
        target: dict[str, Any] = {"devices": targets} if devices is not None else {"group": group,
                                                                                    "online_only": online_only}
        with self.db.write() as conn:
            conn.execute(sa.insert(s.deployments), [{
                "id": dep_id, "model": model, "version": version, "target": target, "canary": canary,
                "wave_size": wave_size, "abort_threshold": abort_threshold, "wave_timeout_s": wave_timeout_s,
                "status": "running", "waves": len(waves), "current_wave": 0, "created_at": now,
                "created_by": created_by, "updated_at": now, "mode": mode, "shadow": shadow_values}])
            conn.execute(sa.insert(s.deployment_devices), [
                {"deployment_id": dep_id, "device_id": dev, "wave": i, "command_id": command_id(dep_id, dev),
                 "status": "pending"} for i, wave in enumerate(waves) for dev in wave])
        log.info("fleet.rollout.created", deployment=dep_id, model=model, version=version, devices=len(targets),
                 waves=len(waves), by=created_by, mode=mode)
        return self.get(dep_id)

    def get(self, dep_id: str, *, with_devices: bool = True) -> dict[str, Any]:
        """Raises: NotFoundError."""
        dd, c = s.deployment_devices, s.commands
        with self.db.read() as conn:
            row = conn.execute(sa.select(s.deployments).where(s.deployments.c.id == dep_id)).first()
            if row is None:
                raise NotFoundError(f"no deployment {dep_id!r}")
            counts = {r[0]: int(r[1]) for r in conn.execute(
                sa.select(dd.c.status, sa.func.count()).where(dd.c.deployment_id == dep_id).group_by(dd.c.status))}
            acted = dd.outerjoin(c, c.c.id == dd.c.action_id)
            action_counts: dict[str, int] = dict.fromkeys(ACTION_STATES, 0)
            if row.action is not None:
                for status, ok, n in conn.execute(sa.select(c.c.status, c.c.ok, sa.func.count()).select_from(acted)
                                                  .where(dd.c.deployment_id == dep_id, dd.c.action.is_not(None))
                                                  .group_by(c.c.status, c.c.ok)):
                    action_counts[action_state(status, ok)] += int(n)
            devices = list(conn.execute(
                sa.select(dd.c.device_id, dd.c.wave, dd.c.status, dd.c.command_id, dd.c.sent_at, dd.c.finished_at,
                          dd.c.error, dd.c.action, dd.c.action_at, c.c.status.label("a_status"), c.c.ok.label("a_ok"),
                          c.c.response.label("a_response")).select_from(acted)
                .where(dd.c.deployment_id == dep_id).order_by(dd.c.wave, dd.c.device_id))) if with_devices else None
        out = {str(k): v for k, v in row._mapping.items() if k not in ("lease_until", "accepted_failures")}
        out["counts"] = {status: int(counts.get(status, 0)) for status in
                         ("pending", *IN_FLIGHT, *FINAL)}
        out["action_counts"] = action_counts if row.action is not None else None
        if devices is not None:
            out["devices"] = [_device_out(dev) for dev in devices]
        return out

    def list(self, *, status: str | None, cursor: str | None, limit: int) -> dict[str, Any]:
        """Newest first; the cursor is ``CREATED_AT:ID``."""
        t = s.deployments
        q = sa.select(t.c.id, t.c.created_at).order_by(t.c.created_at.desc(), t.c.id.desc()).limit(limit + 1)
        if status is not None:
            q = q.where(t.c.status == status)
        if cursor:
            at, sep, last = cursor.partition(":")
            try:
                when = float(at)
            except ValueError:
                raise RequestError("cursor: expected the 'next' value of a previous page") from None
            if not sep:
                raise RequestError("cursor: expected the 'next' value of a previous page")
            q = q.where(sa.or_(t.c.created_at < when, sa.and_(t.c.created_at == when, t.c.id < last)))
        with self.db.read() as conn:
            rows = list(conn.execute(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [self.get(r.id, with_devices=False) for r in rows],
                "next": f"{rows[-1].created_at!r}:{rows[-1].id}" if more else None}

    def abort(self, dep_id: str, reason: str = "aborted by an operator") -> dict[str, Any]:
        """Stop sending: devices not yet contacted are ``skipped``. Raises: NotFoundError, ConflictError."""
        now = self.clock()
        with self.db.write() as conn:
            status = self._status(conn, dep_id)
            if status != "running":
                raise ConflictError(f"deployment {dep_id} is {status}, not running")
            _abort(conn, dep_id, reason, now)
        return self.get(dep_id)

    def resume(self, dep_id: str) -> dict[str, Any]:
        """Carry on an aborted deployment: skipped devices get their turn; the failures that caused the
        abort are accepted. Raises: NotFoundError, ConflictError."""
        now = self.clock()
        t, dd = s.deployments, s.deployment_devices
        with self.db.write() as conn:
            status = self._status(conn, dep_id)
            if status != "aborted":
                raise ConflictError(f"deployment {dep_id} is {status}; only an aborted one can be resumed")
            row = conn.execute(sa.select(t.c.current_wave).where(t.c.id == dep_id)).one()
            failures = conn.execute(sa.select(sa.func.count()).where(
                dd.c.deployment_id == dep_id, dd.c.wave == row.current_wave,
                dd.c.status.in_(("failed", "timeout")))).scalar_one()
            conn.execute(sa.update(dd).where(dd.c.deployment_id == dep_id, dd.c.status == "skipped")
                         .values(status="pending"))
            conn.execute(sa.update(t).where(t.c.id == dep_id).values(
                status="running", accepted_failures=failures, finished_at=None, reason=None, updated_at=now,
                lease_owner=None, lease_until=None))
        log.info("fleet.rollout.resumed", deployment=dep_id)
        return self.get(dep_id)

    def act(self, dep_id: str, action: str, *, commands: CommandService, by: str | None = None) -> dict[str, Any]:
        """Send ``promote`` or ``discard`` to the devices of a finished shadow rollout that reached ``shadowing``
        (again, with the same ids, to those that have not answered yet). Returns at once: each device's outcome
        arrives with its answer (``devices[].action_status``).

        Raises:
            NotFoundError: no such deployment. RequestError: not an action.
            ConflictError: not a shadow rollout, still running, the other action was chosen, no device to act on.
            BrokerUnavailableError: not connected to the broker.
        """
        if action not in ACTIONS:
            raise RequestError(f"action: expected one of {', '.join(ACTIONS)}")
        t, dd, c = s.deployments, s.deployment_devices, s.commands
        now = self.clock()
        with self.db.write() as conn:
            status = self._status(conn, dep_id)
            dep = conn.execute(sa.select(t.c.model, t.c.version, t.c.mode, t.c.action).where(t.c.id == dep_id)).one()
            if dep.mode != "shadow":
                raise ConflictError(f"deployment {dep_id} is a {dep.mode} rollout: there is no shadow to {action}")
            if status == "running":
                raise ConflictError(f"deployment {dep_id} is still running: let it finish, or abort it, first")
            if dep.action not in (None, action):
                raise ConflictError(f"deployment {dep_id}: its shadows were already sent '{dep.action}'")
            rows = list(conn.execute(sa.select(dd.c.device_id, dd.c.action, c.c.status)
                                     .select_from(dd.outerjoin(c, c.c.id == dd.c.action_id))
                                     .where(dd.c.deployment_id == dep_id, dd.c.status == "succeeded")))
            if not rows:
                raise ConflictError(f"deployment {dep_id}: no device reached shadowing")
            targets = sorted(r.device_id for r in rows if r.action is None or r.status != "done")
            args = {"model": dep.model, "version": dep.version}  # never a later shadow of the same model
            if targets and not commands.ingestor.connected:  # raised inside: nothing is recorded
                raise BrokerUnavailableError("not connected to the MQTT broker; try again shortly")
            if targets:
                conn.execute(sa.update(t).where(t.c.id == dep_id).values(action=action, action_by=by, action_at=now,
                                                                         updated_at=now))
                conn.execute(sa.update(dd).where(dd.c.deployment_id == dep_id, dd.c.device_id == sa.bindparam("b_dev"))
                             .values(action=action, action_at=now, action_id=sa.bindparam("b_id")),
                             [{"b_dev": dev, "b_id": action_id(dep_id, dev, action)} for dev in targets])
                for dev in targets:  # recorded before publishing, so that the answers find their device
                    commands.record(conn, action_id(dep_id, dev, action), dev, action, args,
                                    sent_by=f"deployment:{dep_id}")
        infos = [commands.publish(dev, action_id(dep_id, dev, action), action, args) for dev in targets]
        published = 0
        for info in infos:
            try:
                info.wait_for_publish(10)
            except (RuntimeError, ValueError):
                continue
            published += info.is_published()
        log.info(f"fleet.rollout.{action}", deployment=dep_id, devices=len(targets), published=published, by=by)
        return self.get(dep_id)

    @staticmethod
    def _status(conn: sa.Connection, dep_id: str) -> str:
        t = s.deployments
        status = conn.execute(sa.select(t.c.status).where(t.c.id == dep_id).with_for_update()).scalar()
        if status is None:
            raise NotFoundError(f"no deployment {dep_id!r}")
        return str(status)


def _device_out(row: Any) -> dict[str, Any]:
    """A device of a deployment as the API shows it: its rollout status and, once sent, its action's outcome."""
    dev = {k: row._mapping[k] for k in ("device_id", "wave", "status", "command_id", "sent_at", "finished_at",
                                        "error", "action", "action_at")}
    done = row.action is not None and row.a_status == "done"
    dev["action_status"] = action_state(row.a_status, row.a_ok) if row.action is not None else None
    dev["action_error"] = ((row.a_response or {}).get("error") if done and not row.a_ok else None)
    return dev


def _abort(conn: sa.Connection, dep_id: str, reason: str, now: float) -> None:
    t, dd = s.deployments, s.deployment_devices
    conn.execute(sa.update(dd).where(dd.c.deployment_id == dep_id, dd.c.status == "pending")
                 .values(status="skipped"))
    conn.execute(sa.update(t).where(t.c.id == dep_id).values(status="aborted", reason=reason, finished_at=now,
                                                             updated_at=now))
    log.warning("fleet.rollout.aborted", deployment=dep_id, reason=reason)


class RolloutRunner:
    """Drives the running deployments this instance holds the lease of; ``tick()`` is one pass."""

    def __init__(self, db: Database, commands: CommandService, owner: str, *, clock: Any = time.time,
                 lease_s: float = LEASE_S, resend_s: float = RESEND_S, send_max: int = SEND_MAX) -> None:
        self.db = db
        self.resend_s = resend_s
        self.send_max = send_max
        self.commands = commands
        self.owner = owner
        self.clock = clock
        self.lease_s = lease_s
        self._held: set[str] = set()

    def tick(self) -> None:
        """Claim or renew leases, then step each deployment held. Blocking (run in a thread)."""
        now = self.clock()
        t = s.deployments
        with self.db.write() as conn:
            conn.execute(sa.update(t).where(
                t.c.status == "running",
                sa.or_(t.c.lease_owner.is_(None), t.c.lease_owner == self.owner, t.c.lease_until < now),
            ).values(lease_owner=self.owner, lease_until=now + self.lease_s))
            held = set(conn.execute(sa.select(t.c.id).where(t.c.status == "running",
                                                            t.c.lease_owner == self.owner)).scalars())
        for dep_id in sorted(held):
            try:
                self._step(dep_id, fresh=dep_id not in self._held)
            except Exception:  # one broken deployment must not stop the others
                log.exception("fleet.rollout.step_failed", deployment=dep_id)
        self._held = held

    def _step(self, dep_id: str, *, fresh: bool) -> None:
        now = self.clock()
        t, dd, c = s.deployments, s.deployment_devices, s.commands
        with self.db.read() as conn:
            dep = conn.execute(sa.select(t).where(t.c.id == dep_id)).one()
            rows = list(conn.execute(sa.select(dd.c.device_id, dd.c.status, dd.c.sent_at).where(
                dd.c.deployment_id == dep_id, dd.c.wave == dep.current_wave)))
            wave = {r.device_id: r.status for r in rows}
            sent_at = {r.device_id: r.sent_at for r in rows}
            cids = {command_id(dep_id, dev): dev for dev, status in wave.items() if status in IN_FLIGHT}
            outcomes: dict[str, Any] = {}
            if cids:
                for r in conn.execute(sa.select(c.c.id, c.c.status, c.c.ok, c.c.response)
                                      .where(c.c.id.in_(sorted(cids)))):
                    outcomes[cids[r.id]] = r
        updates: list[dict[str, Any]] = []
        for dev, done in outcomes.items():
            if done.status == "done":
                ok, error = bool(done.ok), (done.response or {}).get("error") if not done.ok else None
                if ok and dep.mode == "shadow" and not shadowing(done.response):
                    state = ((done.response or {}).get("result") or {}).get("state")
                    ok, error = False, {"code": "not_shadowing", "message": f"the device answered in state {state!r}, "
                                                                            "not 'shadowing'"}
                updates.append({"b_dev": dev, "b_status": "succeeded" if ok else "failed", "b_error": error,
                                "b_at": now})
            elif done.status == "accepted" and wave[dev] != "accepted":
                updates.append({"b_dev": dev, "b_status": "accepted", "b_error": None, "b_at": None})
        if updates:
            with self.db.write() as conn:
                in_flight = sa.or_(*(dd.c.status == status for status in IN_FLIGHT))  # no IN: executemany
                conn.execute(sa.update(dd).where(dd.c.deployment_id == dep_id, dd.c.device_id == sa.bindparam("b_dev"),
                                                 in_flight)
                             .values(status=sa.bindparam("b_status"), error=sa.bindparam("b_error", type_=s.Json),
                                     finished_at=sa.bindparam("b_at")), updates)
            for u in updates:
                wave[u["b_dev"]] = u["b_status"]
                if u["b_status"] in FINAL:
                    log.info("fleet.rollout.device", deployment=dep_id, device=u["b_dev"], status=u["b_status"])
        started = dep.wave_started_at
        if started is None:
            started = now
            with self.db.write() as conn:
                conn.execute(sa.update(t).where(t.c.id == dep_id).values(wave_started_at=now, updated_at=now))
            log.info("fleet.rollout.wave", deployment=dep_id, wave=dep.current_wave + 1, devices=len(wave))
        # what to send: devices of this wave not contacted yet; and again, with the same id, those whose
        # outcome this instance may not hear of: just after taking the lease (the command may not have gone
        # out, or its answer went to the instance that sent it) and every resend_s (an answer can be lost
        # with a dead instance's session). A device answers a known id from its log, it does not run it again.
        to_send = [dev for dev, status in wave.items() if status == "pending" or (
            status in IN_FLIGHT and (fresh or sent_at[dev] is None or now - sent_at[dev] > self.resend_s))]
        # at most send_max per tick (devices not contacted yet first); the rest go in the next ticks
        to_send = sorted(to_send, key=lambda dev: (wave[dev] != "pending", dev))[:self.send_max]
        if to_send and self.commands.ingestor.connected:
            for dev in self._send(dep, to_send):
                if wave[dev] in ("pending", "sending"):
                    wave[dev] = "sent"
        if now > started + dep.wave_timeout_s:
            late = sorted(dev for dev, status in wave.items() if status in (*IN_FLIGHT, "pending"))
            if late:
                error = {"code": "timeout", "message": f"no final response within {dep.wave_timeout_s:g} s"}
                with self.db.write() as conn:
                    conn.execute(sa.update(dd).where(dd.c.deployment_id == dep_id, dd.c.device_id.in_(late),
                                                     dd.c.status.in_((*IN_FLIGHT, "pending")))
                                 .values(status="timeout", finished_at=now, error=error))
                wave.update(dict.fromkeys(late, "timeout"))
        if all(status in FINAL for status in wave.values()):
            self._next(dep, wave, now)

    def _send(self, dep: Any, devices: list[str]) -> list[str]:
        """Record, publish, and mark ``sent`` what the broker acknowledged; returns those."""
        dd = s.deployment_devices
        args: dict[str, Any] = {"model": dep.model, "version": int(dep.version)}
        if dep.mode == "shadow":  # a swap's arguments stay as they were: agents without shadow mode take them
            args["mode"] = "shadow"
            if dep.shadow:
                args["shadow"] = dict(dep.shadow)
        with self.db.write() as conn:  # recorded before publishing: a crash from here on is a 'sending'
            conn.execute(sa.update(dd).where(dd.c.deployment_id == dep.id, dd.c.device_id.in_(devices),
                                             dd.c.status == "pending").values(status="sending"))
            for dev in devices:
                self.commands.record(conn, command_id(dep.id, dev), dev, "deploy", args, sent_by=f"deployment:{dep.id}")
        infos = [(dev, self.commands.publish(dev, command_id(dep.id, dev), "deploy", args)) for dev in devices]
        sent: list[str] = []
        for dev, info in infos:
            try:
                info.wait_for_publish(10)
            except (RuntimeError, ValueError):
                continue
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published():
                sent.append(dev)
        if sent:
            with self.db.write() as conn:
                conn.execute(sa.update(dd).where(dd.c.deployment_id == dep.id, dd.c.device_id.in_(sent),
                                                 dd.c.status.in_(IN_FLIGHT))
                             .values(status=sa.case((dd.c.status == "sending", "sent"), else_=dd.c.status),
                                     sent_at=self.clock()))
        return sent

    def _next(self, dep: Any, wave: dict[str, str], now: float) -> None:
        t, dd = s.deployments, s.deployment_devices
        failures = sum(1 for status in wave.values() if status in ("failed", "timeout")) - dep.accepted_failures
        with self.db.write() as conn:
            if conn.execute(sa.select(t.c.status).where(t.c.id == dep.id).with_for_update()).scalar() != "running":
                return  # aborted meanwhile
            if failures > 0 and wave_failed(failures, len(wave), dep.abort_threshold):
                _abort(conn, dep.id, f"wave {dep.current_wave + 1}: {failures} of {len(wave)} devices failed "
                                     f"(abort threshold {dep.abort_threshold})", now)
                return
            if dep.current_wave + 1 < dep.waves:
                conn.execute(sa.update(t).where(t.c.id == dep.id).values(
                    current_wave=dep.current_wave + 1, wave_started_at=None, accepted_failures=0, updated_at=now))
                return
            failed = conn.execute(sa.select(sa.func.count()).where(
                dd.c.deployment_id == dep.id, dd.c.status.in_(("failed", "timeout")))).scalar_one()
            status = "failed" if failed else "succeeded"
            conn.execute(sa.update(t).where(t.c.id == dep.id).values(
                status=status, finished_at=now, updated_at=now, lease_owner=None, lease_until=None,
                reason=f"{failed} devices failed" if failed else None))
        log.info("fleet.rollout.finished", deployment=dep.id, status=status, failed=failed)
