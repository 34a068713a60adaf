"""Triton's system shared-memory extension: regions of POSIX shared-memory objects that infer
requests read their inputs from and write their outputs into.

This module owns the registered regions and every check on them; it knows nothing of HTTP. A
region is part of ``/dev/shm/<key>`` (``shm_open``'s namespace), held open from register to
unregister. The client that made the object may unlink or shrink it at any time: the object is
checked with ``fstat`` before every use (a clear error instead), inputs are copied out before
inference, and reads and writes hold the region's lock so that an unregister cannot close the
descriptor under them (``Region`` says why the copies use ``pread``, not a memory map).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.errors import RequestError

log = structlog.get_logger(__name__)

SHM_DIR = Path("/dev/shm")
_MAX_NAME = 255
_NOT_GIVEN = object()


class SharedMemoryError(RequestError):
    """A shared-memory region that does not exist, does not fit, or was freed under us (400)."""

    code = "shared_memory"


class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` of the object named ``key``.

    Tensors are copied in and out with ``pread``/``pwrite`` on the object's descriptor, not
    through a memory map: a map turns a read past an object the client shrank into SIGBUS,
    which kills the agent whatever the checks before it (the client can shrink it between
    the check and the copy), while ``pread`` just comes back short. The copy costs what the
    copy out of a map would (the model must never read memory the client can pull away).
    """

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self.fd: int | None = fd
        self.lock = threading.Lock()  # reads and writes (a model's thread) against close (the event loop)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def _live(self) -> int:
        """The descriptor, once the object is checked to still cover the region; under ``lock``.

        Raises:
            SharedMemoryError: unregistered meanwhile, the object was unlinked or shrunk.
        """
        if self.fd is None:
            raise SharedMemoryError(f"shared memory region '{self.name}' was unregistered")
        info = os.fstat(self.fd)
        if info.st_nlink == 0:
            raise SharedMemoryError(f"shared memory region '{self.name}': its object '{self.key}' was removed "
                                    "(unlinked) after it was registered; register it again")
        if info.st_size < self.offset + self.byte_size:
            raise self._shrunk(info.st_size)
        return self.fd

    def _shrunk(self, size: int) -> SharedMemoryError:
        return SharedMemoryError(f"shared memory region '{self.name}': its object '{self.key}' shrank to {size} "
                                 f"bytes, under the registered {self.offset + self.byte_size}; register it again")

    def check_span(self, what: str, offset: int, size: int) -> None:
        """Raises SharedMemoryError when [offset, offset + size) is not inside the region."""
        if offset + size > self.byte_size:
            raise SharedMemoryError(f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} is "
                                    f"out of bounds of region '{self.name}' ({self.byte_size} bytes)")

    def read(self, offset: int, dtype: np.dtype[Any], shape: list[int] | tuple[int, ...]) -> np.ndarray:
        """A copy of the tensor at ``offset`` (checked by ``check_span``)."""
        array = np.empty(shape, dtype)
        self.read_into(offset, array)
        return array

    def read_into(self, offset: int, array: np.ndarray) -> None:
        """Fill ``array`` (C-contiguous) from ``offset`` (checked by ``check_span``); any thread."""
        view = array.reshape(-1).view(np.uint8).data
        with self.lock:
            fd = self._live()
            done, position = 0, self.offset + offset
            while done < len(view):
                got = os.preadv(fd, [view[done:]], position + done)
                if got <= 0:  # shrunk since the check
                    raise self._shrunk(os.fstat(fd).st_size)
                done += got

    def write(self, what: str, offset: int, size: int, value: np.ndarray) -> None:
        """Copy ``value`` (C-contiguous) to ``offset``; ``size`` is what the client set aside for it."""
        if value.dtype.hasobject:
            raise SharedMemoryError(f"{what}: BYTES tensors cannot be written to shared memory")
        if value.nbytes > size:
            raise SharedMemoryError(f"{what}: needs {value.nbytes} bytes but shared_memory_byte_size is {size}")
        data = value.reshape(-1).view(np.uint8).data
        with self.lock:
            fd = self._live()
            done, position = 0, self.offset + offset
            while done < len(data):  # (an object shrunk meanwhile grows back: never past the region)
                done += os.pwrite(fd, data[done:], position + done)

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class SharedMemory:
    """The registered regions, by name; every method runs on the event loop.

    ``max_regions`` and ``max_bytes`` bound what clients can register (the open descriptors keep
    an unlinked object's memory alive until it is unregistered).
    """

    def __init__(self, *, max_regions: int = 64, max_bytes: int = 1 << 30, directory: Path = SHM_DIR) -> None:
        self.max_regions, self.max_bytes, self.directory = max_regions, max_bytes, directory
        self.regions: dict[str, Region] = {}

    @property
    def registered(self) -> int:
        return sum(r.byte_size for r in self.regions.values())

    def register(self, name: str, body: Any) -> None:
        """Map the region ``body`` describes (``{"key", "offset", "byte_size"}``) as ``name``.

        Raises:
            SharedMemoryError: a field missing or of the wrong type, a duplicate name, a key that
                names no shared-memory object, a region beyond the object's end, or over the caps.
        """
        if not isinstance(body, dict):
            raise SharedMemoryError("the register body must be a JSON object with 'key', 'offset' and 'byte_size'")
        key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str):
            raise SharedMemoryError("'key' must be a string naming a shared-memory object (shm_open's name)")
        for field, value in (("offset", offset), ("byte_size", size)):
            if type(value) is not int or value < 0:
                raise SharedMemoryError(f"'{field}' must be a non-negative integer")
        assert isinstance(offset, int) and isinstance(size, int)
        if size == 0:
            raise SharedMemoryError("'byte_size' must be at least 1")
        if name in self.regions:
            raise SharedMemoryError(f"shared memory region '{name}' is already registered")
        if len(self.regions) >= self.max_regions:
            raise SharedMemoryError(f"too many shared memory regions (at most {self.max_regions}); unregister some")
        if self.registered + size > self.max_bytes:
            raise SharedMemoryError(f"registering {size} bytes would take the agent over its limit of "
                                    f"{self.max_bytes} bytes of shared memory; unregister some")
        path = self.directory / _object_name(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryError(f"no shared memory object '{key}'") from None
        except OSError as exc:
            raise SharedMemoryError(f"cannot open shared memory object '{key}': {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SharedMemoryError(f"'{key}' is not a shared memory object")
            if offset + size > info.st_size:
                raise SharedMemoryError(f"shared memory object '{key}' has {info.st_size} bytes: too small for "
                                        f"offset {offset} + byte_size {size}")
            region = Region(name, key, offset, size, fd)
        except BaseException:
            os.close(fd)
            raise
        self.regions[name] = region
        log.info("shm.registered", region=name, key=key, offset=offset, byte_size=size)

    def unregister(self, name: str | None = None) -> None:
        """Unmap ``name`` (a name not registered is no error, as in Triton), or every region."""
        names = list(self.regions) if name is None else [name] if name in self.regions else []
        for n in names:
            self.regions.pop(n).close()
            log.info("shm.unregistered", region=n)

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Raises SharedMemoryError for an unknown ``name``."""
        if name is None:
            return [r.status() for r in self.regions.values()]
        return [self.get(name).status()]

    def get(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise SharedMemoryError(f"unknown shared memory region '{name[:100]}'")
        return region

    def close(self) -> None:
        self.unregister()


def _object_name(key: str) -> str:
    """The file under /dev/shm that ``shm_open(key)`` opens (glibc drops leading slashes).

    Raises:
        SharedMemoryError: a key that names no object in that directory (empty, a path, ``..``).
    """
    name = key.lstrip("/")
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > _MAX_NAME:
        raise SharedMemoryError(f"invalid shared memory key {key[:100]!r}: expected '/name' without other slashes")
    return name


def tensor_span(params: dict[str, Any], what: str) -> tuple[str, int, int]:
    """(region, offset, byte size) from a tensor's ``shared_memory_*`` parameters.

    Raises:
        SharedMemoryError: a parameter of the wrong type.
    """
    region = params.get("shared_memory_region")
    offset = params.get("shared_memory_offset", 0)
    size = params.get("shared_memory_byte_size", _NOT_GIVEN)
    if not isinstance(region, str):
        raise SharedMemoryError(f"{what}: parameters.shared_memory_region must be a string")
    if type(offset) is not int or offset < 0:
        raise SharedMemoryError(f"{what}: parameters.shared_memory_offset must be a non-negative integer")
    if size is _NOT_GIVEN:
        raise SharedMemoryError(f"{what}: parameters.shared_memory_byte_size is required with shared_memory_region")
    if type(size) is not int or size < 0:
        raise SharedMemoryError(f"{what}: parameters.shared_memory_byte_size must be a non-negative integer")
    return region, offset, size
