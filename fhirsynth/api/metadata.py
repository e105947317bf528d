"""GET /metadata: a CapabilityStatement generated from the same registry the store indexes with."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request, Response

from fhirsynth import __version__
from fhirsynth.api.context import ServerContext, base_url, fhir_response

from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.dates import format_instant
from fhirsynth.store.params import INCLUDES, PARAMS, REVINCLUDES, SORT_DATE_PARAM

_MODIFIERS = {"token": ":missing :not :text", "date": ":missing; prefixes eq ne lt gt le ge sa eb; partial dates",
              "quantity": ":missing; prefixes eq ne lt gt le ge sa eb; [prefix]number[|system|code]",
              "reference": ":missing, :[type]; id, Type/id or absolute URL",
              "string": ":missing :exact :contains; default is case/accent-insensitive starts-with"}


def capability_statement(settings: ServerSettings, base: str, synthesize: bool) -> dict:
    resources = []
    for rtype, params in PARAMS.items():
        search = [{"name": "_id", "type": "token", "documentation": "logical id; comma = OR"}]
        search += [{"name": p.name, "type": p.type, "documentation": f"{p.expression}. {_MODIFIERS[p.type]}"}
                   for p in params.values()]
        sorts = ["_id", "_lastUpdated"] + ([SORT_DATE_PARAM[rtype]] if rtype in SORT_DATE_PARAM else [])
        res = {
            "type": rtype,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "versioning": "no-version", "readHistory": False, "updateCreate": False,
            "searchParam": search,
            "documentation": f"_sort: {', '.join(sorts)}, each with an optional '-' for descending; several "
                             "keys separated by commas sort by the first, then the next (e.g. "
                             f"{sorts[-1]},-_id)",
        }
        inc = [f"{s}:{p}" for s, p in INCLUDES if s == rtype]
        if inc:
            res["searchInclude"] = inc
        rev = [f"{s}:{p}" for s, p in REVINCLUDES.get(rtype, [])]
        if rev:
            res["searchRevInclude"] = rev
        if rtype == "Patient":
            res["operation"] = [{"name": "everything", "definition":
                                 "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
                                {"name": "export", "definition":
                                 "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]
            if synthesize:
                res["operation"].append({"name": "synthesize", "definition": f"{base}/OperationDefinition/synthesize",
                                         "documentation": "POST with Parameters or query: count, seed, sex "
                                         "(male|female|other|unknown), age (N or MIN-MAX), condition (SYSTEM|CODE); "
                                         "samples new patients from the differentially private model, stores "
                                         "them and returns a collection Bundle"})
        if rtype == "Group":
            res["operation"] = [{"name": "export", "definition":
                                 "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]
        resources.append(res)
    security: dict = {"cors": bool(settings.cors_origins)}
    if settings.token or settings.scoped_tokens:
        security["service"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                            "code": "SMART-on-FHIR"}]}]
        security["description"] = ("Bearer token required (Authorization: Bearer ...). Scopes in SMART Backend "
                                   "Services style: system/<Type|*>.<read|write|*> or v2 system/<Type|*>.rs")
    return {
        "resourceType": "CapabilityStatement",
        "status": "active", "date": format_instant(time.time()), "kind": "instance",
        "publisher": "fhirsynth",
        "software": {"name": "fhirsynth", "version": __version__},
        "implementation": {"description": "fhirsynth synthetic FHIR server (every resource tagged HTEST)",
                           "url": base},
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "fhirVersion": "4.0.1", "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": (f"Read-only (writes: 405). _count default {settings.default_count}, maximum "
                              f"{settings.max_count}: larger values are clamped and an OperationOutcome warning "
                              "entry (search.mode=outcome) is added. _summary=count|false, _elements, _total="
                              "none|estimate|accurate, comma = OR, repeated parameter = AND. Unknown parameters: "
                              f"400 unless 'Prefer: handling=lenient' (default {settings.default_handling})."),
            "security": security,
            "resource": resources,
            "searchParam": [{"name": n, "type": t} for n, t in (("_count", "number"), ("_sort", "string"),
                                                                ("_summary", "token"), ("_elements", "string"),
                                                                ("_total", "token"), ("_lastUpdated", "date"))],
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                           "documentation": "Prefer: respond-async; GET with query parameters or POST with a "
                           "Parameters body; _type, _since, _outputFormat=application/fhir+ndjson, _typeFilter "
                           "(TYPE?search-query, any search parameter of TYPE; several for one type are OR-ed), "
                           "patient (POST, Patient/$export and Group/[id]/$export); poll the Content-Location "
                           "(Retry-After); DELETE cancels. Too many jobs at once: 429 with Retry-After"},
                          {"name": "privacy-report", "definition": f"{base}/$privacy-report",
                           "documentation": "GET: Parameters with the differential-privacy guarantee (epsilon, "
                           "delta, unit, accountants) of the model behind this data and its evaluation metrics, "
                           "privacy.json and report.json attached"}],
        }],
    }


def synthesize_definition(base: str) -> dict:
    def param(name: str, use: str, ptype: str, doc: str, lo: int = 0, hi: str = "1") -> dict:
        return {"name": name, "use": use, "min": lo, "max": hi, "type": ptype, "documentation": doc}

    return {
        "resourceType": "OperationDefinition", "id": "synthesize", "url": f"{base}/OperationDefinition/synthesize",
        "name": "Synthesize", "title": "Generate synthetic patients", "status": "active", "kind": "operation",
        "code": "synthesize", "system": False, "type": True, "instance": False, "resource": ["Patient"],
        "affectsState": True,
        "description": "Samples new patients from the loaded differentially private model (no real record is "
                       "released: sampling is post-processing of the DP model), stores them (tagged HTEST) and "
                       "returns them in a collection Bundle.",
        "parameter": [
            param("count", "in", "integer", "patients to generate (1 to the server maximum, default 1)"),
            param("seed", "in", "integer", "sampling seed (default: a fresh one per call)"),
            param("sex", "in", "code", "administrative gender: male | female | other | unknown"),
            param("age", "in", "string", "age in years: N or MIN-MAX"),
            param("condition", "in", "string", "SYSTEM|CODE of a condition every patient must have"),
            param("return", "out", "Bundle", "the new resources (Patient, Encounter, Condition, Observation, "
                  "the medications, immunizations, procedures and allergies the model samples, Provenance)", 1),
        ],
    }


def add_routes(router: APIRouter, ctx: ServerContext) -> None:
    @router.get("/OperationDefinition/synthesize", summary="definition of $synthesize")
    async def synthesize_def(request: Request) -> Response:
        base = base_url(request, "/OperationDefinition/synthesize")
        return fhir_response(orjson.dumps(synthesize_definition(base)))


    @router.get("/metadata", summary="CapabilityStatement")
    async def metadata(request: Request) -> Response:
        cs = capability_statement(ctx.settings, base_url(request, "/metadata"), ctx.settings.model_dir is not None)
        return fhir_response(orjson.dumps(cs))

