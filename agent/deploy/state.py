"""The persisted record of one model's deployment. Written atomically (temp file, fsync,
rename, fsync of the directory) at every step, so after a power cut the agent knows exactly
which step it was in and can finish or undo it.

A record that cannot be read or does not have the record's shape (a bad sector, a file
written by something else) is moved aside as ``MODEL.json.corrupt-TIMESTAMP`` and reported
(``cloud_sync.stores``): the agent carries on as if that model had no deployment record."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from cloud_sync.errors import cap_message
from cloud_sync.fsutil import write_atomic
from cloud_sync.mqtt.contract import DEPLOY_FINAL, DEPLOY_MODES, DEPLOY_STEPS, SHADOW_FINAL, SHADOW_STEPS
from cloud_sync.stores import move_aside

log = structlog.get_logger(__name__)

# Steps in order (the MQTT contract's names). A record whose state is not final was interrupted.
STEPS = DEPLOY_STEPS
FINAL = (*DEPLOY_FINAL, *SHADOW_FINAL)
SHADOW = SHADOW_STEPS


@dataclass
class Deployment:
    model: str
    version: int | None
    previous: int | None  # the version serving before this deployment
    state: str = "started"
    error: dict[str, str] | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    history: list[list[Any]] = field(default_factory=list)  # [state, timestamp]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    mode: str = "swap"  # "shadow": runs beside the serving version until promoted or discarded

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        """Raises ValueError naming the first field that does not have a record's type or value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        if "model" not in data:
            raise ValueError("missing 'model'")
        record = cls(model=data["model"], version=data.get("version"), previous=data.get("previous"),
                     **{k: data[k] for k in ("state", "error", "started_at", "updated_at", "history", "id", "mode")
                        if k in data})
        record._check()
        if isinstance(record.error, dict) and isinstance(record.error.get("message"), str):
            # Written before messages were capped (a 64 MiB member name): never served whole again.
            record.error = {**record.error, "message": cap_message(record.error["message"])}
        return record

    def _check(self) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        problems = {
            "model": isinstance(self.model, str) and bool(self.model),
            "version": self.version is None or integer(self.version),
            "previous": self.previous is None or integer(self.previous),
            "state": self.state in STEPS or self.state in FINAL or self.state in SHADOW,
            "mode": self.mode in DEPLOY_MODES,
            "error": self.error is None or isinstance(self.error, dict),
            "started_at": isinstance(self.started_at, (int, float)) and not isinstance(self.started_at, bool),
            "updated_at": isinstance(self.updated_at, (int, float)) and not isinstance(self.updated_at, bool),
            "history": isinstance(self.history, list) and all(isinstance(h, list) for h in self.history),
            "id": isinstance(self.id, str),
        }
        bad = next((name for name, ok in problems.items() if not ok), None)
        if bad is not None:
            raise ValueError(f"'{bad}' has an invalid value: {str(getattr(self, bad))[:80]!r}")


class DeploymentStore:
    """One JSON file per model under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, model: str) -> Path:
        return self.directory / f"{model}.json"

    def save(self, record: Deployment) -> None:
        record.updated_at = time.time()
        record.history.append([record.state, round(record.updated_at, 3)])
        write_atomic(self.path(record.model), orjson.dumps(record.to_dict()))

    def load(self, model: str) -> Deployment | None:
        """The model's record; None if it has none, or if its file was corrupt (then moved aside and reported)."""
        path = self.path(model)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # EIO on a failing card, a directory where the file should be
            self._corrupt(path, f"unreadable: {exc.strerror or exc}")
            return None
        try:
            record = Deployment.from_dict(orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            self._corrupt(path, f"not JSON: {exc}")
            return None
        except (ValueError, TypeError) as exc:
            self._corrupt(path, f"not a deployment record: {exc}")
            return None
        if record.model != model:
            self._corrupt(path, f"the record is for model {record.model[:80]!r}")
            return None
        return record

    def _corrupt(self, path: Path, reason: str) -> None:
        try:
            move_aside(path, store="deployment", reason=reason)
        except OSError as exc:
            log.error("deploy.record_unusable", path=str(path), reason=reason, move_failed=str(exc))

    def all(self) -> list[Deployment]:
        if not self.directory.is_dir():
            return []
        records = [self.load(p.stem) for p in sorted(self.directory.glob("*.json"))]
        return [r for r in records if r is not None]
