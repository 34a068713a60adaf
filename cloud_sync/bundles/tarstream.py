"""Opening a hostile tar archive so that reading it costs bounded memory and time.

This module owns the layer under :mod:`cloud_sync.bundles.archive`'s member checks: what
``tarfile`` does with a header before anyone sees the member. Left alone, ``tarfile``

* reads a PAX extended header or a GNU long name/link whole into memory (``_proc_pax``,
  ``_proc_gnulong``): a 512 MiB PAX header, 0.5 MB compressed, cost 1.5 GiB;
* recurses once per chained extension header (a chain of thousands is a ``RecursionError``);
* grows a list with every entry of a GNU sparse map, read from the stream without bound;
* in ``r|gz`` mode inflates each 10 KiB of input whole (up to ~10 MB at once) and then copies
  what is left for every read, so a gzip bomb is slow as well as big;
* silently ends the archive at a corrupt header after the first one.

Here the archive is decompressed by :class:`gzip.GzipFile` in bounded reads, the decompressed
stream is capped, and a ``TarInfo`` subclass (``TarFile(tarinfo=...)``; ``_proc_member`` is the
hook tarfile's own source names for subclasses) checks every header *before* tarfile processes
it: extension headers over :data:`MAX_HEADER_BYTES`, longer chains than
:data:`MAX_HEADER_CHAIN`, more extension data than :data:`MAX_HEADERS_TOTAL` in one archive,
sparse files, negative sizes and corrupt or truncated headers are all refused with
:class:`~cloud_sync.errors.UnsafeArchiveError`. It must not write anything: names, types and
sizes of the members it yields are checked by the caller.
"""

from __future__ import annotations

import contextlib
import gzip
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from cloud_sync.errors import UnsafeArchiveError

GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
#: One PAX extended header's or GNU long name's data. Real ones hold a path and a few numbers.
MAX_HEADER_BYTES = 64 << 10
#: Extension headers in a row before the member they describe (GNU tar writes at most 3).
MAX_HEADER_CHAIN = 8
#: All extension header data in one archive, global headers included.
MAX_HEADERS_TOTAL = 1 << 20
#: Per member, what the stream may hold besides the member's data: its header, padding and
#: its extension headers' own header blocks and padding (their data counts in MAX_HEADERS_TOTAL).
MEMBER_OVERHEAD = (MAX_HEADER_CHAIN + 1) * 2 * tarfile.BLOCKSIZE

_EXTENSIONS = {
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
}


# Not in typeshed, but part of tarfile since Python 3.2.
_TruncatedHeaderError: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]
_InvalidHeaderError: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]


def stream_cap(max_total_bytes: int, max_members: int) -> int:
    """The most decompressed bytes an archive within these caps can need to be read."""
    return max_total_bytes + (max_members + 2) * MEMBER_OVERHEAD + MAX_HEADERS_TOTAL + tarfile.RECORDSIZE


class _Guard:
    """Per-archive header accounting (one per opened archive)."""

    def __init__(self) -> None:
        self.chain = 0
        self.extension_bytes = 0

    def check(self, info: tarfile.TarInfo) -> None:
        where = info.name or f"header at byte {info.offset}"
        if info.size < 0:
            raise UnsafeArchiveError(f"negative size {info.size} in the header", field=where)
        kind = _EXTENSIONS.get(info.type)
        if kind is None:
            self.chain = 0
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise UnsafeArchiveError("sparse file refused", field=where)
            return
        self.chain += 1
        if self.chain > MAX_HEADER_CHAIN:
            raise UnsafeArchiveError(f"more than {MAX_HEADER_CHAIN} extension headers in a row", field=where)
        if info.size > MAX_HEADER_BYTES:
            raise UnsafeArchiveError(f"{kind} of {info.size} bytes is over the {MAX_HEADER_BYTES} byte cap",
                                     field=where)
        self.extension_bytes += info.size
        if self.extension_bytes > MAX_HEADERS_TOTAL:
            raise UnsafeArchiveError(f"extension headers pass the {MAX_HEADERS_TOTAL} byte cap for one archive",
                                     field=where)


def _no_sparse(*_args: Any) -> None:
    raise UnsafeArchiveError("sparse file refused (GNU sparse PAX header)")


class _GuardedTarInfo(tarfile.TarInfo):
    """Checks each header before tarfile reads the data it announces."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _GuardedTarInfo:
        try:
            return super().frombuf(buf, encoding, errors)
        except _TruncatedHeaderError:
            raise UnsafeArchiveError("truncated archive: a header is cut short") from None
        except _InvalidHeaderError as exc:  # tarfile would end the archive here without a word
            raise UnsafeArchiveError(f"corrupt archive: {exc}") from None

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        guard: _Guard = tar._edge_guard  # type: ignore[attr-defined]
        guard.check(self)
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        if member.size < 0:  # a PAX "size" record can say anything
            raise UnsafeArchiveError(f"negative size {member.size}", field=member.name)
        return member

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        raise UnsafeArchiveError("sparse file refused", field=self.name)

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = staticmethod(_no_sparse)


class _GuardedTarFile(tarfile.TarFile):
    tarinfo = _GuardedTarInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._edge_guard = _Guard()  # before super(): stream mode reads the first header in __init__
        super().__init__(*args, **kwargs)


class _Capped:
    """A read-only stream that refuses to give more than ``cap`` bytes in all."""

    def __init__(self, inner: IO[bytes], cap: int) -> None:
        self._inner = inner
        self.cap = cap
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.cap + 1 - self.count
        data = self._inner.read(min(size, self.cap + 1 - self.count))
        self.count += len(data)
        if self.count > self.cap:
            raise UnsafeArchiveError(f"the decompressed archive is over the {self.cap} byte cap")
        return data

    def close(self) -> None:
        self._inner.close()


@contextlib.contextmanager
def open_tar(path: Path, *, max_stream_bytes: int) -> Iterator[tarfile.TarFile]:
    """Open ``path`` (tar or gzip-compressed tar) for one streaming pass over its members.

    Errors of the archive's format raised anywhere inside the ``with`` block, while tarfile
    parses or while a member's data is read, come out as :class:`UnsafeArchiveError`; other
    ``OSError`` (the disk) pass unchanged.

    Raises:
        UnsafeArchiveError: not a tar or gzip stream, corrupt, truncated, a refused header,
            or more than ``max_stream_bytes`` decompressed bytes.
    """
    with path.open("rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        for magic, kind in _OTHER_COMPRESSION:
            if head.startswith(magic):
                raise UnsafeArchiveError(f"{kind}-compressed archive: bundles are gzip-compressed or plain tar")
        compressed = head[:2] == GZIP_MAGIC
        inner: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        stream = _Capped(inner, max_stream_bytes)
        try:
            with _GuardedTarFile.open(fileobj=cast(IO[bytes], stream), mode="r|") as tar:
                yield tar
        except RecursionError:  # defence in depth: the chain cap stops tarfile's recursion first
            raise UnsafeArchiveError("corrupt archive: headers nested too deeply") from None
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(f"corrupt archive: {exc}") from None
        except EOFError as exc:
            raise UnsafeArchiveError(f"truncated archive: {exc}") from None
        except (zlib.error, gzip.BadGzipFile) as exc:
            raise UnsafeArchiveError(f"corrupt gzip stream: {exc}") from None
