"""The HTTP edge's one mapping from errors to status codes.

Components raise typed errors (``agent.errors``, ``cloud_sync.errors``) with a stable ``code``;
this table is the only place that knows which HTTP status each one means. The nearest class
in an error's MRO wins, so a new subclass inherits its parent's status.
"""

from __future__ import annotations

from agent.errors import (
    ConfigError,
    DeployError,
    ForbiddenError,
    HeadTooLargeError,
    HTTPVersionError,
    InferenceError,
    LinkNotConfiguredError,
    MethodNotAllowedError,
    ModelNotFoundError,
    ModelNotReadyError,
    NotFoundError,
    OutboxFullError,
    OverloadedError,
    PayloadTooLargeError,
    PipelineError,
    RequestError,
    RequestTimeoutError,
    StreamError,
    UnauthorizedError,
    URITooLongError,
    UsageError,
)
from cloud_sync.errors import EdgeError

STATUS: dict[type[BaseException], int] = {
    RequestError: 400,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    MethodNotAllowedError: 405,
    RequestTimeoutError: 408,
    PayloadTooLargeError: 413,
    URITooLongError: 414,
    HeadTooLargeError: 431,
    HTTPVersionError: 505,
    OverloadedError: 503,
    ConfigError: 400,
    UsageError: 400,
    PipelineError: 400,
    StreamError: 400,
    ModelNotFoundError: 404,
    NotFoundError: 404,
    ModelNotReadyError: 503,
    InferenceError: 500,
    DeployError: 409,
    LinkNotConfiguredError: 503,
    OutboxFullError: 507,
}


def http_status(exc: BaseException) -> int:
    """The status that answers ``exc``: the nearest mapped class in its MRO, else 500."""
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_body(exc: EdgeError) -> dict[str, str]:
    """The JSON error object every endpoint answers with: a message naming what is wrong, and its code."""
    return {"error": str(exc), "code": exc.code}
