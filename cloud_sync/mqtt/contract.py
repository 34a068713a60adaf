"""Payload vocabulary of the MQTT contract (docs/mqtt.md, docs/deploy.md) that the device,
the fleet service and the fleet simulator must spell the same way.

Only names and shapes live here, no behaviour; ``cloud_sync`` code that emits or reads these
payloads (the simulator, the fleet server's rollouts) uses them instead of string literals.
"""

from __future__ import annotations

from typing import Final

#: Steps of an install, in order; each is an event ``deploy.<step>`` (docs/deploy.md).
DEPLOY_STEPS: Final = ("started", "downloading", "verified", "staged", "loaded", "tested", "swapped", "health")
#: Outcomes; ``deploy.<outcome>`` events carry ``error: {code, message}`` unless committed.
DEPLOY_FINAL: Final = ("committed", "rolled_back", "failed")
#: Commands that answer ``{"status": "accepted"}`` first, then a final response and a
#: ``command.completed`` event.
LONG_RUNNING_COMMANDS: Final = ("reload", "deploy", "rollback")
COMMAND_COMPLETED: Final = "command.completed"
#: Delegate a model runs on when the device has no accelerator for its runtime.
CPU_DELEGATES: Final = {"onnx": "CPUExecutionProvider", "tflite": "xnnpack"}


def deploy_event(state: str) -> str:
    """The event ``type`` of a deployment step or outcome."""
    return f"deploy.{state}"
