"""Device-side bundle updater: python-tuf's ngclient with a pinned root and a resumable fetcher.

The device is provisioned with a root metadata file (``trusted_root``); every refresh starts
from it and walks the signed root chain, so key rotations are followed and nothing else is
trusted. A bundle is returned only after TUF verified its length and hashes against signed
targets metadata; until then it lives in the updater's cache directory, never in the
destination. TUF's exceptions are mapped once, here, to :mod:`cloud_sync.errors`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from cloud_sync import errors
from cloud_sync.updater.fetcher import Progress, ResumableFetcher

log = structlog.get_logger(__name__)

TARGET_RE = re.compile(r"^(?P<name>[^/]+)/(?P=name)-(?P<version>[1-9]\d*)\.bundle$")


@dataclass(frozen=True)
class BundleInfo:
    """A bundle as the verified targets metadata describes it."""

    name: str
    version: int
    length: int
    hashes: dict[str, str]
    path: str
    custom: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> str | None:
        value = self.custom.get("runtime")
        return value if isinstance(value, str) else None


def _info(target: TargetFile) -> BundleInfo | None:
    match = TARGET_RE.match(target.path)
    if not match:
        return None
    custom = target.custom if isinstance(target.custom, dict) else {}
    return BundleInfo(match["name"], int(match["version"]), target.length, dict(target.hashes), target.path,
                      dict(custom))


@contextlib.contextmanager
def map_tuf_errors(what: str) -> Iterator[None]:
    """Translate TUF and transport exceptions raised inside the block into cloud_sync errors."""
    try:
        yield
    except errors.CloudSyncError:
        raise
    except tuf_exc.UnsignedMetadataError as exc:
        raise errors.SignatureError(f"{what}: bad signature or threshold not met: {exc}") from exc
    except tuf_exc.ExpiredMetadataError as exc:
        raise errors.ExpiredError(f"{what}: metadata expired (freeze attack or stale repository): {exc}") from exc
    except tuf_exc.BadVersionNumberError as exc:
        text = str(exc)
        if "must be >=" in text or re.match(r"Expected \S+\.json version", text):
            raise errors.RollbackError(f"{what}: rollback to older metadata refused: {text}") from exc
        raise errors.VersionMismatchError(f"{what}: metadata versions do not match (mix-and-match): {text}") from exc
    except tuf_exc.LengthOrHashMismatchError as exc:
        kind = "length" if "length" in str(exc) else "hashes"
        raise errors.IntegrityError(f"{what}: {kind} mismatch: {exc}", field=kind) from exc
    except tuf_exc.DownloadLengthMismatchError as exc:
        raise errors.IntegrityError(f"{what}: server sent more than the signed length: {exc}",
                                    field="length") from exc
    except DeserializationError as exc:
        raise errors.MetadataFormatError(f"{what}: unparseable metadata: {exc}") from exc
    except tuf_exc.RepositoryError as exc:
        raise errors.TrustError(f"{what}: metadata refused: {exc}") from exc
    except tuf_exc.DownloadHTTPError as exc:
        raise errors.DownloadError(f"{what}: HTTP {exc.status_code}", status=exc.status_code) from exc
    except tuf_exc.SlowRetrievalError as exc:
        raise errors.DownloadError(f"{what}: timed out: {exc}") from exc
    except tuf_exc.DownloadError as exc:
        detail = str(exc)
        if exc.__cause__ is not None and detail.startswith("Failed to download"):  # FetcherInterface.fetch()
            detail = f"{detail}: {exc.__cause__}"
        raise errors.DownloadError(f"{what}: {detail}") from exc


class BundleUpdater:
    """Find and download bundles that TUF verified against the pinned root.

    Args:
        metadata_dir: where verified metadata is cached (private to this device).
        repo_url: base URL of the repository (``.../metadata/`` and ``.../targets/`` below it).
        trusted_root: root metadata bytes, or a path to them, pinned at provisioning.
        cache_dir: partial downloads and verified-but-not-yet-moved bundles.
        fetcher: a ``FetcherInterface``; default :class:`ResumableFetcher` with the options below.
        max_bundle_bytes: bundles larger than this are refused before downloading.
        progress: ``callback(url, received, total_or_None)``.
        bandwidth: bytes/s limit for the default fetcher.
        timeout: read timeout in seconds for the default fetcher.
        deadline, min_rate, rate_grace: the default fetcher's slow-retrieval limits
            (see :class:`ResumableFetcher`).
    """

    def __init__(self, metadata_dir: Path, repo_url: str, *, trusted_root: bytes | Path, cache_dir: Path,
                 fetcher: FetcherInterface | None = None, max_bundle_bytes: int = 1 << 30,
                 progress: Progress | None = None, bandwidth: int | None = None, timeout: float = 30.0,
                 deadline: float = 3600.0, min_rate: int = 1024, rate_grace: float = 10.0) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.repo_url = repo_url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.max_bundle_bytes = max_bundle_bytes
        self._root = trusted_root if isinstance(trusted_root, bytes) else Path(trusted_root).read_bytes()
        self.fetcher = fetcher or ResumableFetcher(self.cache_dir / "partial", max_bytes=max_bundle_bytes,
                                                   bandwidth=bandwidth, progress=progress, timeout=timeout,
                                                   deadline=deadline, min_rate=min_rate, rate_grace=rate_grace)
        self._updater: Updater | None = None

    def _new_updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        with map_tuf_errors("trusted root"):
            return Updater(str(self.metadata_dir), f"{self.repo_url}/metadata/",
                           target_dir=str(self.cache_dir / "incoming"),
                           target_base_url=f"{self.repo_url}/targets/", fetcher=self.fetcher,
                           config=UpdaterConfig(app_user_agent="edge-agent"), bootstrap=self._root)

    def refresh(self) -> None:
        """Fetch and verify timestamp, snapshot, targets (and newer roots) from the repository.

        Raises:
            TrustError (SignatureError, RollbackError, ExpiredError, VersionMismatchError,
                IntegrityError, MetadataFormatError): metadata failed verification.
            DownloadError: the repository could not be reached or answered an HTTP error.
        """
        updater = self._new_updater()
        with map_tuf_errors("refresh"):
            updater.refresh()
        self._updater = updater
        log.info("updater.refreshed", repo=self.repo_url, bundles=len(self.list()))

    def _ready(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def list(self) -> list[BundleInfo]:
        """All bundles in the last refreshed targets metadata (call :meth:`refresh` first)."""
        if self._updater is None:
            return []
        # ngclient persisted targets.json after verifying it in this refresh; it only gives
        # the candidate paths, every lookup below goes through get_targetinfo() again.
        data = (self.metadata_dir / "targets.json").read_bytes()
        targets = Metadata[Targets].from_bytes(data).signed
        return [info for t in targets.targets.values() if (info := _info(t)) is not None]

    def find(self, name: str, version: int | None = None) -> BundleInfo:
        """The verified target for ``name`` at ``version`` (latest when None), refreshing if needed.

        Raises:
            TargetNotFoundError: no such bundle in the trusted metadata.
            TrustError / DownloadError: as :meth:`refresh`.
        """
        updater = self._ready()
        if version is None:
            versions = [b.version for b in self.list() if b.name == name]
            if not versions:
                raise errors.TargetNotFoundError(name)
            version = max(versions)
        path = f"{name}/{name}-{version}.bundle"
        with map_tuf_errors(f"lookup {path}"):
            target = updater.get_targetinfo(path)
        info = _info(target) if target is not None else None
        if info is None:
            raise errors.TargetNotFoundError(name, version)
        return info

    def download(self, name: str, version: int | None = None, *, dest_dir: Path | None = None) -> Path:
        """Download and verify a bundle; return ``dest_dir/<name>-<version>.bundle``.

        The file appears in ``dest_dir`` (default ``cache_dir/bundles``) only after TUF has
        verified it, by an atomic rename; on any failure nothing is written there.

        Raises:
            TargetNotFoundError: unknown bundle.
            BundleError (IntegrityError etc.): untrusted or oversized: never install it.
            DownloadError: transport failed; calling again resumes the download.
        """
        info = self.find(name, version)
        if info.length > self.max_bundle_bytes:
            raise errors.BundleError(f"{info.length} bytes is over the {self.max_bundle_bytes} byte bundle cap",
                                     field="length")
        updater = self._ready()
        target = updater.get_targetinfo(info.path)
        assert target is not None
        incoming = self.cache_dir / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = incoming / f"{name}-{info.version}.bundle.verified"
        log.info("updater.download_started", name=name, version=info.version, bytes=info.length)
        try:
            with map_tuf_errors(f"download {info.path}"):
                updater.download_target(target, filepath=str(tmp))
            dest = Path(dest_dir) if dest_dir is not None else self.cache_dir / "bundles"
            final = dest / f"{name}-{info.version}.bundle"
            _move_durably(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            log.warning("updater.download_failed", name=name, version=info.version,
                        code=getattr(exc, "code", type(exc).__name__), reason=errors.cap_message(str(exc)))
            raise
        log.info("updater.downloaded", name=name, version=info.version, path=str(final))
        return final


def _move_durably(src: Path, dest: Path) -> None:
    """fsync ``src`` and rename it to ``dest`` (copy first when on another filesystem)."""
    with src.open("rb+") as fh:
        os.fsync(fh.fileno())
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        src.replace(dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(dest)
        src.unlink()
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
