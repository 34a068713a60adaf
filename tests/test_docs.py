"""The docs against the code: every error code and every MQTT command the code has is documented."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest

import agent
import cloud_sync
from agent.api.errors import STATUS
from agent.errors import DeployError, UsageError
from agent.link.commands import command_specs
from cloud_sync.errors import EdgeError
from cloud_sync.mqtt.contract import LONG_RUNNING_COMMANDS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def every_error_class() -> list[type[EdgeError]]:
    """Every EdgeError subclass in agent and cloud_sync (the fleet service's included)."""
    for package in (agent, cloud_sync):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith("__main__") or ".migrations" in module.name:  # run by alembic only
                continue
            try:
                importlib.import_module(module.name)
            except ImportError:  # an optional extra (fleet, rich) that is not installed here
                continue
    found: list[type[EdgeError]] = []
    todo: list[type[EdgeError]] = [EdgeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.startswith(("agent.", "cloud_sync."))]


def test_every_error_code_is_documented() -> None:
    text = docs_text()
    missing = sorted({f"{c.code} ({c.__module__}.{c.__qualname__})" for c in every_error_class()
                      if f"`{c.code}`" not in text})
    assert not missing, f"error codes missing from docs/: {missing}"


def test_every_deployment_code_is_in_the_deploy_docs() -> None:
    """``DeployError(code, ...)`` takes its code per instance: each one raised is in docs/deploy.md's table."""
    table = (DOCS / "deploy.md").read_text()
    raised = set()
    for path in (Path(agent.__file__).parent).rglob("*.py"):
        raised |= set(re.findall(r'DeployError\(\s*"([a-z_]+)"', path.read_text()))
    assert raised, "no DeployError codes found: the pattern is out of date"
    assert sorted(code for code in raised if f"| `{code}`" not in table and f", `{code}`" not in table) == []


def test_every_mqtt_command_is_in_the_command_table() -> None:
    text = (DOCS / "mqtt.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([a-z-]+)`", row.split("|")[1])}
    names = set(command_specs(Any))  # type: ignore[arg-type]  # the handlers are not called
    assert names - documented == set(), f"commands missing from docs/mqtt.md: {sorted(names - documented)}"
    assert all(f"`{name}`" in text for name in LONG_RUNNING_COMMANDS)


# DeployError's code is per instance (docs/deploy.md); UsageError is raised by the command line only.
@pytest.mark.parametrize(("cls", "status"), [(c, s) for c, s in STATUS.items() if c not in (DeployError, UsageError)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_http_status_row_names_its_code(cls: type[EdgeError], status: int) -> None:
    """docs/api.md's status table: the row of each mapped status names the code of each class mapped to it."""
    rows = [line for line in (DOCS / "api.md").read_text().splitlines() if line.startswith(f"| {status} |")]
    assert rows, f"no row for HTTP {status} in docs/api.md"
    assert any(f"`{cls.code}`" in row for row in rows), f"HTTP {status} row lacks `{cls.code}` ({cls.__name__})"
