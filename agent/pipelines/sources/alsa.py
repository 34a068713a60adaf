"""Live microphone capture: ``sounddevice`` (PortAudio) when it is installed, else ``arecord``.

Neither is a dependency of the agent: most devices have no microphone, and the ones that do
ship alsa-utils. Without a capture device ``open`` raises ``SourceError("no capture device...")``;
nothing here ever invents audio.
"""

from __future__ import annotations

import contextlib
import queue
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import Field

from agent.pipelines.base import SOURCES, AudioChunk, SourceError
from agent.pipelines.sources._common import ConfiguredSource, FdReader, Options, decode_pcm

log = structlog.get_logger(__name__)

ASOUND_CARDS = Path("/proc/asound/cards")


def alsa_cards(cards_file: Path = ASOUND_CARDS) -> list[str]:
    """The sound cards the kernel knows (lines like `` 0 [PCH ]: HDA-Intel - HDA Intel PCH``)."""
    try:
        text = cards_file.read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if re.match(r"\s*\d+\s+\[", line)]


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError):  # OSError: the package is there but libportaudio is not
        return None
    return sounddevice


class AlsaOptions(Options):
    type: Literal["alsa"] = "alsa"
    device: str = Field(default="default", min_length=1, description="ALSA PCM name (hw:1,0) or PortAudio device")
    sample_rate: int = Field(default=16_000, gt=0, le=768_000)
    channels: int = Field(default=1, ge=1, le=32)
    chunk_ms: float = Field(default=32.0, gt=0, le=10_000)
    max_queued_s: float = Field(default=10.0, gt=0, description="sounddevice only: audio buffered before overflow")


@SOURCES.register
class AlsaSource(ConfiguredSource):
    """Microphone capture as mono float32 chunks at ``sample_rate`` (the device resamples if it must).

    Overflows (audio the agent did not read in time) are counted in ``overflows`` and logged,
    never dropped silently.
    """

    kind = "audio"
    type = "alsa"
    Options = AlsaOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.opts: AlsaOptions = self._options  # type: ignore[assignment]
        self.chunk_frames = max(1, round(self.opts.sample_rate * self.opts.chunk_ms / 1000))
        self.overflows = 0
        self._reported_overflows = 0
        self.backend: str | None = None
        self._offset = 0
        self._stream: Any = None
        self._queue: queue.Queue[np.ndarray] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._reader: FdReader | None = None

    def describe(self) -> str:
        return f"alsa:{self.opts.device}"

    def open(self) -> None:
        self.close()
        sd = _sounddevice()
        if sd is not None:
            self._open_sounddevice(sd)
        else:
            self._open_arecord()
        self._offset = 0
        log.info(
            "source.opened",
            source=self.type,
            device=self.opts.device,
            backend=self.backend,
            sample_rate=self.opts.sample_rate,
            channels=self.opts.channels,
        )

    def _open_sounddevice(self, sd: Any) -> None:
        opts = self.opts
        try:
            devices = sd.query_devices()
        except Exception as exc:
            raise SourceError(f"no capture device: PortAudio cannot list devices: {exc}") from exc
        if not any(d.get("max_input_channels", 0) > 0 for d in devices):
            raise SourceError("no capture device: PortAudio reports no input device")
        q: queue.Queue[np.ndarray] = queue.Queue(maxsize=max(1, int(opts.max_queued_s * 1000 / opts.chunk_ms)))
        self._queue = q

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            if status.input_overflow:
                self.overflows += 1
            try:
                q.put_nowait(indata.copy())
            except queue.Full:
                self.overflows += 1

        device = opts.device if opts.device != "default" else None
        try:
            stream = sd.InputStream(
                samplerate=opts.sample_rate,
                blocksize=self.chunk_frames,
                channels=opts.channels,
                dtype="float32",
                device=int(device) if device and device.isdigit() else device,
                callback=callback,
            )
            stream.start()
        except Exception as exc:
            raise SourceError(f"cannot open capture device {opts.device!r}: {exc}") from exc
        self._stream, self.backend = stream, "sounddevice"

    def _open_arecord(self) -> None:
        opts = self.opts
        cards = alsa_cards()
        if not cards:
            raise SourceError(
                f"no capture device: the kernel lists no ALSA sound card ({ASOUND_CARDS} "
                "is missing or empty); use a 'wav' or 'pcm' source on this machine"
            )
        exe = shutil.which("arecord")
        if exe is None:
            raise SourceError(
                "cannot capture audio: neither the 'sounddevice' package nor 'arecord' (alsa-utils) is installed"
            )
        # A file, not a pipe: arecord's warnings must never fill a pipe and block it. Closed in close().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        cmd = [
            exe,
            "-q",
            "-D",
            opts.device,
            "-t",
            "raw",
            "-f",
            "S16_LE",
            "-c",
            str(opts.channels),
            "-r",
            str(opts.sample_rate),
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        assert self._proc.stdout is not None
        self._reader = FdReader(self._proc.stdout.fileno(), 2 * opts.channels, 2 * opts.channels * self.chunk_frames)
        try:
            self._proc.wait(0.2)  # a bad device name makes arecord exit at once
        except subprocess.TimeoutExpired:
            self.backend = "arecord"
            return
        reason = self._arecord_error()
        self.close()
        raise SourceError(f"cannot open capture device {opts.device!r}: {reason}")

    def _arecord_error(self) -> str:
        assert self._proc is not None
        rc = self._proc.poll()
        text = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            text = self._stderr.read()[-500:].decode(errors="replace").strip()
        return f"arecord exited with {rc}: {text or 'no message'}"

    def read(self, timeout: float) -> AudioChunk | None:
        rate = self.opts.sample_rate
        if self._queue is not None:
            try:
                block = self._queue.get(timeout=timeout)
            except queue.Empty:
                if not self._stream.active:  # PortAudio stopped the stream: device gone
                    raise SourceError(f"capture device {self.opts.device!r} stopped delivering audio") from None
                return None
            samples = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
        else:
            self._require_open(self._reader)
            assert self._reader is not None
            try:
                data = self._reader.read_chunk(timeout)
            except (EOFError, OSError) as exc:
                reason = self._arecord_error() if self._proc is not None else str(exc)
                raise SourceError(f"capture device {self.opts.device!r} stopped: {reason}") from None
            if data is None:
                return None
            samples = decode_pcm(data, "s16le", self.opts.channels)
        if self.overflows > self._reported_overflows:
            log.warning("source.audio_overflow", source=self.type, device=self.opts.device, overflows=self.overflows)
            self._reported_overflows = self.overflows
        chunk = AudioChunk(samples, rate, time.time() - len(samples) / rate, self._offset, self.describe())
        self._offset += len(samples)
        return chunk

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.stop()
                self._stream.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(2)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self._stream = self._queue = self._proc = self._stderr = self._reader = None
