"""Malformed and hostile bundle archives: the archive reader's fuzz cases, and a runner for them.

Each case writes one archive to a file, streaming (a 512 MiB PAX header costs 0.5 MB of disk
and no memory here), then :func:`run` hands it to ``extract_bundle`` as the deployer does and
classifies the outcome. An archive must be refused with a specific ``BundleError`` code
(``unsafe_archive`` or ``bad_manifest``) leaving no staging directory, or be extracted with
only regular files and directories inside the staging directory; anything else (another
exception, a message over the cap, something outside staging) is a failure.

The cases: the valid bundle (tar and gzip); truncations and bit flips of it; path traversal,
links, devices and other member types; huge and hostile names; PAX and GNU header abuse
(oversized headers, chains, sparse maps, bad sizes and records); gzip bombs; nested tars;
manifest and ``.npy`` test-vector abuse; and random archives from a small grammar of all of
those. Seeded: the same seed gives the same archives.

``python -m tests.hostile_archives [--seed N] [--json]`` runs them in a fresh process and
prints the figures: cases, outcomes, failures, peak RSS growth and the slowest case.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import random
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.bundles.archive import ExtractLimits, extract_bundle, write_archive
from cloud_sync.bundles.manifest import Manifest
from cloud_sync.errors import MAX_FIELD_CHARS, MAX_MESSAGE_CHARS, BundleError

BLOCK = tarfile.BLOCKSIZE
MiB = 1 << 20
LIMITS = ExtractLimits(max_member_bytes=1 * MiB, max_total_bytes=4 * MiB, max_members=32)
CODES = {"unsafe_archive", "bad_manifest"}

# -- writing archives byte by byte -------------------------------------------------------------------


@dataclass(frozen=True)
class Repeat:
    """``chunk`` ``count`` times: a huge part that is never held in memory whole."""

    chunk: bytes
    count: int


Part = bytes | Repeat


def header(name: str | bytes, size: int = 0, kind: bytes = tarfile.REGTYPE, *, linkname: str | bytes = b"",
           prefix: bytes = b"", mode: int = 0o644, size_field: bytes | None = None,
           checksum: bool = True) -> bytes:
    """A ustar header block with exactly these fields (no splitting, no validation)."""
    raw_name = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    raw_link = linkname.encode("utf-8", "surrogateescape") if isinstance(linkname, str) else linkname
    buf = bytearray(BLOCK)
    buf[0:100] = raw_name[:100].ljust(100, b"\0")
    buf[100:108] = b"%07o\0" % mode
    buf[108:116] = b"%07o\0" % 0
    buf[116:124] = b"%07o\0" % 0
    buf[124:136] = size_field if size_field is not None else bytes(tarfile.itn(size, 12, tarfile.GNU_FORMAT))
    buf[136:148] = b"%011o\0" % 0
    buf[148:156] = b" " * 8
    buf[156:157] = kind
    buf[157:257] = raw_link[:100].ljust(100, b"\0")
    buf[257:265] = b"ustar\x0000"
    buf[345:500] = prefix[:155].ljust(155, b"\0")
    if checksum:
        buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


def member(name: str | bytes, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **kw: Any) -> bytes:
    return header(name, len(data), kind, **kw) + data + pad(len(data))


def pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    return member("././@PaxHeader", records, kind)


def longname(name: bytes, kind: bytes = tarfile.GNUTYPE_LONGNAME) -> bytes:
    data = name + b"\0"
    return member("././@LongLink", data, kind)


END = b"\0" * (2 * BLOCK)


def write(path: Path, parts: Iterable[Part], *, compress: str | None = "gz", one_member: bool = False) -> Path:
    """Write ``parts`` (plain tar bytes) to ``path``, gzip-compressed unless ``compress`` is None.

    Compressed, a ``Repeat`` is its chunk compressed once and written ``count`` times as gzip
    members of their own (a gzip stream may hold several; it inflates to the concatenation), so a
    512 MiB part costs 0.5 MB and no time to write. ``one_member`` writes a single gzip member
    instead, as ``gzip`` and ``bundle build`` do (slower: ~4 s for 512 MiB).
    """
    with path.open("wb") as raw:
        if compress == "gz" and one_member:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as out:
                for part in parts:
                    for _ in range(part.count if isinstance(part, Repeat) else 1):
                        out.write(part.chunk if isinstance(part, Repeat) else part)
            return path
        if compress != "gz":
            for part in parts:
                if isinstance(part, Repeat):
                    for _ in range(part.count):
                        raw.write(part.chunk)
                else:
                    raw.write(part)
            return path
        pending = bytearray()
        for part in parts:
            if isinstance(part, Repeat):
                raw.write(gzip.compress(bytes(pending), compresslevel=9, mtime=0))
                pending.clear()
                member_bytes = gzip.compress(part.chunk, compresslevel=9, mtime=0)
                for _ in range(part.count):
                    raw.write(member_bytes)
            else:
                pending += part
        raw.write(gzip.compress(bytes(pending), compresslevel=9, mtime=0))
    return path


# -- the valid bundle the mutations start from -------------------------------------------------------

MANIFEST = {"schema_version": 1, "name": "fuzz", "version": 1, "runtime": "onnx", "model": "model.onnx",
            "labels": "labels.txt", "files": ["labels.txt", "vectors/x.npy"],
            "test_vectors": [{"inputs": {"x": {"dtype": "float32", "shape": [1, 4], "file": "vectors/x.npy"}},
                              "expected": {"y": {"dtype": "float32", "shape": [1, 1], "data": [0.5]}}}]}


def npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def valid_members(manifest: dict[str, Any] | None = None, x: bytes | None = None) -> list[bytes]:
    data = json.dumps(manifest or MANIFEST).encode()
    return [member("manifest.json", data), member("labels.txt", b"speech\nsilence\n"),
            member("model.onnx", b"onnx-bytes" * 50),
            member("vectors/x.npy", x if x is not None else npy(np.zeros((1, 4), np.float32)))]


def valid_tar(base: Path) -> bytes:
    """The valid bundle as ``bundle build`` writes it (PAX format, reproducible), uncompressed."""
    src = base / "src"
    (src / "vectors").mkdir(parents=True, exist_ok=True)
    (src / "labels.txt").write_bytes(b"speech\nsilence\n")
    (src / "model.onnx").write_bytes(b"onnx-bytes" * 50)
    np.save(src / "vectors" / "x.npy", np.zeros((1, 4), np.float32))
    files = {"labels.txt": src / "labels.txt", "model.onnx": src / "model.onnx",
             "vectors/x.npy": src / "vectors" / "x.npy"}
    out = write_archive(base / "valid.bundle", Manifest.from_dict(MANIFEST), files, compress=False)
    return out.read_bytes()


# -- the cases -------------------------------------------------------------------------------------------

Writer = Callable[[Path], Path]


def _parts(*parts: Part, compress: str | None = "gz") -> Writer:
    return lambda path: write(path, parts, compress=compress)


def _bytes(data: bytes) -> Writer:
    def writer(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return writer


def _with(*extra: Part, manifest: dict[str, Any] | None = None, x: bytes | None = None, end: bool = True) -> Writer:
    """The valid members, then ``extra``."""
    return _parts(*valid_members(manifest, x), *extra, *([END] if end else []))


def structural_cases() -> Iterator[tuple[str, Writer]]:
    m = valid_members()
    # Paths out of the staging directory, and names the file system cannot take.
    for name in ("../evil", "a/../../evil", "/etc/evil", "C:/evil", "a\\..\\evil", "./../evil", "a/./../../b",
                 "..", "./", "", "vectors/../../x", "//etc/passwd"):
        yield f"traversal:{name!r}", _with(member(name, b"x"))
    deep = "a/" * 40 + "../" * 41 + "x"  # within the name cap, one level above the bundle
    yield "traversal:deep-then-up", _with(pax(pax_record("path", deep.encode())), member("p", b"x"))
    yield "name:300-chars", _with(pax(pax_record("path", b"n" * 300)), member("placeholder", b"x"))
    yield "name:255-chars", _with(pax(pax_record("path", b"n" * 255)), member("placeholder", b"x"))
    yield "name:4096-chars", _with(pax(pax_record("path", b"d/" * 2048)), member("placeholder", b"x"))
    yield "name:255-cjk-chars", _with(pax(pax_record("path", ("名" * 255).encode())), member("placeholder", b"x"))
    yield "name:300-char-component", _with(pax(pax_record("path", b"d/" + b"n" * 300)), member("p", b"x"))
    yield "name:control-chars", _with(member("evil\nname\x1b[31m", b"x"))
    yield "name:nul-in-pax-path", _with(pax(pax_record("path", b"a\0b")), member("p", b"x"))
    yield "name:not-utf8", _with(member(b"caf\xe9\xff", b"x"))
    yield "name:gnu-longname-60KiB", _with(longname(b"n" * 60_000), member("p", b"x"))
    yield "name:gnu-longname-64MiB", _parts(*m, header("././@LongLink", 64 * MiB + 1, tarfile.GNUTYPE_LONGNAME),
                                            Repeat(b"n" * MiB, 64), b"\0", pad(64 * MiB + 1), member("p", b"x"), END)
    yield "name:prefix-field-escape", _with(member("evil", b"x", prefix=b"../.."))
    # Links, devices and other member types.
    for kind, label in ((tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink")):
        for target in ("/etc/passwd", "../outside", "model.onnx", "l" * 60_000):
            if len(target) > 100:
                yield f"{label}:60KiB-target", _with(longname(target.encode(), tarfile.GNUTYPE_LONGLINK),
                                                     member("link", kind=kind))
            else:
                yield f"{label}:{target}", _with(member("link", kind=kind, linkname=target))
    yield "symlink-then-write-through", _with(member("d", kind=tarfile.SYMTYPE, linkname="/tmp"),
                                              member("d/evil", b"x"))
    for kind, label in ((tarfile.CHRTYPE, "chardev"), (tarfile.BLKTYPE, "blockdev"), (tarfile.FIFOTYPE, "fifo"),
                        (tarfile.CONTTYPE, "contiguous"), (b"D", "gnu-dumpdir"), (b"V", "volume-label"),
                        (b"M", "multivolume"), (b"Z", "unknown-type"), (b"N", "old-gnu-names")):
        yield f"type:{label}", _with(member("special", b"data" if label != "chardev" else b"", kind))
    yield "type:dir-with-data", _with(member("dir", b"x" * 1000, tarfile.DIRTYPE))
    yield "dup:file-twice", _with(member("labels.txt", b"again"))
    yield "dup:file-then-dir", _with(member("labels.txt", kind=tarfile.DIRTYPE))
    yield "dup:dir-then-file", _with(member("d", kind=tarfile.DIRTYPE), member("d", b"x"))
    yield "dup:file-then-child", _with(member("labels.txt/child", b"x"))
    yield "dup:manifest-as-dir", _parts(member("manifest.json", kind=tarfile.DIRTYPE), *m[1:], END)
    # PAX and GNU header abuse.
    yield "pax:512MiB-extended-header", _parts(header("././@PaxHeader", 512 * MiB, tarfile.XHDTYPE),
                                               Repeat(b"a" * MiB, 512), *m, END)
    yield "pax:global-64MiB", _parts(header("././@PaxHeader", 64 * MiB, tarfile.XGLTYPE), Repeat(b"a" * MiB, 64),
                                     *m, END)
    yield "pax:just-over-cap", _parts(pax(b"a" * (64 * 1024 + 1)), *m, END)
    yield "pax:just-under-cap", _parts(pax(pax_record("comment", b"c" * (64 * 1024 - 40))), *m, END)
    yield "pax:solaris-64MiB", _parts(header("././@PaxHeader", 64 * MiB, tarfile.SOLARIS_XHDTYPE),
                                      Repeat(b"a" * MiB, 64), *m, END)
    yield "pax:chain-9", _parts(*[pax(pax_record("comment", b"c"))] * 9, *m, END)
    yield "pax:chain-5000", _parts(*[pax(pax_record("comment", b"c"))] * 5000, *m, END)
    yield "gnu:chain-5000-longnames", _parts(*[longname(b"n" * 10)] * 5000, *m, END)
    yield "pax:many-globals", _parts(*[pax(pax_record(f"k{i}", b"v" * 60_000), tarfile.XGLTYPE)
                                       for i in range(40)], *m, END)
    yield "pax:size-negative", _with(pax(pax_record("size", b"-4096")), member("p", b"x"))
    yield "pax:size-huge", _with(pax(pax_record("size", b"9" * 40)), member("p", b"x"))
    yield "pax:size-not-a-number", _with(pax(pax_record("size", b"lots")), member("p", b"x"))
    yield "pax:size-bigger-than-data", _with(pax(pax_record("size", b"100000")), member("p", b"x"))
    yield "pax:bad-record-length", _with(pax(b"999 path=x\n"), member("p", b"x"))
    yield "pax:record-length-zero", _with(pax(b"0 path=x\n"), member("p", b"x"))
    yield "pax:no-newline", _with(pax(b"13 path=abcd"), member("p", b"x"))
    yield "pax:path-traversal", _with(pax(pax_record("path", b"../../evil")), member("p", b"x"))
    yield "pax:linkpath", _with(pax(pax_record("linkpath", b"/etc/shadow")), member("l", kind=tarfile.SYMTYPE))
    yield "pax:hdrcharset-binary", _with(pax(pax_record("hdrcharset", b"BINARY") + pax_record("path", b"\xff\xfe")),
                                         member("p", b"x"))
    for sparse in ((("GNU.sparse.size", b"100"), ("GNU.sparse.numblocks", b"1"), ("GNU.sparse.offset", b"0"),
                    ("GNU.sparse.numbytes", b"1")),
                   (("GNU.sparse.map", b"0,1," * 1000 + b"0,1"), ("GNU.sparse.size", b"100")),
                   (("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0"), ("GNU.sparse.realsize", b"10"))):
        records = b"".join(pax_record(k, v) for k, v in sparse)
        yield f"pax:sparse-{sparse[0][0]}", _with(pax(records), member("sparse", b"9999999999\n" + b"1\n" * 400))
    yield "gnu:old-sparse", _with(header("sparse", 0, tarfile.GNUTYPE_SPARSE))
    yield "size:base256-negative", _with(header("neg", size_field=bytes(tarfile.itn(-1024, 12, tarfile.GNU_FORMAT))))
    yield "size:base256-huge", _with(header("huge", size_field=bytes(tarfile.itn(2 ** 80, 12, tarfile.GNU_FORMAT))))
    yield "size:garbage-field", _with(header("g", size_field=b"zzzzzzzzzzz\0"))
    yield "size:longname-negative", _with(header("././@LongLink", -5, tarfile.GNUTYPE_LONGNAME), member("p", b"x"))
    yield "header:bad-checksum-middle", _with(header("p", 1, checksum=False) + b"x" + pad(1))
    yield "header:garbage-block-middle", _with(bytes(range(256)) * 2)
    # Bombs: compressed small, large when inflated.
    yield "gzip:member-2GiB-zeros", _parts(*m, header("zeros.bin", 2048 * MiB), Repeat(b"\0" * MiB, 16), END)
    yield "gzip:member-at-cap", _parts(*m, member("ok.bin", b"\0" * MiB), END)
    yield "gzip:total-over-cap", _parts(*m, *[member(f"z{i}.bin", b"\0" * MiB) for i in range(5)], END)
    yield "gzip:zeros-after-end-1GiB", _parts(*m, END, Repeat(b"\0" * MiB, 1024))
    yield "gzip:dir-with-1GiB-data", _parts(*m, header("d", 1024 * MiB, tarfile.DIRTYPE), Repeat(b"\0" * MiB, 8), END)
    yield "count:100k-empty-members", _parts(*m, *[member(f"e{i}") for i in range(100)], Repeat(member("e"), 100_000),
                                             END)
    yield "manifest:over-4MiB", _parts(header("manifest.json", 5 * MiB), Repeat(b" " * MiB, 5), *m[1:], END)
    # Not a tar, or not the compression we read.
    yield "stream:empty-file", _bytes(b"")
    yield "stream:random-bytes", _bytes(random.Random(7).randbytes(4096))
    yield "stream:gzip-of-random", _bytes(gzip.compress(random.Random(8).randbytes(4096)))
    yield "stream:gzip-header-only", _bytes(gzip.compress(b"")[:10])
    yield "stream:gzip-bad-crc", _bytes(_bad_crc(b"".join([*m, END])))
    yield "stream:gzip-trailing-garbage", _bytes(gzip.compress(b"".join([*m, END])) + b"garbage" * 100)
    yield "stream:gzip-two-members", _bytes(gzip.compress(b"".join(m[:2])) + gzip.compress(b"".join([*m[2:], END])))
    yield "stream:only-end-blocks", _parts(END)
    yield "stream:no-end-blocks", _parts(*m)
    yield "stream:bz2", _bytes(__import__("bz2").compress(b"".join([*m, END])))
    yield "stream:xz", _bytes(__import__("lzma").compress(b"".join([*m, END])))
    # Nested archives are files like any other: never unpacked.
    inner = gzip.compress(b"".join([member("../../escape", b"x"), member("link", kind=tarfile.SYMTYPE, linkname="/"),
                                    END]))
    yield "nested:tar.gz-with-traversal", _with(member("inner.tar.gz", inner))
    yield "nested:tar-as-manifest", _parts(member("manifest.json", b"".join([*m, END])), *m[1:], END)
    yield "nested:bundle-in-bundle", _with(member("again.bundle", gzip.compress(b"".join([*m, END]))))
    # Manifest and test-vector abuse: refused as bad_manifest.
    deep = b'{"schema_version": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    yield "manifest:nested-100000", _parts(member("manifest.json", deep), *m[1:], END)
    yield "manifest:nested-40", _with(manifest={**MANIFEST, "preprocess": {"type": "t", "v": _nest(40)}})
    yield "manifest:not-json", _parts(member("manifest.json", b"\xff\xfe{"), *m[1:], END)
    yield "manifest:json-nan", _with(manifest={**MANIFEST, "test_vectors": [{**MANIFEST["test_vectors"][0],
                                                                             "rtol": float("nan")}]})
    yield "manifest:missing", _parts(*m[1:], END)
    yield "manifest:names-missing-file", _with(manifest={**MANIFEST, "files": [*MANIFEST["files"], "nope.bin"]})
    yield "npy:wrong-shape", _with(x=npy(np.zeros((3,), np.float32)))
    yield "npy:pickled-objects", _with(x=npy(np.array([{"evil": 1}], dtype=object), allow_pickle=True))
    yield "npy:strings", _with(x=npy(np.array([["a", "b", "c", "d"]])))
    yield "npy:truncated", _with(x=npy(np.zeros((1, 4), np.float32))[:-5])
    yield "npy:garbage", _with(x=b"\x93NUMPY garbage")
    yield "npy:huge-shape-tiny-data", _with(x=npy(np.zeros((1, 4), np.float32)).replace(b"(1, 4)", b"(1, 9)"))
    yield "npy:header-eval", _with(x=b"\x93NUMPY\x01\x00\x76\x00{'descr': __import__('os').system('id'), "
                                     b"'fortran_order': False, 'shape': (1, 4), }" + b" " * 47 + b"\n")


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _bad_crc(tar: bytes) -> bytes:
    data = bytearray(gzip.compress(tar))
    data[-8] ^= 0xFF
    return bytes(data)


def mutation_cases(base: Path, rng: random.Random) -> Iterator[tuple[str, Writer]]:
    """Truncations and bit flips of the valid bundle, compressed and plain."""
    tar = valid_tar(base)
    gz = gzip.compress(tar, mtime=0)
    yield "valid:tar", _bytes(tar)
    yield "valid:gz", _bytes(gz)
    for label, data, count in (("tar", tar, 24), ("gz", gz, 24)):
        for off in sorted(rng.sample(range(1, len(data)), count)):
            yield f"truncate:{label}@{off}", _bytes(data[:off])
    for label, data, count in (("tar", tar, 40), ("gz", gz, 24)):
        for _ in range(count):
            flipped = bytearray(data)
            # Half the flips land in header blocks, where tarfile makes its decisions.
            headers = [i for i in range(0, len(data), BLOCK) if data[i] != 0]
            pos = rng.choice(headers) + rng.randrange(BLOCK) if rng.random() < 0.5 else rng.randrange(len(data))
            pos = min(pos, len(data) - 1)
            flipped[pos] ^= 1 << rng.randrange(8)
            yield f"bitflip:{label}@{pos}", _bytes(bytes(flipped))


def random_cases(rng: random.Random, count: int) -> Iterator[tuple[str, Writer]]:
    """Archives from a small grammar: valid members mixed with hostile ones, in random order."""
    names = ["a", "b/c", "../x", "/abs", "a/../../y", "n" * 120, "d" * 300, "ok.txt", "labels.txt", "é/ü", "x\ny",
             "manifest.json", "vectors/x.npy", "./z", "a\\b"]
    kinds = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
             tarfile.CHRTYPE, tarfile.FIFOTYPE, b"Z"]
    for i in range(count):
        parts: list[Part] = list(valid_members()) if rng.random() < 0.7 else []
        for _ in range(rng.randrange(1, 8)):
            roll = rng.random()
            name = rng.choice(names)
            if roll < 0.1:
                parts.append(pax(pax_record("path", name.encode()) + pax_record("comment", b"c" * rng.randrange(200))))
                parts.append(member("placeholder", b"p"))
            elif roll < 0.15:
                parts.append(longname(name.encode() * rng.randrange(1, 400)))
                parts.append(member("p", b"x"))
            elif roll < 0.2:
                parts.append(header("././@PaxHeader", rng.choice([70_000, 10 * MiB, 2 ** 33]), tarfile.XHDTYPE))
            elif roll < 0.25:
                parts.append(header("big", rng.choice([2 * MiB, 2 ** 40, -1])))
            else:
                data = rng.randbytes(rng.randrange(0, 2000))
                kind = rng.choice(kinds)
                parts.append(member(name, data if kind == tarfile.REGTYPE else b"", kind, linkname=rng.choice(names)))
        rng.shuffle(parts)
        if rng.random() < 0.8:
            parts.append(END)
        yield f"random:{i}", _parts(*parts, compress="gz" if rng.random() < 0.7 else None)


def all_cases(base: Path, seed: int = 12) -> list[tuple[str, Writer]]:
    rng = random.Random(seed)
    return [*mutation_cases(base, rng), *structural_cases(), *random_cases(rng, 80)]


# -- running them ------------------------------------------------------------------------------------------


@dataclass
class Report:
    """``rss_before``: RSS after the warm-up; ``peak_growth``: the most the peak RSS rose over the RSS
    just before one extraction (writing the case is not counted), and which case that was."""

    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    rss_before_kib: int = 0
    peak_growth_kib: int = 0
    peak_case: str = ""
    seconds: float = 0.0
    slowest: tuple[str, float] = ("", 0.0)

    @property
    def peak_growth_mib(self) -> float:
        return self.peak_growth_kib / 1024

    def to_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "outcomes": dict(self.outcomes), "failures": self.failures,
                "rss_before_mib": round(self.rss_before_kib / 1024, 1),
                "peak_growth_mib": round(self.peak_growth_mib, 1), "peak_case": self.peak_case,
                "seconds": round(self.seconds, 1), "slowest": [self.slowest[0], round(self.slowest[1], 2)]}


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Start measuring the peak here; return the RSS now (KiB).

    VmHWM, reset through ``clear_refs``: ``ru_maxrss`` survives ``exec`` on Linux, so a child of a
    big pytest process would start from its parent's peak and hide its own growth.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _peak_rss() -> int:
    return _status_kib("VmHWM") or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def check_one(case_id: str, archive: Path, staging: Path) -> str:
    """Extract ``archive``; return the outcome (``extracted`` or ``refused:<code>``) or raise AssertionError."""
    try:
        extract_bundle(archive, staging, LIMITS)
    except BundleError as exc:
        assert exc.code in CODES, f"{case_id}: refused with code {exc.code}: {exc}"
        assert len(str(exc)) <= MAX_MESSAGE_CHARS, f"{case_id}: message of {len(str(exc))} characters"
        assert exc.field is None or len(exc.field) <= MAX_FIELD_CHARS, f"{case_id}: field of {len(exc.field)}"
        assert not staging.exists(), f"{case_id}: refused but {staging} is left behind"
        return f"refused:{exc.code}"
    except Exception as exc:
        raise AssertionError(f"{case_id}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    root = staging.resolve()
    total = 0
    for path in staging.rglob("*"):
        assert not path.is_symlink(), f"{case_id}: symlink {path} extracted"
        assert path.resolve().is_relative_to(root), f"{case_id}: {path} outside staging"
        assert path.is_dir() or path.is_file(), f"{case_id}: special file {path}"
        if path.is_file():
            size = path.stat().st_size
            assert size <= LIMITS.max_member_bytes, f"{case_id}: {path} has {size} bytes"
            total += size
    assert total <= LIMITS.max_total_bytes, f"{case_id}: {total} bytes extracted"
    shutil.rmtree(staging)
    return "extracted"


def run(workdir: Path, seed: int = 12, *, progress: Callable[[str], None] | None = None) -> Report:
    """Write and extract every case under ``workdir``; the report's peak RSS covers this call only."""
    report = Report()
    workdir.mkdir(parents=True, exist_ok=True)
    cases = all_cases(workdir / "base", seed)
    check_one("warm-up", cases[1][1](workdir / "warm.bundle"), workdir / "warm")  # imports and first-use costs
    report.rss_before_kib = _reset_peak_rss()
    started = time.monotonic()
    for i, (case_id, writer) in enumerate(cases):
        archive = writer(workdir / f"case-{i}.bundle")
        rss = _reset_peak_rss()
        t0 = time.monotonic()
        try:
            report.outcomes[check_one(case_id, archive, workdir / f"staging-{i}")] += 1
        except AssertionError as exc:
            report.failures.append(str(exc))
            shutil.rmtree(workdir / f"staging-{i}", ignore_errors=True)
        took = time.monotonic() - t0
        if _peak_rss() - rss > report.peak_growth_kib:
            report.peak_growth_kib, report.peak_case = _peak_rss() - rss, case_id
        if took > report.slowest[1]:
            report.slowest = (case_id, took)
        archive.unlink()
        report.cases += 1
        if progress:
            progress(case_id)
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # no per-case info lines
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.workdir or Path(tmp), args.seed)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        data = report.to_dict()
        print(f"archive fuzz (seed {args.seed}, Python {sys.version.split()[0]}): {data['cases']} cases in "
              f"{data['seconds']} s, {len(report.failures)} failures")
        for outcome, n in sorted(report.outcomes.items()):
            print(f"  {outcome:24s} {n}")
        print(f"  RSS {data['rss_before_mib']} MiB after warm-up; peak RSS growth during one extraction at most "
              f"{data['peak_growth_mib']} MiB ({data['peak_case']}); slowest case {data['slowest'][0]} "
              f"{data['slowest'][1]} s")
        for failure in report.failures:
            print(f"  FAIL {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
