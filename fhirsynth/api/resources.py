"""Read and search routes: GET /{type}/{id}, GET /{type}, POST /{type}/_search.

GET read and search are plain Starlette routes (endpoint(request) -> Response): FastAPI's parameter and
dependency machinery costs more per request than the SQLite lookup and halved read throughput in the benchmark.
They run the same guard and produce the same OperationOutcomes as the FastAPI routes.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response

from fhirsynth.api.context import ServerContext, base_url, fhir_response, lenient, read_form_body, require
from fhirsynth.api.errors import ApiError, error_response
from fhirsynth.errors import StoreError
from fhirsynth.store.query import SearchError
from fhirsynth.api.search import parse_search, run_search
from fhirsynth.store.params import PARAMS


def check_type(rtype: str) -> None:
    if rtype not in PARAMS:
        raise ApiError(404, f"resource type {rtype!r} is not served here (served: {', '.join(PARAMS)})",
                       code="not-supported")


def _plain(guard: Callable[[Request], None], fn: Callable[[Request], Response]):
    async def endpoint(request: Request) -> Response:
        try:
            guard(request)
            return fn(request)
        except (ApiError, SearchError, StoreError) as exc:
            return error_response(exc)

    return endpoint


def add_routes(router: APIRouter, ctx: ServerContext, guard: Callable[[Request], None]) -> None:
    settings = ctx.settings

    def search(request: Request, rtype: str, items: list[tuple[str, str]], tail: str) -> Response:
        check_type(rtype)
        require(request, rtype)
        req = parse_search(rtype, items, settings=settings, lenient=lenient(request, settings.default_handling))
        for t in {t for _, _, t in req.includes} | {src for src, _ in req.revincludes}:
            require(request, t)
        # Blocking SQLite work on the event loop on purpose: index-backed pages take ~1 ms, far less than a
        # thread-pool hop costs, and it keeps one connection per thread.
        return fhir_response(run_search(ctx.store, req, base_url(request, tail), settings))

    def search_get(request: Request) -> Response:
        rtype = request.path_params["rtype"]
        return search(request, rtype, request.query_params.multi_items(), f"/{rtype}")

    @router.post("/{rtype:ftype}/_search", summary="search (POST, form-encoded)")
    async def search_post(rtype: str, request: Request) -> Response:
        items = request.query_params.multi_items() + await read_form_body(request, settings.max_body_bytes)
        return search(request, rtype, items, f"/{rtype}/_search")

    def read(request: Request) -> Response:
        rtype, rid = request.path_params["rtype"], request.path_params["rid"]
        check_type(rtype)
        require(request, rtype)
        body = ctx.store.read(rtype, rid)
        if body is None:
            raise ApiError(404, f"{rtype}/{rid} not found", code="not-found")
        return fhir_response(body, headers={"ETag": 'W/"1"'})

    router.add_route("/{rtype:ftype}/{rid:fid}", _plain(guard, read), methods=["GET"], name="read")
    router.add_route("/{rtype:ftype}", _plain(guard, search_get), methods=["GET"], name="search")
