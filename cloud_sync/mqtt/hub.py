"""One thread that drives many :class:`DeviceSession` objects: the fleet simulator's transport.

A real device runs its session on two threads of its own (``mqtt-net``, ``mqtt-outbox``).
A thousand simulated devices in one process would be two thousand threads, each polling,
fighting over the GIL on a small machine. The hub instead drives every paho client through
paho's external-loop API (``loop_read`` / ``loop_write`` / ``loop_misc`` with the
``on_socket_*`` callbacks) from one ``selectors`` loop, and runs each session's own sender
step (:meth:`DeviceSession.pump`) on the same thread. Connect, backoff with equal jitter and
the outbox replay are the session's own code and settings; only the scheduling differs.

paho's connect is a blocking TCP (and TLS) handshake, and a SYN dropped by a busy broker's
accept queue costs a one-second retransmit, so connects run on a few connector threads and
hand the connected socket to the hub; everything after the handshake is the hub's.

The hub owns no MQTT state and must not be used by the agent daemon. (paho's own ``loop()``
uses ``select()``, which fails once a process has more than 1024 file descriptors; the hub
uses ``selectors``, i.e. epoll.)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import itertools
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from paho.mqtt.enums import MQTTErrorCode

from cloud_sync.mqtt.session import IDLE_WAIT_S, DeviceSession, SenderState, backoff

log = structlog.get_logger(__name__)

MISC_INTERVAL_S = 1.0  # keepalive PINGREQs and PINGRESP timeouts (paho's loop_misc)
CONNECTORS = 8  # threads running blocking connects


@dataclass(eq=False)
class _Slot:
    session: DeviceSession
    sender: SenderState
    delay: float
    sock: Any = None  # the registered socket while connected
    attempt_at: float = 0.0  # wall clock of the last connect attempt
    connecting: bool = False  # a connector thread has the client
    detached: threading.Event = field(default_factory=threading.Event)
    closing_deadline: float | None = None  # monotonic; set by detach()


class SessionHub:
    """A selector thread for many sessions. ``start()`` it, pass it as ``DeviceSession(hub=...)``."""

    def __init__(self, name: str = "mqtt-hub") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._slots: dict[DeviceSession, _Slot] = {}
        self._pending: set[_Slot] = set()  # need a sender round and/or a write
        self._woken = False  # a wake-up byte is in the pipe (guarded by _lock)
        self._attach: list[_Slot] = []
        self._detach: list[_Slot] = []
        self._closing: set[_Slot] = set()  # detaching: waiting for the DISCONNECT to go out (hub thread only)
        self._connected: list[tuple[_Slot, Exception | None]] = []  # connect results from the connectors
        self._connectors = concurrent.futures.ThreadPoolExecutor(CONNECTORS, thread_name_prefix=f"{name}-connect")
        self._timers: list[tuple[float, int, str, _Slot]] = []  # (monotonic due, tiebreak, kind, slot)
        self._tiebreak = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ident: int | None = None
        self.connects = 0
        self.connect_failures = 0

    # -- public, thread-safe -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; sessions still attached are dropped without a DISCONNECT (like a crash)."""
        self._stop.set()
        self._poke()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._connectors.shutdown(wait=True, cancel_futures=True)
        for slot in list(self._slots.values()):
            self._close_socket(slot)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def sessions(self) -> int:
        return len(self._slots)

    def attach(self, session: DeviceSession) -> None:
        """Start driving ``session``: it connects at once, then reconnects with backoff."""
        client = session.client
        slot = _Slot(session, SenderState(), session.broker.backoff_min_s)
        client.on_socket_register_write = lambda _c, _u, _s: self._want(slot)
        client.on_socket_close = lambda _c, _u, _s: self._closed(slot)
        with self._lock:
            self._attach.append(slot)
        self._poke()

    def detach(self, session: DeviceSession, timeout: float = 5.0) -> None:
        """Let queued packets (the DISCONNECT) go out, then forget ``session``; waits up to ``timeout``."""
        slot = self._slots.get(session)
        if slot is None:
            with self._lock:
                slot = next((s for s in self._attach if s.session is session), None)
                if slot is not None:
                    self._attach.remove(slot)
            return
        slot.closing_deadline = time.monotonic() + timeout
        with self._lock:
            self._detach.append(slot)
        self._poke()
        slot.detached.wait(timeout + 1)

    def wake(self, session: DeviceSession) -> None:
        """``session`` has something for its sender (called by the session itself)."""
        slot = self._slots.get(session)
        if slot is not None:
            self._want(slot)

    # -- cross-thread plumbing ------------------------------------------------------------------
    def _on_hub(self) -> bool:
        return threading.get_ident() == self._ident

    def _want(self, slot: _Slot) -> None:
        if self._on_hub():
            self._pending.add(slot)
            return
        with self._lock:
            self._pending.add(slot)
        self._poke()

    def _poke(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(OSError):  # full (already awake) or closed (stopping)
            self._wake_w.send(b"\0")

    def _closed(self, slot: _Slot) -> None:
        """paho is about to close the socket: unregister it first, so its fd number can be reused."""
        if slot.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(slot.sock)
            slot.sock = None

    # -- the thread ---------------------------------------------------------------------------
    def _schedule(self, due: float, kind: str, slot: _Slot) -> None:
        heapq.heappush(self._timers, (due, next(self._tiebreak), kind, slot))

    def _run(self) -> None:
        self._ident = threading.get_ident()
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while not self._stop.is_set():
            try:
                next_misc = self._iteration(next_misc)
            except Exception:  # a bug must not silently stop a thousand devices
                log.exception("hub.iteration_failed")
                time.sleep(0.1)

    def _iteration(self, next_misc: float) -> float:
        now = time.monotonic()
        timeout = min(next_misc - now, self._timers[0][0] - now if self._timers else MISC_INTERVAL_S)
        if self._pending:
            timeout = 0.0
        for key, mask in self._sel.select(max(timeout, 0.0)):
            if key.data is None:
                # Drain first, then clear: cleared first, a poke landing in between would have its byte
                # drained with the flag left set, and no later poke would write to the pipe again.
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
                with self._lock:
                    self._woken = False
                continue
            self._io(key.data, mask)
        with self._lock:
            attach, self._attach = self._attach, []
            detach, self._detach = self._detach, []
            pending, self._pending = self._pending, set()
            connected, self._connected = self._connected, []
        now = time.monotonic()
        for slot, error in connected:
            self._connect_done(slot, error)
        for slot in attach:
            self._slots[slot.session] = slot
            self._schedule(now, "connect", slot)
        for slot in pending:
            self._service(slot, now)
        while self._timers and self._timers[0][0] <= now:
            _due, _, kind, slot = heapq.heappop(self._timers)
            if self._slots.get(slot.session) is not slot:
                continue  # detached meanwhile
            if kind == "connect":
                self._connect(slot)
            else:
                self._service(slot, now)
        self._closing.update(detach)
        for slot in list(self._closing):
            self._finish_detach(slot)
        if now >= next_misc:
            for slot in list(self._slots.values()):
                if slot.sock is not None and slot.session.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._lost(slot)
            next_misc = now + MISC_INTERVAL_S
        return next_misc

    def _io(self, slot: _Slot, mask: int) -> None:
        client = slot.session.client
        if mask & selectors.EVENT_READ and client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(slot)
            return
        if mask & selectors.EVENT_WRITE and slot.sock is not None:
            self._write(slot)

    def _write(self, slot: _Slot) -> None:
        client = slot.session.client
        # Always call loop_write, even with nothing queued: paho calls on_socket_register_write only
        # when its own "registered" flag is clear, and only loop_write clears it. A publish from another
        # thread that raced the previous write would otherwise leave the flag set, and the next one
        # would wait for unrelated I/O.
        if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(slot)
            return
        if slot.sock is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            with contextlib.suppress(KeyError, ValueError):
                if self._sel.get_key(slot.sock).events != events:
                    self._sel.modify(slot.sock, events, slot)

    def _service(self, slot: _Slot, now: float) -> None:
        """A sender round, then write whatever it (or another thread) queued."""
        session = slot.session
        if self._slots.get(session) is not slot:
            return
        if not session.stopping:
            wait = session.pump(slot.sender)
            if wait <= 0:
                self._pending.add(slot)  # more to send: again after this round of I/O
            elif wait < IDLE_WAIT_S:
                self._schedule(now + wait, "pump", slot)
        if slot.sock is not None:
            self._write(slot)

    def _connect(self, slot: _Slot) -> None:
        session = slot.session
        if session.stopping or slot.sock is not None or slot.connecting:
            return
        slot.attempt_at = time.time()
        slot.connecting = True
        try:
            self._connectors.submit(self._connect_blocking, slot)
        except RuntimeError:  # shutting down
            slot.connecting = False

    def _connect_blocking(self, slot: _Slot) -> None:
        """On a connector thread: TCP/TLS handshake and CONNECT queued; the hub takes it from there."""
        error: Exception | None = None
        try:
            slot.session.connect_once()
        except (OSError, ssl.SSLError, ValueError) as exc:
            error = exc
        with self._lock:
            self._connected.append((slot, error))
        self._poke()

    def _connect_done(self, slot: _Slot, error: Exception | None) -> None:
        slot.connecting = False
        session = slot.session
        if self._slots.get(session) is not slot:
            with contextlib.suppress(OSError):  # detached meanwhile
                if error is None and (sock := session.client.socket()) is not None:
                    sock.close()
            return
        if error is not None:
            self.connect_failures += 1
            session.connect_failed(error)
            self._retry(slot, after_connected=False)
            return
        self.connects += 1
        slot.sock = session.client.socket()
        if slot.sock is None:  # paho gave up on it already
            self._lost(slot)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if session.client.want_write() else 0)
        self._sel.register(slot.sock, events, slot)

    def _lost(self, slot: _Slot) -> None:
        """The connection ended (paho closed the socket, or we do now)."""
        self._close_socket(slot)
        session = slot.session
        was_up = session.connected_at is not None and session.connected_at >= slot.attempt_at
        session.connection_lost()
        if not session.stopping:
            self._retry(slot, after_connected=was_up)

    def _retry(self, slot: _Slot, *, after_connected: bool) -> None:
        broker = slot.session.broker
        if after_connected:
            slot.delay = broker.backoff_min_s
        self._schedule(time.monotonic() + backoff(slot.delay, broker), "connect", slot)
        slot.delay = min(slot.delay * 2, broker.backoff_max_s)

    def _close_socket(self, slot: _Slot) -> None:
        sock, slot.sock = slot.sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _finish_detach(self, slot: _Slot) -> None:
        """Done once paho closed the socket after the DISCONNECT, or at the deadline."""
        if slot.connecting and time.monotonic() < (slot.closing_deadline or 0.0):
            return  # a connector has the client: wait for its result
        if slot.sock is not None:
            self._write(slot)
        deadline = slot.closing_deadline or 0.0
        if slot.sock is not None and time.monotonic() < deadline:
            return
        self._close_socket(slot)
        slot.session.flush_acks(slot.sender)
        slot.closing_deadline = None
        self._closing.discard(slot)
        self._slots.pop(slot.session, None)
        self._pending.discard(slot)
        slot.detached.set()
