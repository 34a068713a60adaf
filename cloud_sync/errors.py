"""The project's one exception root, and the cloud_sync hierarchy under it.

Every error edge-agent and edge-fleet raise on purpose derives from :class:`EdgeError`
(``agent.errors.AgentError`` too: the agent may import cloud_sync, never the reverse). Each
class has a short, stable snake_case ``code`` that HTTP answers, MQTT command responses
(``error.code``) and events carry unchanged; the CLIs map ``exit_code``. Sub-roots say what
the caller should do:

* :class:`BundleError`: the bundle or its metadata is bad or untrusted. Never install it;
  retrying the same download will not help.
* :class:`DownloadError`: the transport failed. Retrying (resuming) makes sense.
* :class:`RepositoryError`: a fleet-side repository or key problem (``edge-fleet``).
* :class:`LinkError`: the MQTT link; :class:`CommandError` travels back to the fleet.
* :class:`StoreError`: a persistent store (outbox, command log) cannot be used; the daemon
  moves it aside and starts a fresh one. :class:`OutboxError` is the outbox's.
* :class:`UploadError`: a model upload (or a model file for ``bundle build``) was refused;
  nothing was published. One class per problem, each with its own ``code`` and HTTP ``status``.
"""

from __future__ import annotations

from typing import Any

#: The longest error message (in characters) that goes into a record, a log line, an event or an answer.
MAX_MESSAGE_CHARS = 1024
#: The longest ``field`` (manifest field, archive member name) an error names.
MAX_FIELD_CHARS = 256


