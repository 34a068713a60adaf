"""Bundle archives: a tar (optionally gzip) holding ``manifest.json`` first, then the files.

Building is deterministic (sorted members, zero mtimes and owners) so the same inputs give
the same bytes and the same TUF hash. Extraction is defensive: :func:`safe_extract` treats
the archive as hostile even though TUF verified it (a compromised build host signs too),
checks every member while streaming and never writes outside ``dest``; the headers
themselves are bounded before tarfile reads them (:mod:`cloud_sync.bundles.tarstream`).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import structlog

from cloud_sync.bundles.manifest import MANIFEST_NAME, Manifest, check_relative_path
from cloud_sync.bundles.tarstream import open_tar, stream_cap
from cloud_sync.errors import ManifestError, UnsafeArchiveError
from cloud_sync.fsutil import fsync_dir

log = structlog.get_logger(__name__)

CHUNK = 1 << 16
MAX_MANIFEST_BYTES = 4 << 20
#: The longest member name, in characters and in UTF-8 bytes (a file name's limit on Linux
#: file systems, and the manifest's limit for paths).
MAX_NAME = 255


@dataclass(frozen=True)
class ExtractLimits:
    """Caps enforced while extracting (defaults suit a small edge device)."""

    max_member_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_members: int = 256


def write_archive(out_path: Path, manifest: Manifest, files: Mapping[str, Path], *, compress: bool = True) -> Path:
    """Write ``manifest.json`` plus ``files`` (archive name -> source path) to ``out_path`` atomically.

    Raises:
        ManifestError: a file the manifest names is not in ``files``.
    """
    names = set(files)
    for field, rel in manifest.referenced_files():
        if rel not in names:
            raise ManifestError(f"file '{rel}' is not in the bundle", field=field)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open("wb") as raw:
            # Fixed gzip mtime and no file name in the header keep the bytes reproducible.
            stream: IO[bytes] = raw
            if compress:
                stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)  # type: ignore[assignment]
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, MANIFEST_NAME, manifest.to_json())
                for name in sorted(files):
                    check_relative_path(name)
                    with files[name].open("rb") as fh:
                        tar.addfile(_info(name, files[name].stat().st_size), fh)
            if stream is not raw:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


def read_manifest(archive: Path, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
    """Read and validate ``manifest.json`` from an archive without extracting anything else.

    Raises:
        ManifestError: no manifest, malformed JSON or schema violation.
        UnsafeArchiveError: not a readable tar archive (or a refused header), or the manifest
            is over ``max_bytes``.
    """
    limits = ExtractLimits()
    with open_tar(archive, max_stream_bytes=stream_cap(limits.max_total_bytes, limits.max_members)) as tar:
        for member in tar:
            if member.name.removeprefix("./") != MANIFEST_NAME:
                continue
            if not member.isfile():
                raise UnsafeArchiveError("must be a regular file", field=MANIFEST_NAME)
            if member.size > max_bytes:
                raise UnsafeArchiveError(f"{member.size} bytes is over the {max_bytes} byte cap",
                                         field=MANIFEST_NAME)
            fh = tar.extractfile(member)
            assert fh is not None
            return Manifest.from_json(fh.read())
    raise ManifestError(f"{MANIFEST_NAME} is missing from the archive", field=MANIFEST_NAME)


def safe_extract(archive: Path, dest: Path, *, max_member_bytes: int, max_total_bytes: int,
                 max_members: int, fsync: bool = True) -> list[str]:
    """Extract regular files and directories of ``archive`` into ``dest``, which must not exist.

    Members are checked one by one while streaming; on the first bad one ``dest`` is
    removed again, so a failed extraction leaves nothing behind.

    Returns:
        The extracted file names (relative POSIX paths), in archive order.

    Raises:
        UnsafeArchiveError: naming the member (absolute path, ``..``, symlink, hardlink,
            device, fifo, duplicate, over ``max_member_bytes``, past ``max_members`` or
            ``max_total_bytes``), or the archive is corrupt.
        FileExistsError: ``dest`` already exists.
    """
    dest.mkdir(parents=True, exist_ok=False)
    try:
        names = _extract(archive, dest, max_member_bytes, max_total_bytes, max_members, fsync=fsync)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info("bundle.extracted", archive=str(archive), dest=str(dest), files=len(names))
    return names


def _shown(name: str) -> str:
    """A member name or link target as an error may quote it: control characters and undecodable
    bytes escaped (a name is the archive author's text; it must not write to a terminal or a log)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def _member_path(member: tarfile.TarInfo) -> str:
    name, shown = member.name, _shown(member.name)
    if len(name) > MAX_NAME:
        raise UnsafeArchiveError(f"name of {len(name)} characters is over the {MAX_NAME} character cap", field=shown)
    try:
        encoded = name.encode("utf-8")  # tarfile decodes with surrogateescape: undecodable bytes fail here
    except UnicodeEncodeError:
        raise UnsafeArchiveError("name is not valid UTF-8", field=shown) from None
    if len(encoded) > MAX_NAME:
        raise UnsafeArchiveError(f"name of {len(encoded)} UTF-8 bytes is over the {MAX_NAME} byte cap", field=shown)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise UnsafeArchiveError("control character in the name", field=shown)
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError("absolute path", field=shown)
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts or "\\" in name:
        raise UnsafeArchiveError("path escapes the bundle ('..' or backslash)", field=shown)
    if not parts:
        raise UnsafeArchiveError("empty member name", field=shown or "<empty>")
    return "/".join(parts)


def _extract(archive: Path, dest: Path, max_member: int, max_total: int, max_members: int, *,
             fsync: bool) -> list[str]:
    names: list[str] = []
    total = 0
    count = 0
    with open_tar(archive, max_stream_bytes=stream_cap(max_total, max_members)) as tar:
        for member in tar:
            count += 1
            if count > max_members:
                raise UnsafeArchiveError(f"more than {max_members} members", field=_shown(member.name))
            rel = _member_path(member)  # from here on the name is checked: printable, short, inside the bundle
            if member.issym() or member.islnk():
                kind = "symlink" if member.issym() else "hardlink"
                raise UnsafeArchiveError(f"{kind} to '{_shown(member.linkname)}' refused", field=member.name)
            if member.isdir():
                _make_dirs(dest / rel, rel)
                continue
            if not member.isfile():
                raise UnsafeArchiveError("device, fifo or other special file refused", field=member.name)
            if member.size > max_member:
                raise UnsafeArchiveError(f"{member.size} bytes is over the {max_member} byte member cap",
                                         field=member.name)
            if rel == MANIFEST_NAME and member.size > MAX_MANIFEST_BYTES:
                raise UnsafeArchiveError(f"{member.size} bytes is over the {MAX_MANIFEST_BYTES} byte manifest cap",
                                         field=member.name)
            total += member.size
            if total > max_total:
                raise UnsafeArchiveError(f"total size passes the {max_total} byte cap", field=member.name)
            src = tar.extractfile(member)
            assert src is not None
            _write_member(dest, rel, src, member.size, fsync)
            names.append(rel)
    if fsync:
        fsync_dir(dest)
    return names


def _make_dirs(path: Path, rel: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # an earlier member made a file where a directory goes
        raise UnsafeArchiveError("conflicts with an earlier file of the same name", field=rel) from None


def _write_member(dest: Path, rel: str, src: IO[bytes], size: int, fsync: bool) -> None:
    target = dest / rel
    _make_dirs(target.parent, rel)
    # Parents were created by us from checked names, and links are refused, so resolving
    # stays inside dest; check anyway (defence in depth against a racing writer).
    if not target.parent.resolve().is_relative_to(dest.resolve()):
        raise UnsafeArchiveError("path escapes the bundle", field=rel)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:  # a file or directory of that name came earlier
        raise UnsafeArchiveError("duplicate member", field=rel) from None
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > size:  # tarfile never returns more than the header says; be sure
                raise UnsafeArchiveError("member is longer than its header", field=rel)
            out.write(chunk)
        if fsync:
            out.flush()
            os.fsync(out.fileno())


def load_extracted(root: Path) -> Manifest:
    """Read ``manifest.json`` from an extracted bundle and check every file it names exists.

    Raises:
        ManifestError: manifest missing, malformed, invalid, or naming a missing file.
    """
    path = root / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise ManifestError(f"{MANIFEST_NAME} is missing from the bundle", field=MANIFEST_NAME)
    manifest = Manifest.from_json(path.read_bytes())
    manifest.check_files(root)
    return manifest


def extract_bundle(archive: Path, staging: Path, limits: ExtractLimits | None = None) -> Manifest:
    """:func:`safe_extract` then :func:`load_extracted`; ``staging`` is removed again on any failure.

    Raises:
        UnsafeArchiveError / ManifestError: as the two steps; nothing is left in ``staging``.
    """
    limits = limits or ExtractLimits()
    safe_extract(archive, staging, max_member_bytes=limits.max_member_bytes,
                 max_total_bytes=limits.max_total_bytes, max_members=limits.max_members)
    try:
        return load_extracted(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
