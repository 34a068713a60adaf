"""The agent's exception hierarchy, under the project's one root (``cloud_sync.errors.EdgeError``).

Every error the agent raises on purpose derives from :class:`AgentError` and has a stable
``code``. The edges map them exactly once: the HTTP status in ``agent.api.errors``, the MQTT
command response (``{"code", "message"}``) in the command dispatcher, the CLI exit code from
``exit_code``. Components raise the typed error of what went wrong and never think about
transports.
"""

from __future__ import annotations

from cloud_sync.errors import EdgeError


class AgentError(EdgeError):
    """Root of all edge-agent errors."""

    code = "internal"


class ConfigError(AgentError):
    """Bad configuration: names the file, the key and the reason."""

    code = "bad_config"
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


class ModelNotReadyError(ModelError):
    """The model exists but is not (yet, or any more) able to serve."""

    code = "unavailable"


class ModelReloadError(ModelNotReadyError):
    """A version unloaded while idle could not be loaded again; it stays unloaded and the next request retries."""

    code = "reload_failed"


class InferenceError(ModelError):
    """The runtime failed while running a request."""

    code = "inference_failed"


class RuntimeUnavailableError(ModelError):
    """The runtime backend or delegate is not installed on this device."""

    code = "runtime_unavailable"


class RequestError(AgentError):
    """A client sent something we cannot accept (4xx)."""

    code = "bad_request"


class InvalidArgumentError(RequestError):
    """An operation's argument has the right shape but a value the agent refuses (names it)."""

    code = "bad_args"


class NotFoundError(AgentError):
    """Something asked for by name does not exist here."""

    code = "not_found"


class InvalidInputError(RequestError):
    """A tensor that does not fit the model, or that the runtime refused while the model itself
    answers its known-good input: the client's fault, never counted against the model."""

    code = "invalid_input"


class NoPreprocessingError(RequestError):
    """A predict asked for the manifest's pre-processing of a frame, and the model has none usable."""

    code = "no_preprocessing"


class PayloadTooLargeError(RequestError):
    code = "too_large"


class ProtocolError(RequestError):
    """An HTTP request refused before it is routed: malformed, over a limit, or too slow."""

    code = "bad_request"


class URITooLongError(ProtocolError):
    code = "uri_too_long"


class HeadTooLargeError(ProtocolError):
    """Request headers over the size or count limit."""

    code = "headers_too_large"


class RequestTimeoutError(ProtocolError):
    """The request's head or body did not arrive in time."""

    code = "request_timeout"


class HTTPVersionError(ProtocolError):
    """HTTP/0.9, HTTP/2 or anything but HTTP/1.0 and HTTP/1.1."""

    code = "http_version"


class MethodNotAllowedError(RequestError):
    """A known path with another method; ``allowed`` lists the methods it takes."""

    code = "method_not_allowed"

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed
        super().__init__(message)


class UnauthorizedError(RequestError):
    """A control endpoint over TCP without the right bearer token."""

    code = "unauthorized"


class ForbiddenError(RequestError):
    """A control endpoint over TCP while no token is configured: only the Unix socket serves it."""

    code = "forbidden"


class OverloadedError(AgentError):
    """The agent is at a limit it shares between clients (connections, buffered request bodies): retry later."""

    code = "overloaded"


class HardwareError(AgentError):
    """Hardware detection or device-profile problem."""

    code = "hardware"


class DeployError(AgentError):
    """A deployment that failed, was rolled back, or cannot start; ``code`` says why (also in events).

    The codes are listed in docs/deploy.md: the deployer's own (``busy``, ``not_configured``,
    ``already_active``, ``disk_full``, ``incompatible``, ``test_vectors_failed``,
    ``health_regression``, ``no_previous``, ...) and the bundle/transport codes of
    ``cloud_sync.errors`` it passes through (``untrusted``, ``download_failed``, ...).
    """

    code = "deploy_failed"

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class DeploymentNotFoundError(NotFoundError):
    """No deployment record for that model."""


class ShadowNotFoundError(NotFoundError):
    """No shadow version of that model is running (promote, discard)."""

    code = "no_shadow"


class PipelineError(AgentError):
    """A pipeline part is misconfigured or cannot work with this model (never installed/started)."""

    code = "bad_pipeline"


class StreamError(AgentError):
    """A stream that does not exist, or cannot be started or stopped now."""

    code = "bad_stream"


class SourceError(AgentError):
    """A source cannot be opened, disappeared, or delivered something unusable; the runner retries."""

    code = "source_failed"


class SourceEnded(SourceError):  # noqa: N818 - an end, not a failure
    """A finite source (file without looping) has no more data."""

    code = "source_ended"


class LinkNotConfiguredError(AgentError):
    """An operation that needs the cloud link while none is configured."""

    code = "not_configured"


class OutboxFullError(AgentError):
    """The outbox is full and could not make room for a message (it was dropped)."""

    code = "outbox_full"


class ClientError(AgentError):
    """The local client could not reach the agent or got an error answer."""

    code = "client"

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)
