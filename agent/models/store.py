"""Read side of the local model store: ``DIR/NAME/VERSION/model.{onnx,tflite}``.

Only discovers what is on disk; loading is the registry's job and installing is the
bundle installer's. Anything that does not fit the layout is skipped with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from agent.runtimes import MODEL_FILES

log = structlog.get_logger(__name__)
MANIFEST = "manifest.json"
ACTIVE = ".active"  # written by the installer: the version to serve by default
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    directory: Path
    file: Path
    runtime: str


def scan(models_dir: Path) -> dict[str, list[ModelVersion]]:
    """All valid model versions under ``models_dir``, versions ascending per name."""
    found: dict[str, list[ModelVersion]] = {}
    if not models_dir.is_dir():
        log.warning("store.missing", models_dir=str(models_dir))
        return found
    for model_dir in sorted(models_dir.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        if not NAME_RE.match(model_dir.name):
            log.warning("store.skipped", path=str(model_dir), reason="invalid model name")
            continue
        versions = []
        for vdir in model_dir.iterdir():
            entry = _version(model_dir.name, vdir)
            if entry is not None:
                versions.append(entry)
        if versions:
            found[model_dir.name] = sorted(versions, key=lambda v: v.version)
    return found


def _version(name: str, vdir: Path) -> ModelVersion | None:
    if not vdir.is_dir() or vdir.name.startswith("."):
        return None  # staging and temp dirs of the installer start with a dot
    if not vdir.name.isdigit() or int(vdir.name) < 1:
        log.warning("store.skipped", path=str(vdir), reason="version must be a positive integer")
        return None
    if (vdir / MANIFEST).is_file():
        return _from_manifest(name, vdir)
    files = [vdir / f for f in MODEL_FILES if (vdir / f).is_file()]
    if len(files) != 1:
        reason = "no model file" if not files else "more than one model file"
        log.warning("store.skipped", path=str(vdir), reason=f"{reason} (expected one of {', '.join(MODEL_FILES)})")
        return None
    return ModelVersion(name, int(vdir.name), vdir, files[0], MODEL_FILES[files[0].name])


def _from_manifest(name: str, vdir: Path) -> ModelVersion | None:
    """Installed from a bundle: the manifest names the model file and runtime."""
    try:
        manifest = orjson.loads((vdir / MANIFEST).read_bytes())
        model, runtime = vdir / manifest["model"], manifest["runtime"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        log.warning("store.skipped", path=str(vdir), reason=f"unreadable {MANIFEST}: {exc}")
        return None
    if not model.is_file():
        log.warning("store.skipped", path=str(vdir), reason=f"{MANIFEST} names missing model {model.name}")
        return None
    return ModelVersion(name, int(vdir.name), vdir, model, runtime)


def active_version(model_dir: Path) -> int | None:
    """The version the installer made active (``.active``), if any."""
    try:
        text = (model_dir / ACTIVE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
