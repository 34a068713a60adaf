"""Device profiles: which delegates / execution providers to try, in order, on which hardware.

Owns the TOML profile format (docs/device-profiles.md): loading files and validating them with
pydantic models of their tables (errors name the file and the key), matching a profile against a
:class:`HardwareInfo` (pure, no I/O) and choosing one. It does not load any
delegate: the runtimes walk ``DeviceProfile.runtimes[...]`` in order and fall back down to CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_args

import structlog
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from agent.errors import ConfigError
from agent.hardware.facts import ACCELERATOR_KINDS, KNOWN_LIBRARIES, HardwareInfo
from agent.validation import error_key, is_model

if TYPE_CHECKING:
    import os
    from importlib.resources.abc import Traversable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[no-redef]

log = structlog.get_logger(__name__)

RUNTIMES = ("onnx", "tflite", "hef", "rknn")
#: The last resort of the runtimes that have one, appended to every list.
CPU_FALLBACK = {"onnx": "CPUExecutionProvider", "tflite": "xnnpack"}
#: Runtimes whose compiled models run only on their NPU (no CPU fallback): the one device entry,
#: used when a profile lists none (so a Hailo or Rockchip NPU is used whatever profile is selected).
NPU_DEVICES = {"hef": "hailo", "rknn": "npu"}
TFLITE_DELEGATES = frozenset({"xnnpack", "gpu", "edgetpu", "external", "fault-injection"})
RKNN_CORE_MASKS = ("auto", "0", "1", "2", "0_1", "0_1_2", "all")
GENERIC_PROFILE = "generic-cpu"
PROFILE_PACKAGE = "device_profiles"


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class DelegateSpec:
    """One entry of a runtime's preference list: a TFLite delegate or an ONNX Runtime EP."""

    name: str
    library: str | None = None
    options: Mapping[str, Any] = field(default_factory=_empty, hash=False)


