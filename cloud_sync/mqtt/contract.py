"""Payload vocabulary of the MQTT contract (docs/mqtt.md, docs/deploy.md) that the device,
the fleet service and the fleet simulator must spell the same way.

Only names and shapes live here, no behaviour; code that emits or reads these payloads (the
agent's command handlers, the simulator, the fleet server's rollouts) uses them instead of
writing them again.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Steps of an install, in order; each is an event ``deploy.<step>`` (docs/deploy.md).
DEPLOY_STEPS: Final = ("started", "downloading", "verified", "staged", "loaded", "tested", "swapped", "health")
#: Outcomes; ``deploy.<outcome>`` events carry ``error: {code, message}`` unless committed.
DEPLOY_FINAL: Final = ("committed", "rolled_back", "failed")
#: A shadow deployment (``"mode": "shadow"``, docs/shadow.md) stops after ``tested`` in ``shadowing``:
#: the candidate runs beside the serving version until promoted (then ``swapped``, ``health``,
#: ``committed`` as any deployment) or ``discarded``.
SHADOW_STEPS: Final = ("shadowing",)
SHADOW_FINAL: Final = ("discarded",)
DEPLOY_MODES: Final = ("swap", "shadow")
#: Commands that answer ``{"status": "accepted"}`` first, then a final response and a
#: ``command.completed`` event.
LONG_RUNNING_COMMANDS: Final = ("reload", "deploy", "rollback", "promote")
COMMAND_COMPLETED: Final = "command.completed"
#: Delegate a model runs on when the device has no accelerator for its runtime.
CPU_DELEGATES: Final = {"onnx": "CPUExecutionProvider", "tflite": "xnnpack"}


def deploy_event(state: str) -> str:
    """The event ``type`` of a deployment step or outcome."""
    return f"deploy.{state}"


# -- command arguments (``args`` of a command; the dispatcher validates them once) ----------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowArgs(_Args):
    """``deploy`` with ``"mode": "shadow"``: overrides of the agent's ``[shadow]`` defaults."""

    sample: float | None = Field(default=None, gt=0, le=1)
    min_samples: int | None = Field(default=None, ge=1)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    max_latency_ratio: float | None = Field(default=None, gt=0)


class ModelArgs(_Args):
    """``deploy``: a model and optionally a version (default: the newest in the repository);
    ``mode`` ``shadow`` runs it beside the serving version instead of swapping it in."""

    model: str = Field(min_length=1, max_length=128)
    version: int | None = Field(default=None, ge=1)
    mode: Literal["swap", "shadow"] = "swap"
    shadow: ShadowArgs | None = None


class RollbackArgs(_Args):
    model: str = Field(min_length=1, max_length=128)


class ShadowActionArgs(_Args):
    """``promote`` and ``discard``: the model, and the shadow's version when the sender knows it (a
    fleet's rollout: its promote must not reach a later shadow of the same model)."""

    model: str = Field(min_length=1, max_length=128)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)


class LogsArgs(_Args):
    lines: int = Field(default=100, ge=1, le=1000)


class SetConfigArgs(_Args):
    values: dict[str, Any] = Field(min_length=1)


class StreamArgs(_Args):
    stream: str = Field(min_length=1, max_length=128)
