"""A bounded, read-only view of a directory tree as if it were ``/`` (the hardware root).

Detection reads copies of ``/proc``, ``/sys`` and ``/dev`` made on other devices, and the real
ones on this device; either may hold anything. Every access here is therefore bounded:

- paths are resolved component by component with chroot semantics: an absolute symlink target
  and ``..`` above the root stay inside the root (a copied tree's ``/dev/zero`` link points at the
  tree's ``dev/zero``, never the host's), and more than :data:`MAX_HOPS` links is a loop;
- only regular files are opened (a FIFO, socket or device node where a file is expected is
  skipped without being opened), with ``O_NOFOLLOW | O_NONBLOCK``, and read up to a size limit;
- directory listings stop after a number of entries;
- every operation checks one deadline for the whole detection (``budget_s``); once it has
  passed, everything reads as absent and a note says so.

What it cannot bound: a single ``read()`` that the kernel itself blocks in (a hung network or
FUSE file system). Nothing in ``/proc`` or ``/sys`` does that.

Anything odd becomes a note (see :attr:`Tree.notes`), never an exception.
"""

# Component-by-component lstat/readlink and O_NOFOLLOW opens need the os-level calls, not pathlib.
# ruff: noqa: PTH100, PTH115, PTH116, PTH118, PTH119

from __future__ import annotations

import os
import stat
import time
from collections import deque
from collections.abc import Callable
from fnmatch import fnmatchcase

MAX_HOPS = 40  # like the kernel's MAXSYMLINKS
SMALL = 4096  # a sysfs attribute or a device-tree string
_CHUNK = 1 << 16
_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a terminal: control and format characters escaped, at most ``limit`` chars."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in "\t\n\r":
            out.append(" ")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    result = "".join(out)
    return result if len(result) <= limit else result[: limit - 1] + "…"


class Tree:
    """Read files below ``root`` with chroot semantics, bounded in size, entries and time."""

    def __init__(self, root: str, *, budget_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = os.path.abspath(root)
        self.budget_s = budget_s
        self._clock = clock
        self._deadline = clock() + budget_s
        self.notes: list[str] = []
        self.exhausted = False

    # -- bookkeeping -------------------------------------------------------------------------
    def note(self, message: str) -> None:
        """Record an anomaly once (shown by ``edge-agent detect``)."""
        if message not in self.notes and len(self.notes) < 50:
            self.notes.append(message)

    def _expired(self) -> bool:
        if not self.exhausted and self._clock() > self._deadline:
            self.exhausted = True
            self.note(f"detection stopped after its {self.budget_s:g} s budget: facts not read by then are absent")
        return self.exhausted

    @staticmethod
    def host(rel: str) -> str:
        """The path as seen on the device (``/dev/apex_0``), printable."""
        return printable("/" + rel.strip("/"))

    # -- resolution --------------------------------------------------------------------------
    def resolve(self, rel: str) -> tuple[str, os.stat_result] | None:
        """Real path below the root and its ``lstat``, following links inside the root; None if absent."""
        pending = deque(p for p in rel.split("/") if p not in ("", "."))
        stack: list[str] = []
        hops = 0
        st = None
        while pending:
            if self._expired():
                return None
            name = pending.popleft()
            if name == "..":
                if stack:
                    stack.pop()
                continue
            path = os.path.join(self.root, *stack, name)
            try:
                st = os.lstat(path)
            except (OSError, ValueError):
                return None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_HOPS:
                    self.note(f"{self.host(rel)}: more than {MAX_HOPS} symbolic links (a loop?): ignored")
                    return None
                try:
                    target = os.readlink(path)
                except OSError:
                    return None
                if target.startswith("/"):
                    stack = []  # absolute: relative to the root being described, not this host
                pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            if pending and not stat.S_ISDIR(st.st_mode):
                return None
            stack.append(name)
        if st is None:  # the root itself
            try:
                st = os.stat(self.root)
            except OSError:
                return None
        return os.path.join(self.root, *stack), st

    def kind(self, rel: str) -> str | None:
        """``file``, ``dir``, ``char device``, ``fifo``, ... or None if absent."""
        found = self.resolve(rel)
        return None if found is None else _KINDS.get(stat.S_IFMT(found[1].st_mode), "other")

    def exists(self, rel: str) -> bool:
        return self.resolve(rel) is not None

    def is_node(self, rel: str) -> bool:
        """A device node, or a regular file standing for one in a copied tree (never a FIFO or a dir)."""
        return self.kind(rel) in ("char device", "file")

    def link_name(self, rel: str) -> str | None:
        """Base name of where ``rel`` leads (``device/driver`` -> ``intel_vpu``), if it exists."""
        found = self.resolve(rel)
        return None if found is None else os.path.basename(found[0])

    # -- reading -----------------------------------------------------------------------------
    def read_bytes(self, rel: str, limit: int = SMALL, *, head: bool = False) -> bytes | None:
        """Up to ``limit`` bytes of a regular file; None if absent, not a regular file or unreadable.

        A longer file is noted as truncated, unless ``head`` (only its first bytes were wanted).
        """
        found = self.resolve(rel)
        if found is None:
            return None
        path, st = found
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                self.note(f"{self.host(rel)}: skipped, a {_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')} "
                          "where a regular file was expected")
            return None
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            return None
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                return None  # swapped between lstat and open
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                if self._expired():
                    return None
                chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError:
            return None
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > limit:
            if not head:
                self.note(f"{self.host(rel)}: larger than {limit} bytes, only the first {limit} read")
            data = data[:limit]
        return data

    def read_text(self, rel: str, limit: int = SMALL) -> str | None:
        """The file as text (undecodable bytes replaced), stripped; None if absent or empty."""
        data = self.read_bytes(rel, limit)
        if data is None:
            return None
        return data.decode("utf-8", errors="replace").strip() or None

    # -- listing -----------------------------------------------------------------------------
    def listdir(self, rel: str, limit: int = 1024) -> list[str]:
        """Sorted entry names of a directory (at most ``limit`` of them); [] if absent."""
        found = self.resolve(rel)
        if found is None or not stat.S_ISDIR(found[1].st_mode):
            return []
        names: list[str] = []
        try:
            with os.scandir(found[0]) as entries:
                for entry in entries:
                    if len(names) >= limit:
                        self.note(f"{self.host(rel)}: more than {limit} entries, only {limit} looked at")
                        break
                    if self._expired():
                        break
                    names.append(entry.name)
        except OSError:
            return []
        return sorted(names)

    def glob(self, pattern: str, limit: int = 1024) -> list[str]:
        """Relative paths matching ``pattern`` (``fnmatch`` wildcards in any component), sorted."""
        matches = [""]
        for part in (p for p in pattern.split("/") if p):
            if not any(c in part for c in "*?["):
                matches = [f"{m}/{part}" if m else part for m in matches]
                continue
            expanded = []
            for base in matches:
                expanded += [f"{base}/{n}" if base else n for n in self.listdir(base, limit) if fnmatchcase(n, part)]
            matches = expanded[:limit]
        return sorted(m for m in matches if m and self.exists(m))
