"""A cached system snapshot for status and telemetry, read off the event loop.

Reading the system can take a while (``nvidia-smi`` may need up to its 2 s timeout), and the
event loop also answers inline predicts, so the snapshot is taken in a thread and reused while
it is fresh; concurrent callers share one refresh. Nothing runs between calls: an idle agent
pays nothing for it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from agent.health.system import AUTO, Auto, CpuSampler, SystemSnapshot, read_system


class SystemMonitor:
    def __init__(self, root: str | os.PathLike[str], state_dir: str | os.PathLike[str],
                 nvidia_smi: str | Auto | None = AUTO, max_age_s: float = 2.0) -> None:
        self.root = Path(root)
        self.state_dir = Path(state_dir)
        self.nvidia_smi = nvidia_smi
        self.max_age_s = max_age_s
        self.sampler = CpuSampler()  # CPU percent over the interval between snapshots
        self._latest: SystemSnapshot | None = None
        self._taken = 0.0  # monotonic
        self._refresh: asyncio.Task[SystemSnapshot] | None = None

    def read(self) -> SystemSnapshot:
        """A fresh snapshot, blocking (call from a thread)."""
        snapshot = read_system(root=self.root, state_dir=self.state_dir, nvidia_smi=self.nvidia_smi,
                               sampler=self.sampler)
        self._latest, self._taken = snapshot, time.monotonic()
        return snapshot

    async def snapshot(self, max_age_s: float | None = None) -> SystemSnapshot:
        """The cached snapshot if younger than ``max_age_s`` (default: the monitor's), else a new one."""
        max_age = self.max_age_s if max_age_s is None else max_age_s
        if self._latest is not None and time.monotonic() - self._taken <= max_age:
            return self._latest
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(asyncio.to_thread(self.read),
                                                                   name="system-snapshot")
        return await asyncio.shield(self._refresh)
