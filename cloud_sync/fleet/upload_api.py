"""``POST /api/models``: the model-upload endpoint, as a router factory the fleet server includes.

Request: ``multipart/form-data`` with the fields

=============  ====  ===================================================================
``file``       file  the model (``.onnx``, ``.tflite``) or a ``.tar.gz`` holding one model
                     file plus optional ``manifest.json`` fields and extra files
``name``       text  model name (``a-z 0-9 . _ -``, 1-64 characters)
``version``    text  positive integer
``pre``        text  optional JSON object: preprocessing (``{"type": ...}``)
``post``       text  optional JSON object: postprocessing
``test_input`` file  optional ``.npy`` (single-input model) or ``.npz`` (one array per input)
``description`` text optional
``rtol``/``atol`` text optional test-vector tolerances (defaults 1e-4 / 1e-5)
=============  ====  ===================================================================

Answers ``201`` with the published bundle (:class:`PublishedBundle` as JSON), or
``{"error": {"code", "message", "field"}}`` with 400 (malformed request), 401/403 (the auth
dependency), 409 (``version_exists``), 413 (``too_large``), 415 (not multipart) or 422 (the
other upload codes). The body is parsed as it streams (python-multipart); each file part goes
to a private temporary file with its cap enforced while reading, so no request makes the
service hold more than the caps. The blocking check, build and signing run in a thread, one
upload at a time (they share the repository lock anyway).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from cloud_sync.errors import RepositoryError, UploadError, UploadTooLargeError
from cloud_sync.fleet.publishing import PublishSettings, publish_upload

log = structlog.get_logger(__name__)

FILE_FIELDS = ("file", "test_input")
TEXT_FIELDS = ("name", "version", "pre", "post", "description", "rtol", "atol")
MAX_TEXT_BYTES = 1024  # name, version, description, rtol, atol (pre/post: limits.max_processing_bytes)


class BadRequestError(Exception):
    """A malformed request (not an upload problem): 400, or ``status``."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        self.code, self.message, self.status = code, message, status
        super().__init__(message)


def _error(code: str, message: str, status: int, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status)


class FormReader:
    """Streams a multipart body into temp files (file fields) and bounded strings (text fields)."""

    def __init__(self, boundary: bytes, work: Path, settings: PublishSettings) -> None:
        limits = settings.limits
        self.work = work
        self.caps = {"file": limits.max_upload_bytes, "test_input": limits.max_test_input_bytes,
                     "pre": limits.max_processing_bytes, "post": limits.max_processing_bytes}
        self.files: dict[str, tuple[Path, str | None]] = {}
        self.texts: dict[str, str] = {}
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._field: str | None = None
        self._size = 0
        self._sink: IO[bytes] | None = None
        self._text = bytearray()
        total = limits.max_upload_bytes + limits.max_test_input_bytes + 2 * limits.max_processing_bytes + (1 << 20)
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._part_end,
        }, max_size=total)

    def write(self, chunk: bytes) -> None:
        """Feed a chunk. Raises: UploadTooLargeError, BadRequestError."""
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise BadRequestError("bad_request", f"malformed multipart body: {exc}") from None

    def finish(self) -> None:
        self.parser.finalize()
        if self._sink is not None:
            self._sink.close()
            raise BadRequestError("bad_request", "the multipart body ended inside a part")

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # -- parser callbacks ------------------------------------------------------------------------
    def _part_begin(self) -> None:
        self._headers = {}
        self._header_field = self._header_value = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode(errors="replace")
        if disposition != b"form-data" or name not in (*FILE_FIELDS, *TEXT_FIELDS):
            raise BadRequestError("bad_request", f"unexpected form field {name!r} (fields: "
                                            f"{', '.join((*FILE_FIELDS, *TEXT_FIELDS))})")
        if name in self.files or name in self.texts:
            raise BadRequestError("bad_request", f"form field {name!r} given twice")
        self._field, self._size = name, 0
        if name in FILE_FIELDS:
            filename = options.get(b"filename")
            path = self.work / f"{name}.part"
            self.files[name] = (path, Path(filename.decode(errors="replace")).name if filename else None)
            self._sink = path.open("wb")
        else:
            self._text = bytearray()

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._field is not None
        self._size += end - start
        cap = self.caps.get(self._field, MAX_TEXT_BYTES)
        if self._size > cap:
            raise UploadTooLargeError(f"more than {cap} bytes", field=self._field)
        if self._sink is not None:
            self._sink.write(data[start:end])
        else:
            self._text += data[start:end]

    def _part_end(self) -> None:
        assert self._field is not None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        else:
            try:
                self.texts[self._field] = self._text.decode()
            except UnicodeDecodeError:
                raise BadRequestError("bad_request", f"form field {self._field!r} is not UTF-8") from None
        self._field = None


