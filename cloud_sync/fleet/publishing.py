"""Model upload to signed, published bundle: the pipeline behind ``POST /api/models`` and
``edge-fleet upload``.

:func:`publish_upload` takes an ONNX or TFLite file, or a ``.tar.gz`` (or plain tar) holding one
model file plus optional ``manifest.json`` fields and extra files (labels, ...), and:

1. checks the name, version, pre/post-processing and test input (each refusal its own
   :class:`~cloud_sync.errors.UploadError` with a stable ``code``);
2. refuses a name/version that is already published (published versions are immutable);
3. copies the upload into a private work directory with the size cap enforced while reading,
   and extracts an archive with the bundle format's own rules (no absolute paths, ``..``,
   links, devices, duplicate names; member, count, total and expansion-ratio caps);
4. loads the model in ONNX Runtime or LiteRT in a child process (a hostile file may crash a
   runtime) and runs the test input to record the test vector a device must reproduce;
5. builds the bundle and publishes it, signed with the repository's online keys only.

Nothing reaches the repository until step 5, which signs everything in memory before it writes
anything (:meth:`Repository.publish`); any failure leaves the repository byte for byte as it
was. The work directory is removed whatever happens.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.bundles import build_bundle, read_manifest, safe_extract, tensor_value
from cloud_sync.bundles.manifest import MANIFEST_NAME, NAME_RE, RUNTIME_SUFFIXES, Manifest, Processing
from cloud_sync.errors import (
    BadNameError,
    BadProcessingError,
    BadTestInputError,
    BadUploadManifestError,
    BadVersionError,
    ManifestError,
    NotAModelError,
    UnsafeArchiveError,
    UnsafeUploadError,
    UploadError,
    UploadTooLargeError,
    VersionExistsError,
)
from cloud_sync.fleet.modelcheck import ONLY_INPUT, check_isolated, sniff_runtime
from cloud_sync.repo import Repository, target_path

log = structlog.get_logger(__name__)

MAX_VERSION = 2**31 - 1
CHUNK = 1 << 20
# Fields an uploaded archive's manifest.json may set; name, version, runtime and model come
# from the upload itself (and must agree when the archive states them).
OWN_FIELDS = ("schema_version", "name", "version", "runtime", "model")
_GZIP, _ZIP, _NPY = b"\x1f\x8b", b"PK\x03\x04", b"\x93NUMPY"


class UploadLimits(BaseModel):
    """Caps on what an upload may be; all enforced while reading, before anything is loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_upload_bytes: int = Field(default=512 << 20, gt=0, description="the file as uploaded")
    max_member_bytes: int = Field(default=512 << 20, gt=0, description="one archive member")
    max_total_bytes: int = Field(default=1 << 30, gt=0, description="an archive, extracted")
    max_expansion: int = Field(default=50, gt=0, description="extracted/compressed size ratio (bomb guard)")
    max_members: int = Field(default=64, gt=0)
    max_manifest_bytes: int = Field(default=1 << 20, gt=0)
    max_test_input_bytes: int = Field(default=64 << 20, gt=0, description="the .npy/.npz, and its arrays")
    max_processing_bytes: int = Field(default=64 << 10, gt=0, description="pre/post JSON, each")
    inline_values: int = Field(default=4096, ge=0, description="larger test tensors go in .npy files")
    check_timeout_s: float = Field(default=120.0, gt=0)
    check_memory_bytes: int = Field(default=8 << 30, gt=0, description="address-space cap of the model check")


