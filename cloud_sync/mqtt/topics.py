"""The topic contract of DESIGN.md section 5, under a configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    def _device(self, leaf: str) -> str:
        return f"{self.prefix}/devices/{self.device_id}/{leaf}"

    @property
    def state(self) -> str:
        return self._device("state")

    @property
    def telemetry(self) -> str:
        return self._device("telemetry")

    @property
    def events(self) -> str:
        return self._device("events")

    @property
    def commands(self) -> str:
        return self._device("commands")

    @property
    def responses(self) -> str:
        return self._device("responses")

    def results(self, stream: str) -> str:
        return self._device(f"results/{stream}")

    def group_commands(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/commands"


def device_topic(prefix: str, device: str, leaf: str) -> str:
    return f"{prefix}/devices/{device}/{leaf}"
