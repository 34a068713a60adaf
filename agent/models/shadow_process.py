"""A shadow version in its own process: it shares no GIL and no lock with the serving threads.

The agent's shadow thread (``agent.models.shadow``) hands each sample (the inputs and the serving
answer) to a child process over a pipe and gets back only the figures: the child runs the
candidate and the comparator. The parent's share of the work is a few system calls (which run
without the GIL) and a small header, so a shadow that the OS cannot schedule promptly never holds
anything the serving path waits for (``bench/shadow_thread.py`` shows what an in-process one
costs on a busy CPU).

Frames are a length-prefixed pickle header followed by the arrays' raw bytes. Both ends are this
module, started by the agent itself: the pickle never comes from outside the agent.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.errors import AgentError

_LEN = struct.Struct(">Q")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)  # without the GIL while the pipe is full
        view = view[written:]


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def frame(obj: Any, arrays: Sequence[np.ndarray] = ()) -> list[bytes | memoryview]:
    """One message's parts: the length-prefixed header, then each array's bytes (not copied)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = pickle.dumps((obj, [(a.dtype.str, a.shape) for a in arrays]), protocol=pickle.HIGHEST_PROTOCOL)
    return [_LEN.pack(len(header)) + header, *(a.data.cast("B") for a in arrays if a.nbytes)]


def send(fd: int, obj: Any, arrays: Sequence[np.ndarray] = ()) -> None:
    for part in frame(obj, arrays):
        _write_all(fd, part)


class Replies:
    """The child's replies (headers without arrays) parsed from a non-blocking pipe's reads."""

    MAX_HEADER = 16 << 20  # a reply is a few figures: anything larger means the stream is broken

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The replies completed by ``data``.

        Raises:
            AgentError: the stream is not one of replies (the child is broken).
        """
        self._buf += data
        replies = []
        while len(self._buf) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buf)
            if length > self.MAX_HEADER:
                raise AgentError(f"the shadow process sent a {length}-byte reply")
            if len(self._buf) < _LEN.size + length:
                break
            obj, layout = pickle.loads(bytes(self._buf[_LEN.size:_LEN.size + length]))  # noqa: S301 - our child
            if layout:
                raise AgentError("the shadow process sent arrays in a reply")
            del self._buf[:_LEN.size + length]
            replies.append(obj)
        return replies


def receive(fd: int) -> tuple[Any, list[np.ndarray]]:
    (length,) = _LEN.unpack(_read_exactly(fd, _LEN.size))
    obj, layout = pickle.loads(_read_exactly(fd, length))  # noqa: S301 - our own child/parent only
    arrays = []
    for dtype, shape in layout:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arrays.append(np.frombuffer(_read_exactly(fd, n), dtype=dt).reshape(shape) if n else np.zeros(shape, dt))
    return obj, arrays


class ShadowProcess:
    """The child running one candidate. ``compare`` is called from the shadow's thread only."""

    def __init__(self, init: Mapping[str, Any], *, nice: int = 10, idle_class: bool = True,
                 timeout: float = 120.0) -> None:
        """Start the child and load the candidate in it: in the SCHED_IDLE class (``idle_class``,
        Linux) or else ``nice`` steps below the agent.

        Raises:
            AgentError: the child could not start or load the model.
        """
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.models.shadow_process"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out: IO[bytes] = self.proc.stdout
        self._pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # Linux 5.3+
            self._pidfd = os.pidfd_open(self.proc.pid)
        self.scheduling = "normal"
        if idle_class and hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(self.proc.pid, os.SCHED_IDLE, os.sched_param(0))
                self.scheduling = "idle"
        if nice and self.scheduling == "normal":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
                self.scheduling = f"nice +{nice}"
        try:
            send(self._in.fileno(), dict(init))
            reply, _ = receive(self._out.fileno())
        except Exception as exc:
            self.close()
            raise AgentError(f"the shadow process did not start: {exc}") from exc
        if "error" in reply:
            self.close()
            raise AgentError(f"the shadow process could not load the model: {reply['error']}")
        self.delegate: str = reply["delegate"]

    def pause(self, paused: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) the child: it yields the CPU to serving calls.

        Through a pidfd where the kernel has them: a signal can never reach another process that
        was given the child's pid after it ended.
        """
        sig = signal.SIGSTOP if paused else signal.SIGCONT
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif self.proc.returncode is None:
                os.kill(self.proc.pid, sig)

    def message(self, feeds: Mapping[str, np.ndarray], served: Mapping[str, np.ndarray],
                meta: Mapping[str, Any] | None) -> list[bytes | memoryview]:
        """A sample's parts, for a caller that writes them itself (the event loop, non-blocking)."""
        return frame((list(feeds), list(served), dict(meta) if meta else None), [*feeds.values(), *served.values()])

    @property
    def to_child(self) -> int:
        return self._in.fileno()

    @property
    def from_child(self) -> int:
        return self._out.fileno()

    def compare(self, feeds: Mapping[str, np.ndarray], served: Mapping[str, np.ndarray],
                meta: Mapping[str, Any] | None) -> tuple[float, tuple[dict[str, float | None], float | None, int]]:
        """Run the candidate on ``feeds`` and compare with ``served``: (seconds, figures).

        Raises:
            AgentError: the candidate failed on this input, or the child is gone.
        """
        try:
            for part in self.message(feeds, served, meta):
                _write_all(self._in.fileno(), part)
            reply, _ = receive(self._out.fileno())
        except (OSError, EOFError) as exc:
            raise AgentError(f"the shadow process is gone: {exc}") from exc
        if "error" in reply:
            raise AgentError(reply["error"])
        return reply["took"], reply["figures"]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (blocking)."""
        self.pause(False)  # a paused child could not read its end of the pipe
        for stream in (self._in, self._out):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def _serve(fd_in: int, fd_out: int) -> None:
    import time

    from agent.hardware import DelegateSpec
    from agent.models.agreement import RawComparator, make_comparator
    from agent.runtimes import get_backend

    init, _ = receive(fd_in)
    try:
        delegates = [DelegateSpec(name, library, options) for name, library, options in init["delegates"]]
        session = get_backend(init["runtime"]).load(Path(init["file"]), delegates, threads=init["threads"],
                                                    options=init["options"])
        try:
            comparator = make_comparator(init["post"], init["serving_outputs"], session.outputs, init["labels"])
        except AgentError:
            comparator = RawComparator()
    except Exception as exc:  # noqa: BLE001 - reported to the agent, which fails the shadow's start
        send(fd_out, {"error": f"{type(exc).__name__}: {exc}"[:1000]})
        return
    send(fd_out, {"delegate": session.delegate})
    while True:
        try:
            (names_in, names_out, meta), arrays = receive(fd_in)
        except EOFError:
            return
        feeds = dict(zip(names_in, arrays[:len(names_in)], strict=True))
        served = dict(zip(names_out, arrays[len(names_in):], strict=True))
        started = time.perf_counter()
        try:
            outputs = session.run(feeds)
            took = time.perf_counter() - started
            comparator.add(served, outputs, meta)
        except Exception as exc:  # noqa: BLE001 - a failed sample is a figure
            send(fd_out, {"error": f"{type(exc).__name__}: {exc}"[:1000]})
            continue
        send(fd_out, {"took": took, "figures": (comparator.metrics(), comparator.agreement, comparator.samples)})


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when the agent dies, even while it is paused (SIGSTOP)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the agent died before the line above
        os._exit(1)


if __name__ == "__main__":
    _die_with_parent()
    # Frames go to the original stdout only: whatever a library prints goes to stderr instead.
    frames = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(sys.stdin.fileno(), frames)
