"""The agent's exception hierarchy.

Every error the agent raises on purpose derives from :class:`AgentError`. The edges map
them exactly once: HTTP status (``http_status``), CLI exit code (``exit_code``), and
later MQTT command error codes (``code``).
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of all edge-agent errors."""

    code = "internal"
    http_status = 500
    exit_code = 1


class ConfigError(AgentError):
    """Bad configuration: names the file, the key and the reason."""

    code = "bad_config"
    http_status = 400
    exit_code = 2

    def __init__(self, reason: str, *, key: str | None = None, file: str | None = None) -> None:
        self.reason = reason
        self.key = key
        self.file = file
        where = ": ".join(p for p in (file, f"key '{key}'" if key else None) if p)
        super().__init__(f"{where}: {reason}" if where else reason)


class UsageError(AgentError):
    """A command-line argument that cannot be right (exit code 2, like argparse's own errors)."""

    code = "bad_usage"
    http_status = 400
    exit_code = 2


class ModelError(AgentError):
    """A model could not be found, loaded or run."""

    code = "model_error"


class ModelLoadError(ModelError):
    """A model file failed to load; carries the path and the runtime's reason."""

    code = "model_load_failed"

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load {path}: {reason}")


class ModelNotFoundError(ModelError):
    """Unknown model name or version."""

    code = "not_found"
    http_status = 404


class ModelNotReadyError(ModelError):
    """The model exists but is not (yet, or any more) able to serve."""

    code = "unavailable"
    http_status = 503


class InferenceError(ModelError):
    """The runtime failed while running a request."""

    code = "inference_failed"
    http_status = 500


class RuntimeUnavailableError(ModelError):
    """The runtime backend or delegate is not installed on this device."""

    code = "runtime_unavailable"


class RequestError(AgentError):
    """A client sent something we cannot accept (4xx)."""

    code = "bad_request"
    http_status = 400


class PayloadTooLargeError(RequestError):
    code = "too_large"
    http_status = 413


class HardwareError(AgentError):
    """Hardware detection or device-profile problem."""

    code = "hardware"


class ClientError(AgentError):
    """The local client could not reach the agent or got an error answer."""

    code = "client"

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)
