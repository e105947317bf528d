"""create_app(settings): a standalone FastAPI application serving the FHIR API at its root."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhirsynth import __version__
from fhirsynth.api.errors import error_response, outcome_response
from fhirsynth.api.router import build_router
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.sqlite import Store


def create_app(settings: ServerSettings, *, store: Store | None = None) -> FastAPI:
    router = build_router(settings, store=store)
    ctx = router.context  # type: ignore[attr-defined]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.close()

    app = FastAPI(title="fhirsynth FHIR server", version=__version__, lifespan=lifespan,
                  docs_url="/_docs", redoc_url=None, openapi_url="/_openapi.json")
    app.state.context = ctx

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return outcome_response(exc.status_code, str(exc.detail), code="processing")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(exc)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Prefer", "Accept"],
                           expose_headers=["Content-Location", "X-Progress", "Retry-After", "Location"])
    app.include_router(router)
    return app
