"""Bulk Data Access IG ($export): kick-off, status polling, cancel (DELETE), streamed NDJSON downloads."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from fhirsynth.api.bulk import ExportJob
from fhirsynth.api.context import ServerContext, base_url, fhir_response, lenient, prefers_async, require
from fhirsynth.api.errors import ApiError, outcome
from fhirsynth.store.dates import DateFormatError, parse_instant
from fhirsynth.store.params import COMPARTMENT_TYPES, RESOURCE_TYPES

NDJSON_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
STATUS_PATH = "$export-poll-status"
FILE_PATH = "$export-file"


def add_routes(router: APIRouter, ctx: ServerContext) -> None:
    settings = ctx.settings

    def kick_off(request: Request, tail: str, *, level: str, group_id: str | None = None) -> Response:
        if not prefers_async(request):
            raise ApiError(400, "$export needs the header 'Prefer: respond-async'", code="required")
        allowed = RESOURCE_TYPES if level == "system" else COMPARTMENT_TYPES
        types, since = list(allowed), None
        for k, v in request.query_params.multi_items():
            if k == "_type":
                types = [t.strip() for t in v.split(",") if t.strip()]
                bad = [t for t in types if t not in allowed]
                if bad:
                    raise ApiError(400, f"_type: cannot export {', '.join(bad)} at this level "
                                   f"(allowed: {', '.join(allowed)})", code="invalid", expression="_type")
            elif k == "_since":
                try:
                    since = parse_instant(v)
                except DateFormatError as exc:
                    raise ApiError(400, f"_since: {exc}", code="invalid", expression="_since") from None
            elif k == "_outputFormat":
                if v.replace(" ", "+") not in NDJSON_FORMATS:  # an unencoded "+" arrives as a space
                    raise ApiError(400, f"_outputFormat={v} is not supported (use application/fhir+ndjson)",
                                   code="not-supported", expression="_outputFormat")
            elif k == "_format":
                continue
            elif not lenient(request, settings.default_handling):
                raise ApiError(400, f"$export parameter {k!r} is not supported (supported: _type, _since, "
                               "_outputFormat)", code="not-supported", expression=k)
        for t in types:
            require(request, t)
        members = None
        if group_id is not None:
            body = ctx.store.read("Group", group_id)
            if body is None:
                raise ApiError(404, f"Group/{group_id} not found", code="not-found")
            group = orjson.loads(body)
            members = [m["entity"]["reference"].split("/")[-1] for m in group.get("member") or []
                       if (m.get("entity") or {}).get("reference", "").startswith("Patient/")]
        with ctx.jobs_lock:
            now = time.time()
            for jid, job in list(ctx.jobs.items()):
                if now - job.created > settings.export_expiry_s:
                    job.cancel()
                    del ctx.jobs[jid]
            if len(ctx.jobs) >= settings.export_jobs:
                raise ApiError(429, "too many export jobs; DELETE finished ones first", code="throttled",
                               headers={"Retry-After": "10"})
            job = ExportJob(ctx.store, str(request.url), types, since, members, level != "system",
                            requires_token=ctx.auth_enabled)
            ctx.jobs[job.id] = job
        job.start()
        base = base_url(request, tail)
        body = orjson.dumps(outcome(f"export {job.id} started", severity="information", code="informational"))
        return fhir_response(body, 202, headers={"Content-Location": f"{base}/{STATUS_PATH}/{job.id}"})

    @router.get("/$export", summary="system-level Bulk Data export")
    async def export_system(request: Request) -> Response:
        return kick_off(request, "/$export", level="system")

    @router.get("/Patient/$export", summary="patient-level Bulk Data export")
    async def export_patients(request: Request) -> Response:
        return kick_off(request, "/Patient/$export", level="patient")

    @router.get("/Group/{group_id}/$export", summary="group-level Bulk Data export")
    async def export_group(group_id: str, request: Request) -> Response:
        return kick_off(request, f"/Group/{group_id}/$export", level="group", group_id=group_id)

    def get_job(job_id: str) -> ExportJob:
        job = ctx.jobs.get(job_id)
        if job is None or job.status == "cancelled":
            raise ApiError(404, f"no export job {job_id} (finished jobs expire, cancelled ones are gone)",
                           code="not-found")
        return job

    @router.get(f"/{STATUS_PATH}/{{job_id}}", summary="Bulk Data status")
    async def status(job_id: str, request: Request) -> Response:
        job = get_job(job_id)
        if job.status == "running":
            return Response(status_code=202, headers={"X-Progress": job.progress, "Retry-After": "1"})
        if job.status == "error":
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
        body = orjson.dumps(outcome(f"export {job_id} cancelled", severity="information", code="informational"))
        return fhir_response(body, 202)

    @router.get(f"/{FILE_PATH}/{{job_id}}/{{name}}", summary="download one export file (NDJSON, streamed)")
    async def download(job_id: str, name: str) -> Response:
        job = get_job(job_id)
        rtype = name.removesuffix(".ndjson")
        if job.status != "done" or rtype not in dict(job.outputs):
            raise ApiError(404, f"export {job_id} has no file {name}", code="not-found")
        return StreamingResponse(job.stream(rtype), media_type="application/fhir+ndjson")

