"""The endpoint is read-only: writes on resources are 405, anything else unknown is 404 (as OperationOutcomes)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from fhirsynth.api.errors import ApiError

_ALLOW = {"Allow": "GET, HEAD"}


def add_routes(router: APIRouter) -> None:

    @router.api_route("/{rtype}", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @router.api_route("/{rtype}/{rid}", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    @router.api_route("/", methods=["POST"], include_in_schema=False)
    async def write(request: Request) -> Response:
        raise ApiError(405, f"{request.method} is not allowed: this FHIR endpoint is read-only",
                       code="not-supported", headers=_ALLOW)

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"],
                      include_in_schema=False)
    async def unknown(path: str) -> Response:
        raise ApiError(404, f"no such endpoint: /{path}", code="not-found")