class PublishSettings(BaseModel):
    """What the upload endpoint needs: the repository, its online keys, limits and a work directory.

    ``keys_dir`` should hold only the online keys (``edge-fleet keys export-online``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    repo_dir: Path
    keys_dir: Path
    work_dir: Path | None = Field(default=None, description="temporary files (default: the system's)")
    limits: UploadLimits = Field(default_factory=UploadLimits)
    expiry_days: dict[str, float] = Field(default_factory=dict, description="per role; default: repository's")

    def repository(self) -> Repository:
        return Repository(self.repo_dir, self.keys_dir)

    def check(self) -> dict[str, Any]:
        """For the service's start: the repository exists and the online keys can sign.

        Logs ``upload.root_key_online`` (a warning) when a root key is in ``keys_dir``: it
        belongs offline (``edge-fleet keys export-online``).

        Raises:
            RepositoryError: no repository at ``repo_dir``, or an online role lacks keys.
        """
        repo = self.repository()
        keys = repo.online_keys()
        root_present = repo.holds_root_key()
        if root_present:
            log.warning("upload.root_key_online", keys_dir=str(self.keys_dir),
                        hint="give the service only the online keys: edge-fleet keys export-online")
        return {"online_keys": keys, "root_key_present": root_present}

    def expiry(self) -> dict[str, timedelta]:
        return {role: timedelta(days=days) for role, days in self.expiry_days.items()}


@dataclass(frozen=True)
class PublishedBundle:
    """What was published: the TUF target and the manifest's essentials."""

    name: str
    version: int
    runtime: str
    target: str
    length: int
    sha256: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    test_vectors: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def publish_upload(repo: Repository, upload: Path, name: str, version: int | str, *,
                   pre: Mapping[str, Any] | str | bytes | None = None,
                   post: Mapping[str, Any] | str | bytes | None = None,
                   test_input: Path | None = None, limits: UploadLimits | None = None,
                   filename: str | None = None, description: str | None = None,
                   rtol: float = 1e-4, atol: float = 1e-5, work_dir: Path | None = None,
                   expiry: Mapping[str, timedelta] | None = None) -> PublishedBundle:
    """Validate ``upload`` (a model file or a tar archive), build its bundle and publish it.

    ``filename`` is the name the client gave the file (its suffix tells ONNX from TFLite when
    ``upload`` is a temporary file). ``test_input`` is a ``.npy`` (single-input models) or an
    ``.npz`` with one array per input name; the model's outputs for it become the bundle's
    test vector with ``rtol``/``atol``.

    Raises:
        UploadError: one subclass per problem (``code``: bad_name, bad_version, bad_processing,
            bad_test_input, too_large, unsafe_archive, not_a_model, bad_manifest, check_timeout,
            version_exists); nothing was published.
        RepositoryError: the repository or its online keys are missing (a service problem).
    """
    limits = limits or UploadLimits()
    try:
        version = check_version(version)
        check_name(name)
        processing = {k: v for k, v in (("preprocess", parse_processing(pre, "pre", limits)),
                                        ("postprocess", parse_processing(post, "post", limits))) if v is not None}
        if description is not None and len(description) > 1000:
            raise BadUploadManifestError("at most 1000 characters", field="description")
        ensure_new(repo, name, version)
        job = _Job(name, version, processing, test_input, filename, description, rtol, atol, limits, expiry)
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="edge-fleet-upload-", dir=work_dir) as tmp:
            published = _build_and_publish(repo, Path(upload), Path(tmp), job)
    except UploadError as exc:
        log.warning("upload.refused", name=name, version=str(version), code=exc.code, field=exc.field,
                    reason=exc.reason)
        raise
    log.info("upload.published", name=name, version=version, target=published.target, length=published.length,
             sha256=published.sha256, runtime=published.runtime, test_vectors=published.test_vectors)
    return published


@dataclass(frozen=True)
class _Job:
    """The checked form fields of one upload."""

    name: str
    version: int
    processing: dict[str, Any]
    test_input: Path | None
    filename: str | None
    description: str | None
    rtol: float
    atol: float
    limits: UploadLimits
    expiry: Mapping[str, timedelta] | None


