"""(name, value) pairs from a FHIR Parameters request body, shared by the operations that take one
($synthesize, POST $export)."""

from __future__ import annotations

from typing import Any

import orjson

from fhirsynth.api.errors import ApiError


def parameters_items(body: bytes) -> list[tuple[str, Any]]:
    """(name, value[x]) pairs in body order; the value keeps its JSON type (a string, a number, a Reference dict)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not JSON: {exc}", code="invalid") from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise ApiError(400, "body must be a FHIR Parameters resource", code="invalid")
    params = doc.get("parameter") or []
    if not isinstance(params, list):
        raise ApiError(400, "Parameters.parameter must be a list", code="invalid")
    items = []
    for p in params:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise ApiError(400, "each Parameters.parameter must be an object with a string name", code="invalid")
        values = [v for k, v in p.items() if k.startswith("value")]
        if not p.get("name") or len(values) != 1:
            raise ApiError(400, f"parameter {p.get('name')!r} needs exactly one value[x]", code="invalid",
                           expression=p.get("name") or None)
        items.append((p["name"], values[0]))
    return items
