"""Device profiles: which delegates / execution providers to try, in order, on which hardware.

Owns the TOML profile format (docs/device-profiles.md): loading and validating files, matching a
profile against a :class:`HardwareInfo` (pure, no I/O) and choosing one. It does not load any
delegate: the runtimes walk ``DeviceProfile.runtimes[...]`` in order and fall back down to CPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeGuard

import structlog

from agent.errors import ConfigError
from agent.hardware.detect import ACCELERATOR_KINDS, KNOWN_LIBRARIES, HardwareInfo

if TYPE_CHECKING:
    import os
    from importlib.resources.abc import Traversable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[no-redef]

log = structlog.get_logger(__name__)

RUNTIMES = ("onnx", "tflite")
CPU_FALLBACK = {"onnx": "CPUExecutionProvider", "tflite": "xnnpack"}
TFLITE_DELEGATES = frozenset({"xnnpack", "gpu", "edgetpu", "hailo", "external", "fault-injection"})
GENERIC_PROFILE = "generic-cpu"
PROFILE_PACKAGE = "device_profiles"
_TOP_KEYS = frozenset({"description", "priority", "threads", "match", "runtimes"})
_DELEGATE_KEYS = frozenset({"name", "library", "options"})


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class DelegateSpec:
    """One entry of a runtime's preference list: a TFLite delegate or an ONNX Runtime EP."""

    name: str
    library: str | None = None
    options: Mapping[str, Any] = field(default_factory=_empty, hash=False)


@dataclass(frozen=True)
class MatchRules:
    """The ``[match]`` table: every non-empty rule must hold; no rules matches any device."""

    arch: tuple[str, ...] = ()
    board_contains: tuple[str, ...] = ()
    accelerators_any: tuple[str, ...] = ()
    libraries_any: tuple[str, ...] = ()
    cpu_flags_all: tuple[str, ...] = ()

    def evaluate(self, hw: HardwareInfo) -> tuple[bool, list[str]]:
        """(matched, one reason per rule saying why it held or failed)."""
        checks: list[tuple[bool, str]] = []
        if self.arch:
            ok = hw.arch in self.arch
            checks.append((ok, f"arch {hw.arch}" if ok else f"arch {hw.arch} not in {list(self.arch)}"))
        if self.board_contains:
            board = (hw.board or "").lower()
            hit = next((s for s in self.board_contains if s.lower() in board), None)
            checks.append(
                (hit is not None, f"board contains '{hit}'")
                if hit
                else (False, f"board {hw.board!r} contains none of {list(self.board_contains)}")
            )
        if self.accelerators_any:
            kind = next((k for k in self.accelerators_any if hw.has(k)), None)
            checks.append(
                (True, f"accelerator {kind}")
                if kind
                else (False, f"no accelerator of kind {list(self.accelerators_any)}")
            )
        if self.libraries_any:
            lib = next(
                (lib for pat in self.libraries_any for lib in sorted(hw.libraries) if fnmatch(lib, pat)), None
            )
            checks.append(
                (True, f"library {lib}") if lib else (False, f"no library {list(self.libraries_any)}")
            )
        if self.cpu_flags_all:
            missing = [f for f in self.cpu_flags_all if f not in hw.cpu_flags]
            checks.append(
                (False, f"cpu flags missing {missing}")
                if missing
                else (True, f"cpu flags {' '.join(self.cpu_flags_all)}")
            )
        if not checks:
            return True, ["no match rules (matches any device)"]
        return all(ok for ok, _ in checks), [reason for _, reason in checks]


