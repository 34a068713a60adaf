"""The agent's version: the single source (pyproject.toml reads it from here).

A literal, not importlib.metadata: that import drags zipfile, csv and email parsing into
a long-running daemon's memory for one string.
"""

__version__ = "0.1.0"
