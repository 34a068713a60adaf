"""The Models page (the published catalogue) and the console's upload endpoint.

The upload is the API's own endpoint (:func:`cloud_sync.fleet.upload_api.models_router`, the same
streaming parser, caps, checks and signing) mounted a second time at ``/ui/models`` with the console's
guard instead of the bearer token: an admin session, this origin, and the CSRF token in the
``X-CSRF-Token`` header (the body is streamed to disk, so the token cannot come from a form field).
Its JSON errors carry ``field``, which the page shows next to that field.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cloud_sync.fleet.publishing import PublishSettings
from cloud_sync.fleet.server.auth import Role
from cloud_sync.fleet.server.console.web import Con, User, posting

router = APIRouter(include_in_schema=False)


@router.get("/models")
def models_page(console: Con, request: Request, _user: User) -> Response:
    return console.render(request, "models.html", listing=console.catalogue.listing(),
                          publish=console.catalogue.publish)


@router.get("/ui/models")
def catalogue_fragment(console: Con, request: Request, _user: User) -> Response:
    return console.render(request, "_catalogue.html", listing=console.catalogue.listing())


def upload_router(publish: PublishSettings) -> APIRouter:
    from cloud_sync.fleet.upload_api import models_router

    return models_router(publish, posting(Role.admin, header_only=True), prefix="/ui/models", tags=["console"])
