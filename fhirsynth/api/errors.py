"""Every error leaves the API as an OperationOutcome with the right HTTP status.

FhirRoute wraps each endpoint of the router, so this also holds when the router is mounted inside another
FastAPI application that has its own exception handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from fhirsynth.errors import StoreError
from fhirsynth.store.query import SearchError

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str = "processing", severity: str = "error",
                 headers: dict[str, str] | None = None, expression: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.severity = status, message, code, severity
        self.headers = headers or {}
        self.expression = expression


def outcome(message: str, *, code: str = "processing", severity: str = "error",
            expression: str | None = None) -> dict:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(status: int, message: str, *, code: str = "processing", severity: str = "error",
                     headers: dict[str, str] | None = None, expression: str | None = None) -> Response:
    body = orjson.dumps(outcome(message, code=code, severity=severity, expression=expression))
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def error_response(exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return outcome_response(exc.status, exc.message, code=exc.code, severity=exc.severity, headers=exc.headers,
                                expression=exc.expression)
    if isinstance(exc, SearchError):
        return outcome_response(400, str(exc), code="invalid", expression=exc.param)
    if isinstance(exc, RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return outcome_response(400, f"invalid request: {msgs}", code="invalid")
    if isinstance(exc, StoreError):
        return outcome_response(500, str(exc), code="exception")
    raise exc


class FhirRoute(APIRoute):
    """APIRoute whose handler turns ApiError / SearchError / validation errors into OperationOutcomes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, SearchError, RequestValidationError, StoreError) as exc:
                return error_response(exc)

        return wrapped