def models_router(settings: PublishSettings, auth: Callable[..., Any], *, prefix: str = "/api/models",
                  tags: Sequence[str] | None = None) -> APIRouter:
    """``POST {prefix}`` (upload and publish), guarded by the dependency ``auth`` (the admin role).

    ``auth`` is any FastAPI dependency callable that raises (401/403) for callers who may not
    upload, e.g. the fleet server's ``require(Role.admin)``.
    """
    router = APIRouter(prefix=prefix, tags=list(tags or ["models"]))
    lock = asyncio.Lock()  # one check/build/sign at a time: they are CPU-bound and share the repository lock

    @router.post("", status_code=201, dependencies=[Depends(auth)],
                 summary="Upload a model (ONNX, TFLite or .tar.gz) and publish it as a signed bundle",
                 responses={201: {"description": "published"}, 400: {"description": "malformed request"},
                            409: {"description": "version_exists"}, 413: {"description": "too_large"},
                            415: {"description": "not multipart/form-data"},
                            422: {"description": "not_a_model, unsafe_archive, bad_manifest, bad_name, ..."}})
    async def upload_model(request: Request) -> JSONResponse:
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            return _error("unsupported_media_type", "send multipart/form-data (fields: file, name, version, pre, "
                                                    "post, test_input)", 415)
        limits = settings.limits
        declared = request.headers.get("content-length", "")
        ceiling = limits.max_upload_bytes + limits.max_test_input_bytes + 2 * limits.max_processing_bytes + (1 << 20)
        if declared.isdigit() and int(declared) > ceiling:
            return _error(UploadTooLargeError.code, f"the request body is over {ceiling} bytes", 413, "file")
        if settings.work_dir is not None:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="edge-fleet-form-", dir=settings.work_dir))
        form = FormReader(boundary, work, settings)
        try:
            async for chunk in request.stream():
                await asyncio.to_thread(form.write, chunk)
            form.finish()
            missing = [f for f in ("file", "name", "version") if f not in form.files and f not in form.texts]
            if missing:
                raise BadRequestError("bad_request", f"missing form field {missing[0]!r}")
            async with lock:
                published = await asyncio.to_thread(_publish, settings, form, work)
        except ClientDisconnect:
            log.info("upload.client_disconnected")
            return _error("bad_request", "the client went away during the upload", 400)
        except BadRequestError as exc:
            return _error(exc.code, exc.message, exc.status)
        except UploadError as exc:
            return _error(exc.code, str(exc), exc.status, exc.field)
        except RepositoryError as exc:
            log.error("upload.repository_error", error=str(exc))
            return _error(exc.code, f"the service cannot publish: {exc}", 500)
        finally:
            form.close()
            await asyncio.to_thread(shutil.rmtree, work, True)
        return JSONResponse(published, status_code=201)

    return router


def _publish(settings: PublishSettings, form: FormReader, work: Path) -> dict[str, Any]:
    texts = form.texts
    path, filename = form.files["file"]
    test_input = form.files.get("test_input", (None, None))[0]
    try:
        tolerances = {k: float(texts[k]) for k in ("rtol", "atol") if k in texts}
    except ValueError:
        raise BadRequestError("bad_request", "rtol and atol must be numbers") from None
    if any(not 0 <= v < 1e6 for v in tolerances.values()):
        raise BadRequestError("bad_request", "rtol and atol must be >= 0")
    published = publish_upload(settings.repository(), path, texts.get("name", ""), texts.get("version", ""),
                               pre=texts.get("pre"), post=texts.get("post"), test_input=test_input,
                               limits=settings.limits, filename=filename, description=texts.get("description"),
                               work_dir=work, expiry=settings.expiry(), **tolerances)
    return published.to_dict()
