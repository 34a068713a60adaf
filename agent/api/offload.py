"""Large JSON off the event loop: request bodies decoded in a helper process, answers encoded in
slices.

Why a process and not a thread: decoding holds the interpreter lock for the whole call
(orjson builds millions of Python floats, numpy converts the lists): a 25 MB body held it for
~0.8 s here, and the event loop needs that lock to answer anyone, even ``/v2/health/live``. The
helper process (one, started on the first large body, ``forkserver``: never a fork of this
threaded process) decodes the body and turns every list of numbers into a numpy array, which
comes back pickled (a copy, a few ms for tens of MB). The body goes to it through a private
file in ``/dev/shm``, written a MiB at a time (the lock is free while the kernel copies),
removed once decoded. What stays here (the request's checks)
sees arrays where it saw lists, with the same numpy kinds, so its answers are the same.

Limits: one body at a time in the helper (others wait their turn, and the HTTP server's body
budget bounds what waits); a decode that takes longer than ``timeout`` is an overload (503)
and restarts the helper; a helper that dies (killed, out of memory) is restarted for the next
body and the request fails with 503 ``overloaded``.

Encoding answers needs no process: orjson encodes numpy arrays in C without Python objects, so
a large array is encoded in slices of ``SLICE`` values, the lock free between them
(``fragments``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

from agent.errors import OverloadedError, RequestError

log = structlog.get_logger(__name__)

#: Values per slice when encoding a large array (about 1 ms of orjson here).
SLICE = 65_536


class Unconvertible:
    """A list the helper could not make into an array (ragged): the checks report it as such."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _arrays(value: Any) -> Any:
    """``value`` with every nested or long list of numbers (or booleans) as a numpy array: tensors.
    Short flat lists (shapes: at most 32 dimensions) stay lists."""
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return [_arrays(v) for v in value]
        if len(value) <= 32 and not (value and isinstance(value[0], list)):
            return value
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            return Unconvertible(str(exc))
        if array.dtype.kind in "biuf":
            return array
        return value  # strings, nulls, objects: left for the checks to name
    return value


def _decode(body: bytes | bytearray) -> tuple[bool, Any]:
    """In the helper: (True, the decoded value with arrays) or (False, what is wrong with the JSON)."""
    try:
        return True, _arrays(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        return False, f"malformed JSON: {exc}"


def _decode_file(path: str) -> tuple[bool, Any]:
    """In the helper: ``_decode`` of the file at ``path`` (written by ``_spill``)."""
    return _decode(Path(path).read_bytes())


#: Where bodies are handed to the helper: memory-backed when the system has it.
_SPILL_DIR = "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
_SPILL_CHUNK = 1024 * 1024


def _spill(body: bytes | bytearray) -> str:
    """``body`` in a new private file (mode 600), written a MiB at a time: ``os.write`` lets go of the
    interpreter lock while it copies, where pickling it for the helper would hold the lock for the
    whole copy (several ms for 25 MB)."""
    fd, path = tempfile.mkstemp(prefix="edge-agent-json-", dir=_SPILL_DIR)
    try:
        with memoryview(body) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:done + _SPILL_CHUNK])
    except BaseException:
        os.close(fd)
        Path(path).unlink()
        raise
    os.close(fd)
    return path


class JsonDecoder:
    """Decodes large JSON bodies in one helper process (``decode``); ``close`` stops it."""

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._starting = asyncio.Lock()

    async def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        """The helper, started on a thread (starting a process blocks for a second or more)."""
        async with self._starting:
            if self._pool is None:
                self._pool = await asyncio.to_thread(self._start)
        return self._pool

    @staticmethod
    def _start() -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context)
        pool.submit(_decode, b"0").result()  # the process is up, its imports done
        log.info("api.json_decoder_started")
        return pool

    async def decode(self, body: bytes | bytearray) -> Any:
        """The decoded body, lists of numbers as numpy arrays.

        Raises:
            RequestError: the body is not JSON.
            OverloadedError: the helper took longer than ``timeout`` or died (it is restarted).
        """
        loop = asyncio.get_running_loop()
        pool = await self._executor()
        path = await asyncio.to_thread(_spill, body)
        try:
            ok, value = await asyncio.wait_for(loop.run_in_executor(pool, _decode_file, path), self.timeout)
        except asyncio.TimeoutError:
            self._restart(pool, "timeout")
            raise OverloadedError(f"decoding a {len(body)}-byte JSON body took over {self.timeout:g} s") from None
        except concurrent.futures.process.BrokenProcessPool:
            self._restart(pool, "died")
            raise OverloadedError("the JSON decoder process died: retry") from None
        finally:
            Path(path).unlink(missing_ok=True)
        if not ok:
            raise RequestError(value)
        return value

    def _restart(self, pool: concurrent.futures.ProcessPoolExecutor, reason: str) -> None:
        log.warning("api.json_decoder_restarted", reason=reason)
        if self._pool is pool:
            self._pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):  # a stuck decode never ends by itself
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _encode_array(array: np.ndarray) -> bytes:
    """orjson's encoding of ``array`` (nested lists), made slice by slice along its first axis."""
    if array.size <= SLICE or array.ndim == 0:
        return orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)
    row = array.size // array.shape[0]
    if row > SLICE:  # rows too large themselves: each row in slices
        parts = [_encode_array(array[i]) for i in range(array.shape[0])]
    else:
        step = max(1, SLICE // max(row, 1))
        parts = [orjson.dumps(array[i:i + step], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
                 for i in range(0, array.shape[0], step)]
    return b"[" + b",".join(parts) + b"]"


def encoded(array: np.ndarray) -> Any:
    """``array``, or when it has over ``SLICE`` values its JSON made in slices (``orjson.Fragment``)."""
    if array.size > SLICE and array.flags.c_contiguous and array.dtype.isnative:
        return orjson.Fragment(_encode_array(array))
    return array


def fragments(value: Any) -> Any:
    """``value`` with each array over ``SLICE`` values already encoded (``orjson.Fragment``), in
    slices: ``orjson.dumps`` of the result is the same JSON, and never holds the lock for long."""
    if isinstance(value, np.ndarray):
        if value.size > SLICE and value.flags.c_contiguous and value.dtype.isnative:
            return orjson.Fragment(_encode_array(value))
        return value
    if isinstance(value, dict):
        return {k: fragments(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict | np.ndarray):
        return [fragments(v) for v in value]
    return value
