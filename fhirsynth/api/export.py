"""Bulk Data Access IG ($export): kick-off (GET with query parameters or POST with a Parameters body), status
polling, cancel (DELETE), streamed NDJSON downloads.

Kick-off parameters: _type, _since, _outputFormat, _typeFilter (a FHIR search per type, compiled by the same
search machinery as GET /{type}; several for one type are OR-ed) and, in a POST body at patient or group level,
patient (Reference: export only these patients). Anything else is a 400 unless `Prefer: handling=lenient`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from fhirsynth.api.bulk import PENDING, ExportJob, admit
from fhirsynth.api.context import (ServerContext, base_url, fhir_response, lenient, prefers_async, read_body,
                                   require)
from fhirsynth.api.errors import ApiError, outcome
from fhirsynth.api.parameters import parameters_items
from fhirsynth.api.search import CONTROL, parse_search
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.dates import DateFormatError, parse_instant
from fhirsynth.store.params import COMPARTMENT_TYPES, RESOURCE_TYPES
from fhirsynth.store.query import SearchError, compile_clause

NDJSON_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
STATUS_PATH = "$export-poll-status"
FILE_PATH = "$export-file"
SUPPORTED = "_type, _since, _outputFormat, _typeFilter, patient (POST body)"


@dataclass
class ExportRequest:
    types: list[str]
    since: float | None = None
    filters: dict[str, list[tuple[str, list]]] = field(default_factory=dict)
    patients: list[str] | None = None  # POST `patient` parameters


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string value (valueString / valueInstant), got {value!r}",
                       code="invalid", expression=name)
    return value


def compile_type_filter(value: str, allowed: tuple[str, ...], settings: ServerSettings,
                        lenient_mode: bool) -> tuple[str, tuple[str, list]]:
    """`Observation?code=http://loinc.org|8867-4&date=ge2020` -> ("Observation", (SQL on resources r, args)).

    The query part is URL-encoded like any search query; its parameters go through parse_search, so names,
    modifiers and values are checked exactly as in GET /Observation?... and compile to the same index lookups.
    """
    rtype, sep, query = value.partition("?")
    if not sep or not rtype:
        raise ApiError(400, f"_typeFilter={value!r} must be TYPE?QUERY, e.g. Observation?code=http://loinc.org|"
                       "8867-4", code="invalid", expression="_typeFilter")
    if rtype not in allowed:
        raise ApiError(400, f"_typeFilter={value!r}: cannot export {rtype} at this level (allowed: "
                       f"{', '.join(allowed)})", code="invalid", expression="_typeFilter")
    items = parse_qsl(query, keep_blank_values=True)
    if not items:
        raise ApiError(400, f"_typeFilter={value!r} has no search parameter", code="invalid",
                       expression="_typeFilter")
    for key, _ in items:
        name = key.partition(":")[0]
        if name in CONTROL:
            raise ApiError(400, f"_typeFilter={value!r}: {key} is not allowed in _typeFilter (only search "
                           "parameters select resources)", code="not-supported", expression=f"_typeFilter {key}")
    try:
        req = parse_search(rtype, items, settings=settings, lenient=lenient_mode)
    except SearchError as exc:
        raise ApiError(400, f"_typeFilter={value!r}: {exc.message}", code="invalid",
                       expression=f"_typeFilter {exc.param}") from None
    compiled = [compile_clause(c) for c in req.clauses]
    if not compiled:  # every parameter was ignored (Prefer: handling=lenient): the filter selects the whole type
        return rtype, ("1", [])
    return rtype, (" AND ".join(c for c, _ in compiled), [a for _, args in compiled for a in args])


def parse_export(items: list[tuple[str, Any]], *, level: str, settings: ServerSettings, lenient_mode: bool,
                 body: bool) -> ExportRequest:
    allowed = RESOURCE_TYPES if level == "system" else COMPARTMENT_TYPES
    types: list[str] | None = None
    since = None
    filters: list[tuple[str, tuple[str, list]]] = []
    patients: list[str] | None = None
    for k, v in items:
        if k == "_type":
            named = [t.strip() for t in _string(k, v).split(",") if t.strip()]
            bad = [t for t in named if t not in allowed]
            if bad or not named:
                raise ApiError(400, f"_type: cannot export {', '.join(bad) or 'nothing'} at this level "
                               f"(allowed: {', '.join(allowed)})", code="invalid", expression="_type")
            types = (types or []) + [t for t in named if t not in (types or [])]  # repeated _type: union
        elif k == "_since":
            if since is not None:
                raise ApiError(400, "_since given twice", code="invalid", expression="_since")
            try:
                since = parse_instant(_string(k, v))
            except DateFormatError as exc:
                raise ApiError(400, f"_since: {exc}", code="invalid", expression="_since") from None
        elif k == "_outputFormat":
            if _string(k, v).replace(" ", "+") not in NDJSON_FORMATS:  # an unencoded "+" arrives as a space
                raise ApiError(400, f"_outputFormat={v} is not supported (use application/fhir+ndjson)",
                               code="not-supported", expression="_outputFormat")
        elif k == "_typeFilter":
            filters.append(compile_type_filter(_string(k, v), allowed, settings, lenient_mode))
        elif k == "patient" and body and level != "system":
            ref = v.get("reference") if isinstance(v, dict) else None
            parts = ref.split("/") if isinstance(ref, str) else []
            if len(parts) < 2 or parts[-2] != "Patient" or not parts[-1]:
                raise ApiError(400, f"patient must be a valueReference to Patient/ID, got {v!r}", code="invalid",
                               expression="patient")
            patients = (patients or []) + [parts[-1]]
        elif k == "_format":
            continue
        elif not lenient_mode:
            where = "system-level $export takes no patient parameter; " if k == "patient" else ""
            raise ApiError(400, f"{where}$export parameter {k!r} is not supported (supported: {SUPPORTED})",
                           code="not-supported", expression=k)
    req = ExportRequest(types=types or list(allowed), since=since, patients=patients)
    for rtype, cond in filters:
        if rtype in req.types:  # a filter on a type that _type leaves out selects nothing more to export
            req.filters.setdefault(rtype, []).append(cond)
    return req


def add_routes(router: APIRouter, ctx: ServerContext) -> None:
    settings = ctx.settings

    def kick_off(request: Request, items: list[tuple[str, Any]], tail: str, *, level: str,
                 group_id: str | None = None, body: bool = False) -> Response:
        if not prefers_async(request):
            raise ApiError(400, "$export needs the header 'Prefer: respond-async'", code="required")
        req = parse_export(items, level=level, settings=settings, body=body,
                           lenient_mode=lenient(request, settings.default_handling))
        for t in req.types:
            require(request, t)
        members = None
        if group_id is not None:
            raw = ctx.store.read("Group", group_id)
            if raw is None:
                raise ApiError(404, f"Group/{group_id} not found", code="not-found")
            group = orjson.loads(raw)
            members = [m["entity"]["reference"].split("/")[-1] for m in group.get("member") or []
                       if (m.get("entity") or {}).get("reference", "").startswith("Patient/")]
        if req.patients is not None:
            missing = [p for p in req.patients if ctx.store.read("Patient", p) is None]
            if missing:
                raise ApiError(400, f"patient: Patient/{missing[0]} not found", code="not-found",
                               expression="patient")
            # in a Group export, `patient` narrows the group to those of its members
            members = req.patients if members is None else [m for m in members if m in set(req.patients)]
        job = ExportJob(ctx.store, str(request.url), req.types, req.since, members, level != "system",
                        requires_token=ctx.auth_enabled, filters=req.filters, slots=ctx.export_slots)
        with ctx.jobs_lock:
            admit(ctx.jobs, job, max_kept=settings.export_jobs, max_pending=settings.export_pending,
                  expiry_s=settings.export_expiry_s)
        job.start()
        base = base_url(request, tail)
        out = orjson.dumps(outcome(f"export {job.id} started", severity="information", code="informational"))
        return fhir_response(out, 202, headers={"Content-Location": f"{base}/{STATUS_PATH}/{job.id}"})

    async def body_items(request: Request) -> list[tuple[str, Any]]:
        raw = await read_body(request, settings.max_body_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if raw.strip() and ctype not in ("", "application/fhir+json", "application/json"):
            raise ApiError(415, f"POST $export takes a FHIR Parameters resource (application/fhir+json), not "
                           f"{ctype}", code="not-supported")
        # query parameters too (a client may send _format there); the Parameters body carries the rest
        return list(request.query_params.multi_items()) + (parameters_items(raw) if raw.strip() else [])

    @router.get("/$export", summary="system-level Bulk Data export")
    async def export_system(request: Request) -> Response:
        return kick_off(request, request.query_params.multi_items(), "/$export", level="system")

    @router.post("/$export", summary="system-level Bulk Data export (Parameters body)")
    async def export_system_post(request: Request) -> Response:
        return kick_off(request, await body_items(request), "/$export", level="system", body=True)

    @router.get("/Patient/$export", summary="patient-level Bulk Data export")
    async def export_patients(request: Request) -> Response:
        return kick_off(request, request.query_params.multi_items(), "/Patient/$export", level="patient")

    @router.post("/Patient/$export", summary="patient-level Bulk Data export (Parameters body)")
    async def export_patients_post(request: Request) -> Response:
        return kick_off(request, await body_items(request), "/Patient/$export", level="patient", body=True)

    @router.get("/Group/{group_id}/$export", summary="group-level Bulk Data export")
    async def export_group(group_id: str, request: Request) -> Response:
        return kick_off(request, request.query_params.multi_items(), f"/Group/{group_id}/$export", level="group",
                        group_id=group_id)

    @router.post("/Group/{group_id}/$export", summary="group-level Bulk Data export (Parameters body)")
    async def export_group_post(group_id: str, request: Request) -> Response:
        return kick_off(request, await body_items(request), f"/Group/{group_id}/$export", level="group",
                        group_id=group_id, body=True)

    def get_job(job_id: str) -> ExportJob:
        job = ctx.jobs.get(job_id)
        if job is None or job.status == "cancelled":
            raise ApiError(404, f"no export job {job_id} (finished jobs expire, cancelled ones are gone)",
                           code="not-found")
        return job

    @router.get(f"/{STATUS_PATH}/{{job_id}}", summary="Bulk Data status")
    async def status(job_id: str, request: Request) -> Response:
        job = get_job(job_id)
        if job.status in PENDING:
            return Response(status_code=202, headers={"X-Progress": job.progress, "Retry-After": "1"})
        if job.status == "error":
            job.manifest_served = True
            raise ApiError(500, f"export failed: {job.error}", code="exception")
        base = base_url(request, f"/{STATUS_PATH}/{job_id}")
        expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(job.created + settings.export_expiry_s))
        return Response(job.manifest(f"{base}/{FILE_PATH}/{job.id}"), media_type="application/json",
                        headers={"Expires": expires})

    @router.delete(f"/{STATUS_PATH}/{{job_id}}", summary="cancel or delete an export")
    async def cancel(job_id: str) -> Response:
        job = get_job(job_id)
        job.cancel()
        with ctx.jobs_lock:
            ctx.jobs.pop(job_id, None)
        out = orjson.dumps(outcome(f"export {job_id} cancelled", severity="information", code="informational"))
        return fhir_response(out, 202)

    @router.get(f"/{FILE_PATH}/{{job_id}}/{{name}}", summary="download one export file (NDJSON, streamed)")
    async def download(job_id: str, name: str) -> Response:
        job = get_job(job_id)
        rtype = name.removesuffix(".ndjson")
        if job.status != "done" or rtype not in dict(job.outputs):
            raise ApiError(404, f"export {job_id} has no file {name}", code="not-found")
        return StreamingResponse(job.stream(rtype), media_type="application/fhir+ndjson")
