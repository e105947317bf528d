"""build_router(settings): the whole FHIR API as one APIRouter, mountable under any prefix of any FastAPI app.

    app.include_router(build_router(ServerSettings(db_path=...)), prefix="/fhir")

Routes are registered flat on one router (nested routers cost a match per level on every request), hot routes
first. Path convertors keep them from swallowing operations: a type starts with a capital letter and an id is a
FHIR id ([A-Za-z0-9-.]{1,64}), so "/Patient/$export" or "/metadata" never reach the read or search route.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.convertors import CONVERTOR_TYPES, StringConvertor, register_url_convertor

from fhirsynth.api import everything, export, metadata, privacy, readonly, resources, synthesize
from fhirsynth.api.context import Auth, ServerContext, check_format
from fhirsynth.api.errors import ApiError, FhirRoute, error_response
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.sqlite import Store


class _TypeConvertor(StringConvertor):
    regex = "[A-Z][A-Za-z]{0,63}"


class _IdConvertor(StringConvertor):
    regex = "[A-Za-z0-9\\-\\.]{1,64}"


def _register_convertors() -> None:
    if "ftype" not in CONVERTOR_TYPES:
        register_url_convertor("ftype", _TypeConvertor())
        register_url_convertor("fid", _IdConvertor())


def build_router(settings: ServerSettings, *, store: Store | None = None) -> APIRouter:
    """The router gets `.context` (ServerContext); call router.context.close() on shutdown."""
    _register_convertors()
    store = store if store is not None else Store(settings.db_path)
    auth = Auth(settings)
    ctx = ServerContext(settings=settings, store=store, auth_enabled=auth.enabled)

    def guard(request: Request) -> None:
        # Called from the route wrapper rather than as a FastAPI dependency: dependency resolution costs more
        # than the whole read path.
        check_format(request)
        if len(request.query_params) > settings.max_params:
            raise ApiError(400, f"too many query parameters (max {settings.max_params})", code="too-costly")
        if auth.enabled and not request.url.path.endswith("/metadata"):
            request.state.scopes = auth.scopes(request)

    class GuardedRoute(FhirRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    guard(request)
                except ApiError as exc:
                    return error_response(exc)
                return await handler(request)

            return guarded

    router = APIRouter(route_class=GuardedRoute)
    metadata.add_routes(router, ctx)  # before read: /OperationDefinition/synthesize looks like a read
    resources.add_routes(router, ctx, guard)
    export.add_routes(router, ctx)
    everything.add_routes(router, ctx)
    synthesize.add_routes(router, ctx)
    privacy.add_routes(router, ctx)
    readonly.add_routes(router)
    router.context = ctx  # type: ignore[attr-defined]
    return router