class _Table(BaseModel):
    """A table of a profile file: frozen, unknown keys are errors (reported as ``unknown``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    unknown: ClassVar[str] = "unknown key"


NonEmpty = Annotated[str, Strict(), Field(min_length=1)]
_SOC_RE = re.compile(r"[a-z0-9*?\[\]_.+-]+,[a-z0-9*?\[\]_.+-]+")
_RULE = "a list of non-empty strings"
Rule = Annotated[tuple[NonEmpty, ...], Field(description=_RULE)]


def _detectable(pattern: str) -> bool:
    """Detection only looks for KNOWN_LIBRARIES: a rule naming another library could never hold."""
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return any(
        literal.startswith(known) or known.startswith(literal)
        for known in (re.split(r"[*?\[]", k, maxsplit=1)[0] for k in KNOWN_LIBRARIES)
    )


class MatchRules(_Table):
    """The ``[match]`` table: every non-empty rule must hold; no rules matches any device."""

    unknown: ClassVar[str] = "unknown match rule"

    arch: Rule = ()
    board_contains: Rule = ()
    soc_any: Rule = ()
    accelerators_any: Rule = ()
    libraries_any: Rule = ()
    cpu_flags_all: Rule = ()

    @field_validator("accelerators_any")
    @classmethod
    def _kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for kind in value:
            if kind not in ACCELERATOR_KINDS:
                raise ValueError(f"unknown accelerator kind {kind!r} (known: {', '.join(sorted(ACCELERATOR_KINDS))})")
        return value

    @field_validator("soc_any")
    @classmethod
    def _socs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not _SOC_RE.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a device-tree SoC name such as 'nvidia,tegra234' (globs allowed)")
        return value

    @field_validator("libraries_any")
    @classmethod
    def _libraries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not _detectable(pattern):
                raise ValueError(f"{pattern!r} is never detected (only: {', '.join(KNOWN_LIBRARIES)})")
        return value

    def evaluate(self, hw: HardwareInfo) -> tuple[bool, list[str]]:
        """(matched, one reason per rule saying why it held or failed)."""
        checks = self.checks(hw)
        if not checks:
            return True, ["no match rules (matches any device)"]
        return all(ok for ok, _ in checks), [reason for _, reason in checks]

    def checks(self, hw: HardwareInfo) -> list[tuple[bool, str]]:
        """(held, reason) per rule listed, in a fixed order."""
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
        if self.soc_any:
            ok = hw.soc is not None and any(fnmatch(hw.soc, pattern) for pattern in self.soc_any)
            checks.append((True, f"soc {hw.soc}") if ok
                          else (False, f"soc {hw.soc!r} matches none of {list(self.soc_any)}"))
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
        return checks


@dataclass(frozen=True)
class DeviceProfile:
    """A parsed profile file; ``runtimes`` has every runtime of :data:`RUNTIMES`.

    ``onnx`` and ``tflite`` end with their CPU entry; ``hef`` and ``rknn`` (no CPU fallback: their
    compiled models run only on the NPU) hold the listed entries, else the one device entry.
    """

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
    return MappingProxyType({rt: (DelegateSpec(CPU_FALLBACK.get(rt) or NPU_DEVICES[rt]),) for rt in RUNTIMES})


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


class _Delegate(_Table):
    """One ``[[runtimes.X]]`` entry."""

    unknown: ClassVar[str] = "unknown key (allowed: library, name, options)"

    name: NonEmpty = Field(description="a non-empty string")
    library: NonEmpty | None = Field(default=None, description="a non-empty string")
    options: dict[str, Any] = Field(default_factory=dict, description="a table")

    def spec(self) -> DelegateSpec:
        return DelegateSpec(self.name, self.library, MappingProxyType(dict(self.options)))


class _OnnxDelegate(_Delegate):
    @field_validator("name")
    @classmethod
    def _provider(cls, name: str) -> str:
        if not name.endswith("ExecutionProvider"):
            raise ValueError(f"{name!r} is not an ONNX Runtime execution provider name")
        return name


class _TfliteDelegate(_Delegate):
    library: NonEmpty | None = Field(default=None, description="a non-empty string", validate_default=True)

    @field_validator("name")
    @classmethod
    def _delegate(cls, name: str) -> str:
        if name == "hailo":
            raise ValueError("'hailo' is not a LiteRT delegate: HailoRT runs compiled .hef models, not .tflite "
                             "graphs; list it as [[runtimes.hef]] name = \"hailo\"")
        if name not in TFLITE_DELEGATES:
            raise ValueError(f"unknown delegate {name!r} (allowed: {', '.join(sorted(TFLITE_DELEGATES))})")
        return name

    @field_validator("library")
    @classmethod
    def _external(cls, library: str | None, info: ValidationInfo) -> str | None:
        if library is None and info.data.get("name") == "external":
            raise ValueError("an external delegate needs a library")
        return library


class _HefOptions(_Table):
    """``options`` of a ``[[runtimes.hef]]`` entry (HailoRT's VDevice and InferModel settings)."""

    unknown: ClassVar[str] = "unknown option (allowed: batch_size, scheduling, timeout_ms)"

    scheduling: Literal["round-robin", "none"] = Field(default="round-robin", description="'round-robin' or 'none'")
    batch_size: Annotated[int, Strict()] | None = Field(default=None, ge=1, description="a positive integer")
    timeout_ms: Annotated[int, Strict()] = Field(default=10000, ge=1, description="a positive integer")


class _HefDelegate(_Delegate):
    """A Hailo device for ``.hef`` models; the only name is ``hailo``."""

    name: Literal["hailo"] = Field(description="'hailo'")
    library: None = Field(default=None, description="left out (HailoRT is loaded by hailo_platform)")
    options: _HefOptions = Field(default_factory=_HefOptions, description="a table")  # type: ignore[assignment]

    def spec(self) -> DelegateSpec:
        return DelegateSpec(self.name, None, MappingProxyType(self.options.model_dump(exclude_none=True)))


class _RknnOptions(_Table):
    """``options`` of a ``[[runtimes.rknn]]`` entry."""

    unknown: ClassVar[str] = "unknown option (allowed: core_mask)"

    core_mask: Literal[RKNN_CORE_MASKS] = Field(  # type: ignore[valid-type]
        default="auto", description=f"one of {', '.join(repr(m) for m in RKNN_CORE_MASKS)}")


class _RknnDelegate(_Delegate):
    """The Rockchip NPU for ``.rknn`` models; the only name is ``npu``."""

    name: Literal["npu"] = Field(description="'npu'")
    library: None = Field(default=None, description="left out (rknnlite loads librknnrt.so)")
    options: _RknnOptions = Field(default_factory=_RknnOptions, description="a table")  # type: ignore[assignment]

    def spec(self) -> DelegateSpec:
        return DelegateSpec(self.name, None, MappingProxyType(self.options.model_dump()))


def _cpu_last(runtime: str, entries: list[_Delegate]) -> list[_Delegate]:
    cpu = CPU_FALLBACK[runtime]
    for i, entry in enumerate(entries[:-1]):
        if entry.name == cpu:
            error = PydanticCustomError("cpu_not_last", "{cpu} is the fallback and must be last", {"cpu": cpu})
            raise ValidationError.from_exception_data(runtime, [{"type": error, "loc": (i, "name"), "input": cpu}])
    return entries


class _Runtimes(_Table):
    """``[[runtimes.X]]``: ordered preference lists; CPU last for ``onnx`` and ``tflite``."""

    unknown: ClassVar[str] = f"unknown runtime (allowed: {', '.join(RUNTIMES)})"

    onnx: list[_OnnxDelegate] = Field(default_factory=list, description="an array of tables ([[runtimes.onnx]])")
    tflite: list[_TfliteDelegate] = Field(default_factory=list, description="an array of tables ([[runtimes.tflite]])")
    hef: list[_HefDelegate] = Field(default_factory=list, description="an array of tables ([[runtimes.hef]])")
    rknn: list[_RknnDelegate] = Field(default_factory=list, description="an array of tables ([[runtimes.rknn]])")

    @field_validator("onnx", "tflite")
    @classmethod
    def _cpu_fallback_last(cls, entries: list[_Delegate], info: ValidationInfo) -> list[_Delegate]:
        return _cpu_last(str(info.field_name), entries)


class _ProfileFile(_Table):
    """A profile file (docs/device-profiles.md)."""

    unknown: ClassVar[str] = "unknown key (allowed: description, match, priority, runtimes, threads)"

    description: NonEmpty = Field(description="a non-empty string")
    priority: Annotated[int, Strict()] = Field(description="an integer")
    threads: Annotated[int, Strict()] | None = Field(default=None, ge=1, description="a positive integer")
    match: MatchRules = Field(default_factory=MatchRules, description="a table")
    runtimes: _Runtimes = Field(default_factory=_Runtimes, description="a table")


def parse_profile(name: str, text: str, source: str) -> DeviceProfile:
    """Parse and validate one profile file's text.

    Raises:
        ConfigError: bad TOML, unknown key, or a value of the wrong type (names ``source`` and the key).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", key=_key_at_error(text, str(exc)), file=source) from exc
    try:
        parsed = _ProfileFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_reason(err), key=error_key(err["loc"], data, index="[{}]"), file=source) from None
    runtimes = {}
    for runtime in RUNTIMES:
        specs = [entry.spec() for entry in getattr(parsed.runtimes, runtime)]
        fallback = CPU_FALLBACK.get(runtime)
        if fallback is not None and (not specs or specs[-1].name != fallback):
            specs.append(DelegateSpec(fallback))
        runtimes[runtime] = tuple(specs) or (DelegateSpec(NPU_DEVICES[runtime]),)
    return DeviceProfile(
        name=name,
        description=parsed.description,
        priority=parsed.priority,
        rules=parsed.match,
        threads=parsed.threads,
        runtimes=MappingProxyType(runtimes),
        source=source,
    )


def _reason(err: ErrorDetails) -> str:
    """The error in the profile's terms: what the key must be (its field's ``description``)."""
    kind, ctx = err["type"], err.get("ctx", {})
    table: type[BaseModel] | None = _ProfileFile
    field_info = None
    for part in err["loc"]:
        if isinstance(part, int) or table is None:
            continue
        field_info = table.model_fields.get(part)
        if field_info is None:  # an unknown key: ``table`` is where it was found
            break
        inner = field_info.annotation
        inner = next((a for a in get_args(inner) if is_model(a)), inner)  # list[X] / X | None -> X
        table = inner if is_model(inner) else None
    if kind == "extra_forbidden":
        return table.unknown if table is not None and issubclass(table, _Table) else "unknown key"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    expected = field_info.description if field_info is not None else None
    if kind == "missing":
        return f"required: must be {expected}" if expected else "required"
    if expected is None or kind == "cpu_not_last":
        return err["msg"]
    return f"must be {expected}, got {err.get('input')!r}"


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
