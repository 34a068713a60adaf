"""Hardware detection and device profiles: what this board has and which delegates to try on it."""

from agent.hardware.detect import detect
from agent.hardware.facts import ACCELERATOR_KINDS, KNOWN_LIBRARIES, Accelerator, HardwareInfo
from agent.hardware.profiles import (
    DelegateSpec,
    DeviceProfile,
    MatchRules,
    ProfileChoice,
    load_profiles,
    select_profile,
)

__all__ = [
    "ACCELERATOR_KINDS",
    "KNOWN_LIBRARIES",
    "Accelerator",
    "DelegateSpec",
    "DeviceProfile",
    "HardwareInfo",
    "MatchRules",
    "ProfileChoice",
    "detect",
    "load_profiles",
    "select_profile",
]