def _build_and_publish(repo: Repository, upload: Path, work: Path, job: _Job) -> PublishedBundle:
    limits = job.limits
    feeds = load_test_input(job.test_input, limits) if job.test_input is not None else {}
    received = work / "upload"
    size = copy_capped(upload, received, limits.max_upload_bytes, "file")
    src = work / "src"
    if is_archive(received):
        root, model, extra = _unpack(received, size, src, limits)
    else:
        runtime = sniff_runtime(received, job.filename)
        src.mkdir()
        model = src / f"model{RUNTIME_SUFFIXES[runtime]}"
        received.replace(model)
        root, extra = src, {}
    runtime = sniff_runtime(model)
    check = check_isolated(model, runtime, feeds or None, timeout_s=limits.check_timeout_s,
                           memory_bytes=limits.check_memory_bytes)
    specs = check.specs()
    extra.setdefault("inputs", specs["inputs"])
    extra.setdefault("outputs", specs["outputs"])
    extra.update(job.processing)
    if job.description is not None:
        extra["description"] = job.description
    vectors = None
    files: list[Path] = []
    if feeds:
        vectors = [_vector(check.feeds, check.results, out_dir=work / "vectors", inline=limits.inline_values,
                           rtol=job.rtol, atol=job.atol, files=files)]
    out = work / "out"
    try:
        bundle = build_bundle(root, out, name=job.name, version=job.version, runtime=runtime, files=files,
                              manifest_extra=extra, test_vectors=vectors)
    except ManifestError as exc:
        raise BadUploadManifestError(exc.reason, field=exc.field) from None
    except ValueError as exc:  # the archive's manifest.json fields cannot be combined
        raise BadUploadManifestError(str(exc)) from None
    target = repo.publish(bundle, expiry=job.expiry, exists_ok=False)
    manifest = read_manifest(bundle)
    return PublishedBundle(job.name, job.version, runtime, target.path, target.length, target.hashes["sha256"],
                           specs["inputs"], specs["outputs"], len(manifest.test_vectors),
                           [manifest.model, *manifest.files])


# -- checks of the form fields -----------------------------------------------------------------