def cap_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, saying how many were left out.

    Every error message that is stored, logged or sent passes through here: a hostile bundle
    controls member names, link targets and manifest fields, and an error that quotes them
    whole made a 64 MiB deployment record, log line and MQTT event.
    """
    if len(text) <= limit:
        return text
    marker = f" ... [cut: {len(text)} characters in all]"
    return text[: max(limit - len(marker), 0)] + marker


class EdgeError(Exception):
    """Root of every error the project raises on purpose; ``code`` is stable for scripts."""

    code = "internal"
    exit_code = 1

    def to_dict(self) -> dict[str, Any]:
        """The ``{"code", "message"}`` object that answers and events carry (message capped)."""
        return {"code": self.code, "message": cap_message(str(self))}


class CloudSyncError(EdgeError):
    """Root of all cloud_sync errors."""

    code = "cloud_sync_error"


class BundleError(CloudSyncError):
    """A bad or untrusted bundle: it is never installed.

    ``reason`` is a one-line human explanation; ``field`` names the manifest field, archive
    member or metadata item at fault when there is one.
    """

    code = "bad_bundle"

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        self.reason = cap_message(reason)
        self.field = cap_message(field, MAX_FIELD_CHARS) if field is not None else None
        super().__init__(cap_message(f"{self.field}: {self.reason}" if self.field else self.reason))


class ManifestError(BundleError):
    """The manifest is missing, malformed, violates the schema or names a missing file."""

    code = "bad_manifest"


class UnsafeArchiveError(BundleError):
    """An archive member is unsafe (path escape, link, device) or over a size/count cap."""

    code = "unsafe_archive"


class TrustError(BundleError):
    """TUF refused the metadata or the target: nothing it did not verify is installed."""

    code = "untrusted"


class SignatureError(TrustError):
    """Metadata is not signed by a threshold of the keys the trusted root names."""

    code = "bad_signature"


class RollbackError(TrustError):
    """The repository offered metadata older than what this device already trusts."""

    code = "rollback"


class ExpiredError(TrustError):
    """Metadata has expired (a freeze attack, or a repository nobody re-signed)."""

    code = "expired"


class VersionMismatchError(TrustError):
    """Metadata versions disagree with each other (mix-and-match attack)."""

    code = "version_mismatch"


class IntegrityError(TrustError):
    """A downloaded file does not match the signed length or hashes (``field`` says which)."""

    code = "integrity"


class MetadataFormatError(TrustError):
    """Metadata could not be parsed or has the wrong type."""

    code = "bad_metadata"


class TargetNotFoundError(CloudSyncError):
    """The trusted metadata lists no bundle with that name (and version)."""

    code = "not_found"

    def __init__(self, name: str, version: int | None = None) -> None:
        self.name = name
        self.version = version
        what = name if version is None else f"{name} version {version}"
        super().__init__(f"no bundle {what} in the repository")


class DownloadError(CloudSyncError):
    """The transport failed (connection, timeout, HTTP status): retrying makes sense."""

    code = "download_failed"

    def __init__(self, reason: str, *, url: str | None = None, status: int | None = None) -> None:
        self.reason = cap_message(reason)
        self.url = url
        self.status = status
        super().__init__(cap_message(f"{self.reason} ({url})" if url else self.reason))


class RepositoryError(CloudSyncError):
    """Fleet-side repository problem: not initialised, missing keys, duplicate version."""

    code = "repository_error"


class LinkError(CloudSyncError):
    """Root of MQTT link errors."""

    code = "link_error"


class CommandError(LinkError):
    """A command that cannot be (or was not) carried out; ``code`` names why, for scripts.

    The dispatcher's own refusals (``bad_request``, ``too_large``, ``unknown_command``,
    ``bad_args``, ``wrong_device``) use it; handlers raise the typed error of what failed.
    """

    code = "command_failed"

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class ConnectError(LinkError):
    """Why the MQTT session could not connect, or lost its connection (``code`` says which kind).

    Codes: ``tls_failed`` (handshake or certificate), ``not_authorized`` and ``bad_credentials``
    (the broker's CONNACK), ``connect_refused`` (any other CONNACK refusal), ``unreachable``
    (DNS, TCP, timeouts), ``connection_lost`` (an established connection ended).
    """

    code = "connect_failed"

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class PublishRefusedError(LinkError):
    """The broker acknowledged a publish with a failure reason code (MQTT 5), e.g. an ACL denial."""

    code = "publish_refused"

    def __init__(self, reason: str, *, topic: str | None = None) -> None:
        self.reason = reason
        self.topic = topic
        super().__init__(f"{topic}: {reason}" if topic else reason)


class StoreError(CloudSyncError):
    """A persistent store cannot be used: corrupt, unreadable, or not what it claims to be.

    ``path`` names the file and ``reason`` says what is wrong; the owner of the store decides
    whether to move the file aside (``cloud_sync.stores.move_aside``) and start a fresh one.
    """

    code = "store_error"

    def __init__(self, reason: str, *, path: str | None = None, store: str = "store") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{store} {path}: {reason}" if path else f"{store}: {reason}")


class OutboxError(StoreError):
    """The outbox database cannot be used: corrupt, unreadable, closed, or an unexpected SQLite error.

    Disk full is *not* an ``OutboxError``: it is handled by dropping messages.
    """

    code = "outbox_error"

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        super().__init__(reason, path=path, store="outbox")


# -- model uploads (fleet side: cloud_sync.fleet.publishing) ----------------------------------


class UploadError(CloudSyncError):
    """An uploaded model was refused and nothing was published.

    ``reason`` is one line naming the problem; ``field`` names the form field, archive member
    or manifest field at fault when there is one; ``status`` is the HTTP status to answer.
    """

    code = "bad_upload"
    status = 422

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": str(self)}
        if self.field:
            out["field"] = self.field
        return out


class NotAModelError(UploadError):
    """ONNX Runtime or LiteRT cannot load the file (not a model, truncated, unsupported, crashed)."""

    code = "not_a_model"


class UploadTooLargeError(UploadError):
    """The upload, a form field or an archive member is over its size cap (checked while reading)."""

    code = "too_large"
    status = 413


class UnsafeUploadError(UploadError):
    """The archive is unsafe or unreadable: traversal, link, device, bomb, too many or too big members."""

    code = "unsafe_archive"


class BadUploadManifestError(UploadError):
    """The archive's ``manifest.json`` (or the manifest the upload builds) is invalid (``field`` says where)."""

    code = "bad_manifest"


class BadNameError(UploadError):
    """The model name is not 1-64 characters of ``a-z 0-9 . _ -`` starting with a letter or digit."""

    code = "bad_name"


class BadVersionError(UploadError):
    """The version is not a positive integer."""

    code = "bad_version"


class BadProcessingError(UploadError):
    """Pre- or post-processing is not a JSON object with a non-empty string ``type``."""

    code = "bad_processing"


class BadTestInputError(UploadError):
    """The test input is not a readable ``.npy``/``.npz`` file or does not fit the model's inputs."""

    code = "bad_test_input"


class ModelCheckTimeoutError(UploadError):
    """Loading or running the model took longer than the service allows."""

    code = "check_timeout"


class VersionExistsError(UploadError, RepositoryError):
    """That name and version is already published: published versions are immutable."""

    code = "version_exists"
    status = 409
