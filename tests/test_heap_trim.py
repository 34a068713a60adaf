"""The periodic heap trim (``[agent] heap_trim_s``): glibc's free pages go back to the system while the
daemon runs, not only after start-up and deployments (a soak found the free part creeping up)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.config import ConfigError, load_config
from agent.daemon import _trim_heap
from agent.health.system import release_free_heap


def test_the_interval_is_configurable_and_zero_turns_it_off() -> None:
    assert load_config(None, environ={}).agent.heap_trim_s == 300
    assert load_config(None, environ={"EDGE_AGENT_AGENT__HEAP_TRIM_S": "0"}).agent.heap_trim_s == 0
    with pytest.raises(ConfigError, match=r"agent\.heap_trim_s"):
        load_config(None, environ={"EDGE_AGENT_AGENT__HEAP_TRIM_S": "-1"})


async def test_the_heap_is_trimmed_again_and_again_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    calls: list[int] = []
    twice = asyncio.Event()

    def trim() -> None:
        calls.append(threading.get_ident())
        if len(calls) >= 2:
            loop.call_soon_threadsafe(twice.set)

    loop = asyncio.get_running_loop()
    task = loop.create_task(_trim_heap(0.01, trim))
    try:
        await asyncio.wait_for(twice.wait(), 30)
    finally:
        task.cancel()
    assert all(ident != loop_thread for ident in calls)


def test_release_free_heap_runs_here() -> None:
    release_free_heap()  # glibc: malloc_trim; elsewhere a no-op; never raises
    release_free_heap()
