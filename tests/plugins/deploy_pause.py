"""Test plugin: pause a deployment at one step so a crash test can SIGKILL the agent there.

Loaded with ``[agent] plugins = ["tests.plugins.deploy_pause"]``; ``EDGE_AGENT_TEST_PAUSE_AT``
is ``STATE:SECONDS`` (e.g. ``verified:120``).
"""

from __future__ import annotations

import asyncio
import os

import structlog

from agent.deploy.installer import STEP_HOOKS

ENV = "EDGE_AGENT_TEST_PAUSE_AT"
log = structlog.get_logger(__name__)


async def _pause(model: str, state: str) -> None:
    at, _, seconds = os.environ.get(ENV, "").partition(":")
    if at and at == state:
        log.warning("deploy.paused", model=model, state=state, seconds=float(seconds or 0))
        await asyncio.sleep(float(seconds or 0))


STEP_HOOKS.append(_pause)
