"""The published model catalogue, read from the service's TUF repository (``[server.publish]``).

What the Models page lists comes from the signed metadata the devices trust, not from a table of
our own: every target of the current ``targets.json`` with its length and hash, the keys whose
signatures it carries, and from the bundle's manifest the runtime, description and whether it has
a test vector. Manifests are read once per bundle hash (bundles are immutable); the metadata is
re-read only when ``timestamp.json`` changes. Blocking file I/O: call from a thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cloud_sync.bundles import read_manifest
from cloud_sync.errors import CloudSyncError
from cloud_sync.fleet.publishing import PublishSettings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Entry:
    name: str
    version: int
    runtime: str
    length: int
    sha256: str
    test_vectors: int
    description: str | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Listing:
    entries: list[Entry]
    signed_by: list[str]  # targets key ids (short) whose signatures targets.json carries
    threshold: int
    targets_version: int
    error: str | None = None

    def by_name(self) -> list[tuple[str, list[Entry]]]:
        names: dict[str, list[Entry]] = {}
        for e in sorted(self.entries, key=lambda e: (e.name, -e.version)):
            names.setdefault(e.name, []).append(e)
        return list(names.items())


class Catalogue:
    """``listing()`` of a repository, or an empty one when uploads are not configured."""

    def __init__(self, publish: PublishSettings | None) -> None:
        self.publish = publish
        self._lock = threading.Lock()
        self._manifests: dict[str, tuple[int, str | None, str]] = {}  # sha256 -> (vectors, description, runtime)
        self._cached: tuple[float, Listing] | None = None

    @property
    def enabled(self) -> bool:
        return self.publish is not None

    def listing(self) -> Listing:
        if self.publish is None:
            return Listing([], [], 0, 0)
        stamp = self.publish.repo_dir / "metadata" / "timestamp.json"
        try:
            mtime = stamp.stat().st_mtime_ns
        except OSError:
            return Listing([], [], 0, 0, error=f"no repository at {self.publish.repo_dir}")
        with self._lock:
            if self._cached is not None and self._cached[0] == mtime:
                return self._cached[1]
        try:
            listing = self._read()
        except CloudSyncError as exc:
            log.warning("console.catalogue_unreadable", error=str(exc))
            return Listing([], [], 0, 0, error=str(exc))
        with self._lock:
            self._cached = (mtime, listing)
        return listing

    def _read(self) -> Listing:
        assert self.publish is not None
        repo = self.publish.repository()
        root = repo.root().signed
        targets = repo.targets()
        entries: list[Entry] = []
        for path, info in targets.signed.targets.items():
            custom: dict[str, Any] = info.unrecognized_fields.get("custom") or {}
            name, version = custom.get("name"), custom.get("version")
            if not isinstance(name, str) or not isinstance(version, int):
                continue
            sha = info.hashes.get("sha256", "")
            vectors, description, runtime = self._manifest(repo.targets_dir, path, sha, custom)
            entries.append(Entry(name, version, runtime, info.length, sha, vectors, description))
        return Listing(entries, sorted(k[:12] for k in targets.signatures),
                       root.roles["targets"].threshold, targets.signed.version)

    def _manifest(self, targets_dir: Path, path: str, sha: str, custom: dict[str, Any]) -> tuple[int, str | None, str]:
        with self._lock:
            known = self._manifests.get(sha)
        if known is not None:
            return known
        folder, _, base = path.rpartition("/")
        bundle = targets_dir / folder / f"{sha}.{base}"
        try:
            manifest = read_manifest(bundle)
            found: tuple[int, str | None, str] = (len(manifest.test_vectors), manifest.description, manifest.runtime)
        except (CloudSyncError, OSError) as exc:  # listed but unreadable here: show what the metadata says
            log.warning("console.bundle_unreadable", target=path, error=str(exc))
            return 0, None, str(custom.get("runtime") or "?")
        with self._lock:
            self._manifests[sha] = found
        return found
