"""Per-application state (settings, store, export jobs) and the checks every request goes through."""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from fastapi import Request, Response

from fhirsynth.api.errors import FHIR_JSON, ApiError
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.sqlite import Store

_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}


@dataclass
class ServerContext:
    settings: ServerSettings
    store: Store
    jobs: dict = field(default_factory=dict)  # export job id -> ExportJob
    jobs_lock: threading.Lock = field(default_factory=threading.Lock)
    auth_enabled: bool = False  # manifests say requiresAccessToken accordingly
    export_slots: threading.Semaphore = field(init=False)  # export jobs counting at once

    def __post_init__(self) -> None:
        self.export_slots = threading.Semaphore(max(1, self.settings.export_workers))

    def close(self) -> None:
        for job in list(self.jobs.values()):
            job.cancel()
        self.store.close()


def fhir_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def base_url(request: Request, tail: str) -> str:
    """The FHIR base URL, found by removing the known tail of this route from the request path.

    Works behind any prefix, mount or root_path without configuration.
    """
    url = str(request.url.replace(query="", fragment=""))
    return url[: len(url) - len(tail)] if tail and url.endswith(tail) else url.rstrip("/")


def check_format(request: Request) -> None:
    """406 unless the client accepts JSON: `_format` (json / application/fhir+json) or the Accept header."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt.split(";")[0].strip().lower().replace(" ", "+") not in _JSON_FORMATS:
        raise ApiError(406, f"_format={fmt} is not supported; this server speaks application/fhir+json",
                       code="not-supported")
    accept = request.headers.get("accept")
    if fmt is None and accept:
        types = [a.split(";")[0].strip().lower() for a in accept.split(",")]
        # application/json+fhir is the DSTU2-era name that older clients (e.g. HAPI 1.x-3.x) still send
        if not any(t in ("*/*", "application/*", "application/fhir+json", "application/json",
                         "application/json+fhir", "application/fhir+ndjson", "application/ndjson")
                   or t.endswith("+json") for t in types):
            raise ApiError(406, f"cannot produce any of Accept: {accept}; this server speaks application/fhir+json",
                           code="not-supported")


def _scope_allows(scope: str, rtype: str, action: str) -> bool:
    # SMART v1 "system/Patient.read", "system/*.write", "system/*.*" and v2 "system/Patient.rs", "system/*.cruds"
    ctx, _, rest = scope.partition("/")
    if ctx not in ("system", "user", "patient") or "." not in rest:
        return False
    stype, _, perm = rest.partition(".")
    if stype not in ("*", rtype):
        return False
    if perm in ("*", action):
        return True
    letters = {"read": "rs", "write": "cud"}[action]
    return set(perm) <= set("cruds") and any(c in perm for c in letters)


class Auth:
    def __init__(self, settings: ServerSettings) -> None:
        self.tokens: dict[str, list[str]] = {t: s.split() for t, s in settings.scoped_tokens.items()}
        if settings.token:
            self.tokens[settings.token] = ["system/*.*"]
        self.enabled = bool(self.tokens)

    def scopes(self, request: Request) -> list[str] | None:
        """None when auth is off; else the caller's scopes (401 without a known bearer token)."""
        if not self.enabled:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        scopes = None
        if scheme.lower() == "bearer":
            given = token.strip().encode()
            for known, known_scopes in self.tokens.items():  # constant-time compare: no timing oracle on tokens
                if hmac.compare_digest(given, known.encode()):
                    scopes = known_scopes
        if scopes is None:
            raise ApiError(401, "a valid bearer token is required" if header else "authentication required",
                           code="login", headers={"WWW-Authenticate": 'Bearer realm="fhirsynth"'})
        return scopes


def require(request: Request, rtype: str, action: str = "read") -> None:
    scopes = getattr(request.state, "scopes", None)
    if scopes is None:
        return
    if not any(_scope_allows(s, rtype, action) for s in scopes):
        raise ApiError(403, f"token scopes do not allow {action} of {rtype}", code="forbidden")


def lenient(request: Request, default: str) -> bool:
    """Prefer: handling=lenient|strict (FHIR R4 3.1.1.4); the header may carry other preferences too."""
    prefer = request.headers.get("prefer", "")
    for part in prefer.split(","):
        k, _, v = part.strip().partition("=")
        if k.strip().lower() == "handling":
            return v.strip().strip('"').lower() == "lenient"
    return default == "lenient"


def prefers_async(request: Request) -> bool:
    return any(p.strip().lower() == "respond-async" for p in request.headers.get("prefer", "").split(","))


async def read_form_body(request: Request, limit: int) -> list[tuple[str, str]]:
    """Form-encoded POST body (for _search), refusing bodies over `limit` bytes."""
    body = await read_body(request, limit)
    ctype = request.headers.get("content-type", "application/x-www-form-urlencoded").split(";")[0].strip()
    if body and ctype != "application/x-www-form-urlencoded":
        raise ApiError(415, "POST _search takes application/x-www-form-urlencoded", code="not-supported")
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8", code="invalid") from None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="too-costly")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="too-costly")
        chunks.append(chunk)
    return b"".join(chunks)