def check_name(name: str) -> str:
    """Raises: BadNameError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadNameError("must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
                           field="name")
    return name


def check_version(version: int | str) -> int:
    """A positive integer, or a string of decimal digits. Raises: BadVersionError."""
    if isinstance(version, bool):
        raise BadVersionError("must be a positive integer", field="version")
    if isinstance(version, str):
        text = version.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 10:
            raise BadVersionError(f"must be a positive integer, got {version[:20]!r}", field="version")
        version = int(text)
    if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise BadVersionError(f"must be between 1 and {MAX_VERSION}", field="version")
    return version


def parse_processing(value: Mapping[str, Any] | str | bytes | None, field_name: str,
                     limits: UploadLimits) -> dict[str, Any] | None:
    """Pre/post-processing: a JSON object with a non-empty string ``type``. Raises: BadProcessingError."""
    if value is None or value in ("", b""):
        return None
    if isinstance(value, str | bytes):
        if len(value) > limits.max_processing_bytes:
            raise UploadTooLargeError(f"more than {limits.max_processing_bytes} bytes", field=field_name)
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadProcessingError(f"malformed JSON: {exc}", field=field_name) from None
    if not isinstance(value, Mapping):
        raise BadProcessingError("must be a JSON object with a 'type'", field=field_name)
    try:
        return Processing.model_validate(dict(value)).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "type"
        raise BadProcessingError(f"{where}: {err['msg']}", field=field_name) from None


def ensure_new(repo: Repository, name: str, version: int) -> None:
    """Raises: VersionExistsError when ``name``/``version`` is already published."""
    path = target_path(name, version)
    if path in repo.targets().signed.targets:
        raise VersionExistsError(f"{name} version {version} is already published; published versions are "
                                 "immutable, upload a new version", field="version")


# -- reading the upload --------------------------------------------------------------------------


def copy_capped(src: Path, dest: Path, cap: int, field_name: str) -> int:
    """Copy ``src`` to ``dest`` in chunks, refusing once more than ``cap`` bytes were read.

    Raises:
        UploadTooLargeError: over ``cap`` (``dest`` is removed).
    """
    size = 0
    try:
        with src.open("rb") as fin, dest.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                size += len(chunk)
                if size > cap:
                    raise UploadTooLargeError(f"more than {cap} bytes", field=field_name)
                fout.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size


def is_archive(path: Path) -> bool:
    """gzip (``.tar.gz``) or a plain tar (``ustar`` at offset 257)."""
    with path.open("rb") as fh:
        head = fh.read(265)
    return head[:2] == _GZIP or head[257:262] == b"ustar"


def _unpack(archive: Path, size: int, dest: Path, limits: UploadLimits) -> tuple[Path, Path, dict[str, Any]]:
    """Extract safely; returns (bundle root, model file, manifest.json fields)."""
    total = min(limits.max_total_bytes, max(limits.max_expansion * size, 16 << 20))
    try:
        safe_extract(archive, dest, max_member_bytes=limits.max_member_bytes, max_total_bytes=total,
                     max_members=limits.max_members, fsync=False)
    except UnsafeArchiveError as exc:
        raise UnsafeUploadError(exc.reason, field=exc.field) from None
    archive.unlink()
    entries = list(dest.iterdir())
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else dest  # "tar czf m.tar.gz mymodel/"
    models = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".onnx", ".tflite"))
    if len(models) != 1:
        what = "no" if not models else f"{len(models)} ({', '.join(p.name for p in models)}) instead of one"
        raise NotAModelError(f"the archive holds {what} .onnx or .tflite file at its top level", field="file")
    extra: dict[str, Any] = {}
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        extra = _archive_manifest(manifest, limits)
        manifest.unlink()  # its fields are passed on explicitly
    return root, models[0], extra


def _archive_manifest(path: Path, limits: UploadLimits) -> dict[str, Any]:
    if path.stat().st_size > limits.max_manifest_bytes:
        raise UploadTooLargeError(f"more than {limits.max_manifest_bytes} bytes", field=MANIFEST_NAME)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise BadUploadManifestError(f"malformed JSON: {exc}", field=MANIFEST_NAME) from None
    if not isinstance(data, dict):
        raise BadUploadManifestError("must be a JSON object", field=MANIFEST_NAME)
    unknown = sorted(set(data) - set(Manifest.model_fields))
    if unknown:
        raise BadUploadManifestError("unknown field", field=unknown[0])
    for key in OWN_FIELDS:  # set from the upload; the archive may repeat them, not contradict them
        data.pop(key, None)
    return data


def load_test_input(path: Path, limits: UploadLimits) -> dict[str, np.ndarray]:
    """A ``.npy`` (the model's only input) or an ``.npz`` (one array per input name), no pickles.

    Raises:
        UploadTooLargeError: the file, or the arrays in an ``.npz``, over ``max_test_input_bytes``.
        BadTestInputError: anything else wrong with it.
    """
    cap = limits.max_test_input_bytes
    if path.stat().st_size > cap:
        raise UploadTooLargeError(f"more than {cap} bytes", field="test_input")
    with path.open("rb") as fh:
        head = fh.read(8)
    try:
        if head.startswith(_NPY):
            arrays = {ONLY_INPUT: np.load(path, allow_pickle=False)}
        elif head.startswith(_ZIP):
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                if len(infos) > 64 or sum(i.file_size for i in infos) > cap:  # declared sizes: a zip bomb stops here
                    raise UploadTooLargeError(f"the arrays hold more than {cap} bytes or 64 members",
                                              field="test_input")
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        else:
            raise BadTestInputError("not a .npy or .npz file", field="test_input")
    except UploadError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadTestInputError(f"unreadable: {exc}", field="test_input") from None
    if not arrays:
        raise BadTestInputError("the .npz holds no arrays", field="test_input")
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf" or array.nbytes > cap:
            raise BadTestInputError(f"array {key or '(npy)'}: must be numeric, at most {cap} bytes",
                                    field="test_input")
    return arrays


def _vector(feeds: Mapping[str, np.ndarray], results: Mapping[str, np.ndarray], *, out_dir: Path, inline: int,
            rtol: float, atol: float, files: list[Path]) -> dict[str, Any]:
    """One test vector; tensors of more than ``inline`` values are stored as ``.npy`` files in the bundle."""
    out_dir.mkdir(exist_ok=True)

    def value(kind: str, index: int, array: np.ndarray) -> dict[str, Any]:
        array = np.asarray(array)
        if array.size <= inline:
            return tensor_value(array)
        path = out_dir / f"test-{kind}-{index}.npy"
        np.save(path, array, allow_pickle=False)
        files.append(path)
        return {"dtype": array.dtype.name, "shape": list(array.shape), "file": path.name}

    return {"inputs": {n: value("input", i, a) for i, (n, a) in enumerate(feeds.items())},
            "expected": {n: value("expected", i, a) for i, (n, a) in enumerate(results.items())},
            "rtol": rtol, "atol": atol}