@dataclass(frozen=True)
class DeviceProfile:
    """A parsed profile file; ``runtimes`` always has both runtimes, each ending with the CPU entry."""

    name: str
    description: str
    priority: int
    rules: MatchRules
    threads: int | None
    runtimes: Mapping[str, tuple[DelegateSpec, ...]] = field(hash=False)
    source: str

    def match(self, hw: HardwareInfo) -> tuple[bool, list[str]]:
        """(matched, human-readable reasons: which rules held or failed)."""
        return self.rules.evaluate(hw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``edge-agent detect`` and the status API."""
        return {
            "name": self.name,
            "description": self.description,
            "priority": self.priority,
            "threads": self.threads,
            "source": self.source,
            "runtimes": {
                rt: [{"name": d.name, "library": d.library, "options": dict(d.options)} for d in specs]
                for rt, specs in self.runtimes.items()
            },
        }


@dataclass(frozen=True)
class ProfileChoice:
    """The chosen profile and why (logged, shown by ``edge-agent detect``, sent in MQTT state)."""

    profile: DeviceProfile
    reason: str


def _cpu_only() -> Mapping[str, tuple[DelegateSpec, ...]]:
    return MappingProxyType({rt: (DelegateSpec(CPU_FALLBACK[rt]),) for rt in RUNTIMES})


# Used when a custom profile directory has no generic-cpu.toml: selection must always succeed.
BUILTIN_GENERIC = DeviceProfile(
    name=GENERIC_PROFILE,
    description="Built-in CPU-only fallback",
    priority=0,
    rules=MatchRules(),
    threads=None,
    runtimes=_cpu_only(),
    source="<built-in>",
)


def load_profiles(directory: str | os.PathLike[str] | None = None) -> list[DeviceProfile]:
    """Load every ``*.toml`` profile in ``directory`` (default: the packaged ``device_profiles``).

    Raises:
        ConfigError: the directory is missing, or a file is unreadable, bad TOML or has a bad field
            (the error names the file and the key).
    """
    base: Traversable
    if directory is None:
        base = resources.files(PROFILE_PACKAGE)
    else:
        base = Path(directory)
        if not base.is_dir():
            raise ConfigError("profile directory does not exist", file=str(base))
    entries = sorted((e for e in base.iterdir() if e.name.endswith(".toml")), key=lambda e: e.name)
    profiles = []
    for entry in entries:
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read profile: {exc}", file=str(entry)) from exc
        profiles.append(parse_profile(entry.name.removesuffix(".toml"), text, str(entry)))
    log.debug("hardware.profiles_loaded", directory=str(base), profiles=[p.name for p in profiles])
    return profiles


def select_profile(
    hw: HardwareInfo, profiles: Sequence[DeviceProfile], name: str | None = None
) -> ProfileChoice:
    """Pick the forced profile ``name``, else the highest-priority match (ties: by name).

    Raises:
        ConfigError: ``name`` is not a known profile (key ``agent.profile``).
    """
    if name is not None and name != "auto":
        forced = next((p for p in profiles if p.name == name), None)
        if forced is None:
            available = ", ".join(sorted(p.name for p in profiles)) or "none"
            raise ConfigError(
                f"unknown device profile {name!r} (available: {available}; or 'auto')", key="agent.profile"
            )
        matched, reasons = forced.match(hw)
        if not matched:
            log.warning("hardware.profile_forced_mismatch", profile=name, reasons=reasons)
        choice = ProfileChoice(forced, "forced by config agent.profile")
    else:
        candidates = [(p, r) for p in profiles for ok, r in [p.match(hw)] if ok]
        if candidates:
            best, reasons = min(candidates, key=lambda c: (-c[0].priority, c[0].name))
            choice = ProfileChoice(best, "matched: " + "; ".join(reasons))
        else:
            generic = next((p for p in profiles if p.name == GENERIC_PROFILE), BUILTIN_GENERIC)
            choice = ProfileChoice(generic, f"no profile matched; using {GENERIC_PROFILE}")
    log.info("hardware.profile_selected", profile=choice.profile.name, reason=choice.reason)
    return choice


# --- parsing ------------------------------------------------------------------------------------


def parse_profile(name: str, text: str, source: str) -> DeviceProfile:
    """Parse and validate one profile file's text.

    Raises:
        ConfigError: bad TOML, unknown key, or a value of the wrong type (names ``source`` and the key).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", key=_key_at_error(text, str(exc)), file=source) from exc

    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(reason, key=key, file=source)

    for key in sorted(data.keys() - _TOP_KEYS):
        raise fail(key, f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    description = data.get("description")
    if not isinstance(description, str) or not description:
        raise fail("description", "must be a non-empty string")
    priority = data.get("priority")
    if not _is_int(priority):
        raise fail("priority", f"must be an integer, got {priority!r}")
    threads = data.get("threads")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise fail("threads", f"must be a positive integer, got {threads!r}")
    return DeviceProfile(
        name=name,
        description=description,
        priority=priority,
        rules=_parse_match(data.get("match", {}), fail),
        threads=threads,
        runtimes=_parse_runtimes(data.get("runtimes", {}), fail),
        source=source,
    )


def _detectable(pattern: str) -> bool:
    """Detection only looks for KNOWN_LIBRARIES: a rule naming another library could never hold."""
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return any(
        literal.startswith(known) or known.startswith(literal)
        for known in (re.split(r"[*?\[]", k, maxsplit=1)[0] for k in KNOWN_LIBRARIES)
    )


_Fail = Callable[[str, str], ConfigError]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_match(table: object, fail: _Fail) -> MatchRules:
    if not isinstance(table, dict):
        raise fail("match", "must be a table")
    allowed = {f.name for f in fields(MatchRules)}
    values: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        if key not in allowed:
            raise fail(f"match.{key}", f"unknown match rule (allowed: {', '.join(sorted(allowed))})")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(f"match.{key}", "must be a list of non-empty strings")
        if key == "accelerators_any":
            for kind in value:
                if kind not in ACCELERATOR_KINDS:
                    raise fail(f"match.{key}", f"unknown accelerator kind {kind!r}")
        if key == "libraries_any":
            for pattern in value:
                if not _detectable(pattern):
                    known = ", ".join(KNOWN_LIBRARIES)
                    raise fail(f"match.{key}", f"{pattern!r} is never detected (only: {known})")
        values[key] = tuple(value)
    return MatchRules(**values)


def _parse_runtimes(table: object, fail: _Fail) -> Mapping[str, tuple[DelegateSpec, ...]]:
    if not isinstance(table, dict):
        raise fail("runtimes", "must be a table")
    for key in sorted(table.keys() - set(RUNTIMES)):
        raise fail(f"runtimes.{key}", f"unknown runtime (allowed: {', '.join(RUNTIMES)})")
    result: dict[str, tuple[DelegateSpec, ...]] = {}
    for runtime in RUNTIMES:
        entries = table.get(runtime, [])
        if not isinstance(entries, list):
            raise fail(f"runtimes.{runtime}", "must be an array of tables ([[runtimes.{runtime}]])")
        specs = [_parse_delegate(runtime, i, e, fail) for i, e in enumerate(entries)]
        cpu = CPU_FALLBACK[runtime]
        for i, spec in enumerate(specs[:-1]):
            if spec.name == cpu:
                raise fail(f"runtimes.{runtime}[{i}].name", f"{cpu} is the fallback and must be last")
        if not specs or specs[-1].name != cpu:
            specs.append(DelegateSpec(cpu))
        result[runtime] = tuple(specs)
    return MappingProxyType(result)


def _parse_delegate(runtime: str, index: int, entry: object, fail: _Fail) -> DelegateSpec:
    where = f"runtimes.{runtime}[{index}]"
    if not isinstance(entry, dict):
        raise fail(where, "must be a table with 'name'")
    for key in sorted(entry.keys() - _DELEGATE_KEYS):
        raise fail(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(_DELEGATE_KEYS))})")
    name, library, options = entry.get("name"), entry.get("library"), entry.get("options", {})
    if not isinstance(name, str) or not name:
        raise fail(f"{where}.name", "must be a non-empty string")
    if runtime == "onnx" and not name.endswith("ExecutionProvider"):
        raise fail(f"{where}.name", f"{name!r} is not an ONNX Runtime execution provider name")
    if runtime == "tflite" and name not in TFLITE_DELEGATES:
        allowed = ", ".join(sorted(TFLITE_DELEGATES))
        raise fail(f"{where}.name", f"unknown delegate {name!r} (allowed: {allowed})")
    if library is not None and (not isinstance(library, str) or not library):
        raise fail(f"{where}.library", "must be a non-empty string")
    if name == "external" and library is None:
        raise fail(f"{where}.library", "an external delegate needs a library")
    if not isinstance(options, dict):
        raise fail(f"{where}.options", "must be a table")
    return DelegateSpec(name, library, MappingProxyType(dict(options)))


_LINE_RE = re.compile(r"at line (\d+)")
_KEY_RE = re.compile(r"""^\s*([\w.\-"']+)\s*=""")
_TABLE_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")


def _key_at_error(text: str, message: str) -> str | None:
    """Best-effort dotted key on the line tomllib complains about, so syntax errors name a key too."""
    line_no = _LINE_RE.search(message)
    lines = text.splitlines()[: int(line_no[1])] if line_no else []
    key = _KEY_RE.match(lines[-1]) if lines else None
    if key is None:
        return None
    table = next((m[1] for line in reversed(lines[:-1]) if (m := _TABLE_RE.match(line))), None)
    return f"{table}.{key[1]}" if table else key[1]
