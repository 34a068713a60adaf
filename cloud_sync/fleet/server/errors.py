"""The fleet service's exception hierarchy: one root, a stable ``code`` and HTTP ``status`` per class.

The REST API maps these once (``{"error": {"code", "message"}}`` with ``status``); the CLI maps
``exit_code``. Nothing else translates errors.
"""

from __future__ import annotations


class FleetServerError(Exception):
    """Root of every error the fleet service raises on purpose."""

    code = "fleet_error"
    status = 500
    exit_code = 1

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class ConfigError(FleetServerError):
    """A bad setting; the message names the file (or environment variable), the key and the reason."""

    code = "config_error"
    exit_code = 2

    def __init__(self, reason: str, *, key: str | None = None, source: str | None = None) -> None:
        self.reason = reason
        self.key = key
        self.source = source
        where = ": ".join(p for p in (source, f"key '{key}'" if key else None) if p)
        super().__init__(f"{where}: {reason}" if where else reason)


class StorageError(FleetServerError):
    """The database cannot be used (unreachable, locked for too long, migration failed)."""

    code = "storage_unavailable"
    status = 503


class BrokerUnavailableError(FleetServerError):
    """The service is not connected to the MQTT broker, so it cannot send a command now."""

    code = "broker_unavailable"
    status = 503


class RequestError(FleetServerError):
    """Bad input from an API client (4xx)."""

    code = "bad_request"
    status = 400


class NotFoundError(RequestError):
    """No such device, command or token."""

    code = "not_found"
    status = 404


class ConflictError(RequestError):
    """The request collides with existing state (e.g. a duplicate name)."""

    code = "conflict"
    status = 409


class AuthError(RequestError):
    """No token, an unknown, revoked or expired token: 401."""

    code = "unauthorized"
    status = 401


class ForbiddenError(RequestError):
    """A valid token whose role is below what the endpoint needs: 403."""

    code = "forbidden"
    status = 403


class CommandTimeoutError(FleetServerError):
    """A device did not send its final response in time; the command may still complete later."""

    code = "command_timeout"
    status = 504

    def __init__(self, message: str, *, command_id: str) -> None:
        self.command_id = command_id
        super().__init__(message)
