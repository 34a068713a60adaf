"""Metrics and health of the agent (system, models, streams, link)."""
