"""The persisted record of one model's deployment. Written atomically (temp file, fsync,
rename, fsync of the directory) at every step, so after a power cut the agent knows exactly
which step it was in and can finish or undo it."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cloud_sync.errors import cap_message
from cloud_sync.fsutil import write_atomic
from cloud_sync.mqtt.contract import DEPLOY_FINAL, DEPLOY_STEPS

# Steps in order (the MQTT contract's names). A record whose state is not final was interrupted.
STEPS = DEPLOY_STEPS
FINAL = DEPLOY_FINAL


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

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Deployment:
        record = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        if isinstance(record.error, dict) and isinstance(record.error.get("message"), str):
            # Written before messages were capped (a 64 MiB member name): never served whole again.
            record.error = {**record.error, "message": cap_message(record.error["message"])}
        return record


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
        try:
            return Deployment.from_dict(orjson.loads(self.path(model).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, TypeError):
            return None

    def all(self) -> list[Deployment]:
        if not self.directory.is_dir():
            return []
        records = [self.load(p.stem) for p in sorted(self.directory.glob("*.json"))]
        return [r for r in records if r is not None]
