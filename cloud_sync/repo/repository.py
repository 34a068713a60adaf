"""The fleet-side TUF repository on disk, built with python-tuf's Metadata API.

Layout (consistent snapshots, so a static host can serve it while it is being updated)::

    REPO/metadata/N.root.json      every root version (devices walk the chain)
    REPO/metadata/root.json        copy of the newest root (what devices are provisioned with)
    REPO/metadata/N.targets.json   N.snapshot.json   timestamp.json
    REPO/targets/<name>/<sha256>.<name>-<version>.bundle

Private keys live in a separate keys directory (:mod:`cloud_sync.repo.keys`). Every
change writes new files first and ``timestamp.json`` last, each atomically, so a reader
never sees a half-published state. A lock file serialises concurrent writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import structlog
from tuf.api.exceptions import RepositoryError as TufRepositoryError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from cloud_sync.bundles.archive import read_manifest
from cloud_sync.bundles.build import bundle_file_name
from cloud_sync.errors import RepositoryError, VersionExistsError
from cloud_sync.fsutil import write_atomic
from cloud_sync.repo.keys import KeyStore

log = structlog.get_logger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
#: Roles the service signs with day to day; the root key stays offline (``edge-fleet keys export-online``).
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=30),
    "timestamp": timedelta(days=7),
}
T = TypeVar("T", Root, Timestamp, Snapshot, Targets)


@dataclass(frozen=True)
class RoleKeys:
    """How many keys a role gets and how many must sign."""

    count: int = 1
    threshold: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.threshold <= self.count:
            raise RepositoryError(f"need 1 <= threshold ({self.threshold}) <= keys ({self.count})")


@dataclass(frozen=True)
class PublishedTarget:
    """What ``publish`` added: the TUF target path and its signed length and hashes."""

    path: str
    length: int
    hashes: dict[str, str]
    custom: dict[str, Any] = field(default_factory=dict)


def target_path(name: str, version: int) -> str:
    """The TUF target path of a bundle: ``<name>/<name>-<version>.bundle``."""
    return f"{name}/{bundle_file_name(name, version)}"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class Repository:
    """A TUF repository directory plus the keys directory that signs it."""

    def __init__(self, repo_dir: Path, keys_dir: Path) -> None:
        self.dir = Path(repo_dir)
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys = KeyStore(Path(keys_dir))
        if _inside(self.keys.dir, self.dir):
            raise RepositoryError(f"keys directory {keys_dir} is inside the published repository {repo_dir}")

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def init(cls, repo_dir: Path, keys_dir: Path, *, roles: Mapping[str, RoleKeys] | None = None,
             expiry: Mapping[str, timedelta] | None = None) -> Repository:
        """Generate keys and write root v1 plus initial targets, snapshot and timestamp.

        Raises:
            RepositoryError: the repository or the keys already exist, or bad thresholds.
        """
        repo = cls(repo_dir, keys_dir)
        if (repo.metadata_dir / "1.root.json").exists():
            raise RepositoryError(f"{repo.metadata_dir} already holds a repository")
        for role in ROLES:
            if repo.keys.has_keys(role):
                raise RepositoryError(f"{repo.keys.dir / role} already holds keys; use a new keys directory")
        specs = {role: (roles or {}).get(role, RoleKeys()) for role in ROLES}
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        with repo._locked():
            root = Root(version=1, expires=repo._expires("root", expiry), consistent_snapshot=True)
            for role, spec in specs.items():
                for _ in range(spec.count):
                    root.add_key(repo.keys.generate(role).public_key, role)
                root.roles[role].threshold = spec.threshold
            repo._write_root(Metadata(root))
            targets = Targets(version=1, expires=repo._expires("targets", expiry))
            repo._write("targets", Metadata(targets), root)
            repo._write_snapshot_and_timestamp(root, 1, expiry, snapshot_version=1, timestamp_version=1)
        log.info("repo.initialised", repo=str(repo.dir), keys=str(repo.keys.dir),
                 roles={r: f"{s.threshold}/{s.count}" for r, s in specs.items()})
        return repo

    # -- reading -----------------------------------------------------------------------------

    def _read(self, name: str, cls: type[T]) -> Metadata[T]:
        path = self.metadata_dir / name
        try:
            md: Metadata[Any] = Metadata.from_file(str(path))
        except (OSError, DeserializationError, TufRepositoryError) as exc:
            raise RepositoryError(f"cannot read {path}: {exc}") from exc
        if not isinstance(md.signed, cls):
            raise RepositoryError(f"{path} is not {cls.type} metadata")
        return md

    def root(self) -> Metadata[Root]:
        """The newest root (highest ``N.root.json``)."""
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata_dir.glob("*.root.json")
                    if p.name.split(".", 1)[0].isdigit()]
        if not versions:
            raise RepositoryError(f"no repository at {self.dir} (run 'edge-fleet keys init')")
        return self._read(f"{max(versions)}.root.json", Root)

    def timestamp(self) -> Metadata[Timestamp]:
        return self._read("timestamp.json", Timestamp)

    def snapshot(self) -> Metadata[Snapshot]:
        return self._read(f"{self.timestamp().signed.snapshot_meta.version}.snapshot.json", Snapshot)

    def targets(self) -> Metadata[Targets]:
        return self._read(f"{self.snapshot().signed.meta['targets.json'].version}.targets.json", Targets)

    def root_bytes(self, version: int | None = None) -> bytes:
        """Root metadata as published: what a device is provisioned with (``trusted_root``)."""
        name = "root.json" if version is None else f"{version}.root.json"
        return (self.metadata_dir / name).read_bytes()

    # -- changes -----------------------------------------------------------------------------

    def publish(self, bundle: Path, *, expiry: Mapping[str, timedelta] | None = None,
                exists_ok: bool = True) -> PublishedTarget:
        """Add ``bundle`` as target ``<name>/<name>-<version>.bundle`` and re-sign.

        Bumps targets, snapshot and timestamp, signed with the online keys only (the root key
        is never needed). All three are signed in memory before anything is written, then the
        bundle, targets and snapshot are written and ``timestamp.json`` last (what clients read
        first), so a signing failure leaves the repository as it was, and a failed write removes
        what it had written. Publishing the same bytes again is a no-op unless ``exists_ok`` is
        false; different bytes under an already published name and version are refused.

        Raises:
            ManifestError / UnsafeArchiveError: the bundle's manifest cannot be read.
            VersionExistsError: the version is already published (with other content, or at all
                when ``exists_ok`` is false); a ``RepositoryError``.
            RepositoryError: no repository, or not enough online keys.
        """
        self.root()  # fail early when there is no repository
        manifest = read_manifest(Path(bundle))
        path = target_path(manifest.name, manifest.version)
        custom = {"name": manifest.name, "version": manifest.version, "runtime": manifest.runtime}
        info = TargetFile.from_file(path, str(bundle), ["sha256"])
        info.unrecognized_fields["custom"] = custom
        with self._locked():
            root = self.root().signed
            targets = self.targets()
            existing = targets.signed.targets.get(path)
            if existing is not None:
                same = existing.hashes == info.hashes and existing.length == info.length
                if same and exists_ok:
                    log.info("repo.publish_unchanged", target=path)
                    return PublishedTarget(path, info.length, dict(info.hashes), custom)
                what = "with the same content" if same else "with different content; bump the version"
                raise VersionExistsError(f"{path} is already published {what}", field="version")
            targets.signed.targets[path] = info
            targets.signed.version += 1
            targets.signed.expires = self._expires("targets", expiry)
            self._sign(targets, "targets", root)
            snapshot, timestamp = self._snapshot_and_timestamp(root, targets.signed.version, expiry,
                                                               self.snapshot().signed.version + 1,
                                                               self.timestamp().signed.version + 1)
            base = bundle_file_name(manifest.name, manifest.version)
            stored = self.targets_dir / manifest.name / f"{info.hashes['sha256']}.{base}"
            created_dir = not stored.parent.exists()
            written: list[Path] = []
            try:
                stored.parent.mkdir(parents=True, exist_ok=True)
                _atomic_copy(Path(bundle), stored)
                written.append(stored)
                for md, name in ((targets, f"{targets.signed.version}.targets.json"),
                                 (snapshot, f"{snapshot.signed.version}.snapshot.json")):
                    write_atomic(self.metadata_dir / name, md.to_bytes(JSONSerializer()))
                    written.append(self.metadata_dir / name)
                write_atomic(self.metadata_dir / "timestamp.json", timestamp.to_bytes(JSONSerializer()))
            except BaseException:
                for item in written:
                    item.unlink(missing_ok=True)
                if created_dir:
                    with contextlib.suppress(OSError):
                        stored.parent.rmdir()
                raise
        log.info("repo.published", target=path, length=info.length, sha256=info.hashes["sha256"],
                 targets_version=targets.signed.version)
        return PublishedTarget(path, info.length, dict(info.hashes), custom)

    def online_keys(self) -> dict[str, int]:
        """How many usable private keys each online role has here, checked against the root.

        Raises:
            RepositoryError: a role has fewer keys than its threshold (publishing would fail).
        """
        root = self.root().signed
        found = {}
        for role in ONLINE_ROLES:
            signers = self.keys.signers(role, root.roles[role].keyids)
            if len(signers) < root.roles[role].threshold:
                raise RepositoryError(f"{role}: {len(signers)} of the {root.roles[role].threshold} keys needed "
                                      f"are in {self.keys.dir / role}")
            found[role] = len(signers)
        return found

    def holds_root_key(self) -> bool:
        """True if a private key of the current root is in the keys directory (it belongs offline)."""
        return bool(self.keys.signers("root", self.root().signed.roles["root"].keyids))

    def refresh(self, *, expiry: Mapping[str, timedelta] | None = None) -> int:
        """Re-sign snapshot and timestamp with fresh expiry (run this before timestamps expire).

        Returns the new timestamp version.
        """
        with self._locked():
            root = self.root().signed
            ts_version = self.timestamp().signed.version + 1
            self._write_snapshot_and_timestamp(root, self.targets().signed.version, expiry,
                                               self.snapshot().signed.version + 1, ts_version)
        log.info("repo.refreshed", timestamp_version=ts_version)
        return ts_version

    def rotate(self, *, roles: Mapping[str, RoleKeys | None] | None = None,
               expiry: Mapping[str, timedelta] | None = None) -> int:
        """Replace the keys of ``roles`` (default: root only) in a new root version.

        The new root is signed by a threshold of the old root keys *and* by the new root
        keys, so devices that trust the old root verify and follow it. Metadata of rotated
        non-root roles is re-signed with the new keys. Old private keys move to
        ``KEYS_DIR/retired/``. Returns the new root version.

        Raises:
            RepositoryError: not enough old root keys to meet the old threshold.
        """
        wanted = dict(roles or {"root": None})
        for role in wanted:
            if role not in ROLES:
                raise RepositoryError(f"unknown role '{role}' (roles: {', '.join(ROLES)})")
        with self._locked():
            old = self.root()
            new_root = Metadata[Root].from_bytes(old.to_bytes()).signed
            new_root.version = old.signed.version + 1
            new_root.expires = self._expires("root", expiry)
            retired: list[tuple[str, str]] = []
            for role, spec in wanted.items():
                current = new_root.roles[role]
                keys = spec or RoleKeys(len(current.keyids), current.threshold)
                for keyid in list(current.keyids):
                    new_root.revoke_key(keyid, role)
                    retired.append((role, keyid))
                for _ in range(keys.count):
                    new_root.add_key(self.keys.generate(role).public_key, role)
                new_root.roles[role].threshold = keys.threshold
            md = Metadata(new_root)
            old_signers = self.keys.signers("root", old.signed.roles["root"].keyids)
            if len(old_signers) < old.signed.roles["root"].threshold:
                raise RepositoryError(f"only {len(old_signers)} of the {old.signed.roles['root'].threshold} old root "
                                      f"keys needed to sign the rotation are in {self.keys.dir}")
            self._sign(md, "root", new_root, extra=old_signers)
            self._write_root(md, signed=True)
            if "targets" in wanted:
                self._bump("targets", self.targets(), new_root, expiry)
            self._write_snapshot_and_timestamp(new_root, self.targets().signed.version, expiry,
                                               self.snapshot().signed.version + 1,
                                               self.timestamp().signed.version + 1)
            for role, keyid in retired:
                self.keys.retire(role, keyid)
        log.info("repo.rotated", root_version=new_root.version, roles=sorted(wanted))
        return new_root.version

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _expires(role: str, expiry: Mapping[str, timedelta] | None) -> datetime:
        return _now() + (expiry or {}).get(role, DEFAULT_EXPIRY[role])

    def _sign(self, md: Metadata[Any], role: str, root: Root, extra: list[Any] | None = None) -> None:
        keyids = root.roles[role].keyids
        signers = self.keys.signers(role, keyids)
        if len(signers) < root.roles[role].threshold:
            raise RepositoryError(f"{role}: {len(signers)} of the {root.roles[role].threshold} keys needed "
                                  f"are in {self.keys.dir / role}")
        md.signatures.clear()
        seen: set[str] = set()
        for signer in [*(extra or []), *signers]:
            if signer.public_key.keyid not in seen:
                md.sign(signer, append=True)
                seen.add(signer.public_key.keyid)

    def _write_root(self, md: Metadata[Root], *, signed: bool = False) -> None:
        if not signed:
            self._sign(md, "root", md.signed)
        data = md.to_bytes(JSONSerializer())
        write_atomic(self.metadata_dir / f"{md.signed.version}.root.json", data)
        write_atomic(self.metadata_dir / "root.json", data)

    def _write(self, role: str, md: Metadata[Any], root: Root) -> None:
        self._sign(md, role, root)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        write_atomic(self.metadata_dir / name, md.to_bytes(JSONSerializer()))

    def _bump(self, role: str, md: Metadata[Any], root: Root, expiry: Mapping[str, timedelta] | None) -> None:
        md.signed.version += 1
        md.signed.expires = self._expires(role, expiry)
        self._write(role, md, root)

    def _snapshot_and_timestamp(self, root: Root, targets_version: int, expiry: Mapping[str, timedelta] | None,
                                snapshot_version: int, timestamp_version: int,
                                ) -> tuple[Metadata[Snapshot], Metadata[Timestamp]]:
        """New snapshot and timestamp, signed, not written."""
        snapshot = Metadata(Snapshot(version=snapshot_version, expires=self._expires("snapshot", expiry),
                                     meta={"targets.json": MetaFile(version=targets_version)}))
        self._sign(snapshot, "snapshot", root)
        timestamp = Metadata(Timestamp(version=timestamp_version, expires=self._expires("timestamp", expiry),
                                       snapshot_meta=MetaFile(version=snapshot_version)))
        self._sign(timestamp, "timestamp", root)
        return snapshot, timestamp

    def _write_snapshot_and_timestamp(self, root: Root, targets_version: int,
                                      expiry: Mapping[str, timedelta] | None,
                                      snapshot_version: int, timestamp_version: int) -> None:
        snapshot, timestamp = self._snapshot_and_timestamp(root, targets_version, expiry, snapshot_version,
                                                           timestamp_version)
        write_atomic(self.metadata_dir / f"{snapshot_version}.snapshot.json", snapshot.to_bytes(JSONSerializer()))
        write_atomic(self.metadata_dir / "timestamp.json", timestamp.to_bytes(JSONSerializer()))


def _inside(path: Path, parent: Path) -> bool:
    try:
        return path.resolve().is_relative_to(parent.resolve())
    except OSError:
        return False


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    tmp.replace(dest)
