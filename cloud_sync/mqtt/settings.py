"""Settings of one MQTT connection (device or console), parsed from a broker URL and options."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. ``url`` is ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = ""
    protocol: str = "5"  # "5" or "3.1.1"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.ca_file is not None

    def validate(self) -> None:
        """Raises ValueError naming the bad setting."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"url: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {self.url!r}")
        if self.protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol: expected '5' or '3.1.1', got {self.protocol!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError("backoff_min_s must be > 0 and <= backoff_max_s")


@dataclass(frozen=True)
class LinkSettings:
    """The device's side of the contract: topics prefix, groups, limits, intervals."""

    device_id: str
    prefix: str = "edge/v1"
    groups: tuple[str, ...] = ()
    max_command_bytes: int = 256 * 1024
    telemetry_interval_s: float = 60.0
    publish_window: int = 100  # QoS 1 messages in flight before waiting for PUBACKs
    # A publish the broker refuses (MQTT 5 PUBACK reason >= 0x80, e.g. an ACL denial) is retried after
    # refused_backoff_s, doubling up to the broker's backoff_max_s; at the last attempt it is dead-lettered.
    refused_max_attempts: int = 5
    refused_backoff_s: float = 1.0
    broker: BrokerSettings = field(default_factory=BrokerSettings)
