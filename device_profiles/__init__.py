"""Packaged device profiles (``*.toml`` package data), loaded by ``agent.hardware.load_profiles``."""
