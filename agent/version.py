"""The agent's own version, from the installed distribution metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
