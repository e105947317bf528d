"""Load and validate mapping TOML files; every problem is collected and raised once as MappingError."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from fhirsynth.errors import MappingError
from fhirsynth.mapping.model import EVENT_KINDS, ElementPath, Mapping, PatientMapping, ResourceMapping

# package data: in a source checkout fhirsynth/data/mappings is a link to the top-level mappings/, and the wheel
# carries the files themselves, so a plain `pip install` finds them
MAPPINGS_DIR = Path(__file__).resolve().parents[1] / "data" / "mappings"
BUILTIN: dict[str, str] = {"us-core": "us-core.toml", "ips": "ips.toml"}
SUPPORTED_VERSIONS = (1,)

_TOP_KEYS = {"version", "name", "description", "Patient", "assemble"}
_COMPONENTS = ("expand", "ignore")

# key -> (kind of value, required)
_RESOURCE_KEYS: dict[str, tuple[str, bool]] = {
    "kind": ("kind", True),
    "patient": ("paths", True),
    "time": ("paths", True),
    "end_time": ("paths", False),
    "code": ("path", True),
    "systems": ("strs", False),
    "display": ("bool", False),
    "value_quantity": ("path", False),
    "value_concept": ("path", False),
    "value_systems": ("strs", False),
    "value_string": ("path", False),
    "status": ("path", False),
    "skip_status": ("strs", False),
    "verification": ("path", False),
    "skip_verification": ("strs", False),
    "category": ("path", False),
    "category_systems": ("strs", False),
    "categories": ("strs", False),
    "encounter": ("path", False),
    "encounter_self": ("bool", False),
    "components": ("components", False),
    "value_code": ("path", False),
    "value_code_system": ("str", False),
    "reason_code": ("path", False),
    "reason_reference": ("path", False),
    "reason_systems": ("strs", False),
    "medication_reference": ("path", False),
}
_PATIENT_KEYS: dict[str, str] = {
    "gender": "path",
    "birth_date": "path",
    "deceased_datetime": "path",
    "deceased_boolean": "path",
    "race_extension": "str",
    "ethnicity_extension": "str",
    "nationality_extension": "str",
    "country": "path",
    "language": "path",
    "identifier_match": "bool",
}


def builtin_dir() -> Path:
    """Where the shipped mappings are: $FHIRSYNTH_MAPPINGS_DIR, the package's copy, or ./mappings (container)."""
    env = os.environ.get("FHIRSYNTH_MAPPINGS_DIR")
    candidates = [Path(env)] if env else []
    candidates += [MAPPINGS_DIR, Path.cwd() / "mappings"]
    for cand in candidates:
        if (cand / BUILTIN["us-core"]).is_file():
            return cand
    return candidates[0]


def resolve_mapping_path(name_or_path: str | Path) -> Path:
    """'us-core' / 'ips' name the shipped files; anything else is a path."""
    key = str(name_or_path)
    if key in BUILTIN:
        return builtin_dir() / BUILTIN[key]
    return Path(key)


def load_mapping(name_or_path: str | Path) -> Mapping:
    path = resolve_mapping_path(name_or_path)
    where = str(path)
    if not path.is_file():
        known = ", ".join(BUILTIN)
        raise MappingError([f"mapping file not found (built-in names: {known})"], where=where)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise MappingError([f"invalid TOML: {exc}"], where=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError([f"cannot read: {exc}"], where=where) from None
    return parse_mapping(data, path)


def _path(value: str) -> ElementPath:
    return tuple(value.split("."))


class _Checker:
    """Collects problems as `[Table].key: message` so all of them are reported together."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def value(self, key: str, kind: str, raw: Any) -> Any:
        if kind in ("path", "str"):
            if not isinstance(raw, str) or not raw.strip():
                return self.bad(key, f"expected a non-empty string, got {raw!r}")
            if kind == "path" and any(not part for part in raw.split(".")):
                return self.bad(key, f"malformed element path {raw!r}")
            return _path(raw) if kind == "path" else raw
        if kind in ("paths", "strs"):
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
                return self.bad(key, f"expected a list of strings, got {raw!r}")
            if kind == "paths":
                if not raw:
                    return self.bad(key, "expected at least one element path")
                bad = [x for x in raw if any(not part for part in x.split("."))]
                if bad:
                    return self.bad(key, f"malformed element path(s) {bad!r}")
                return tuple(_path(x) for x in raw)
            return tuple(raw)
        if kind == "bool":
            if not isinstance(raw, bool):
                return self.bad(key, f"expected true or false, got {raw!r}")
            return raw
        if kind == "kind":
            if raw not in EVENT_KINDS:
                return self.bad(key, f"expected one of {', '.join(EVENT_KINDS)}, got {raw!r}")
            return raw
        if kind == "components":
            if raw not in _COMPONENTS:
                return self.bad(key, f"expected one of {', '.join(_COMPONENTS)}, got {raw!r}")
            return raw
        raise AssertionError(kind)


def parse_mapping(data: dict[str, Any], path: Path) -> Mapping:
    chk = _Checker()
    version = data.get("version")
    if version is None:
        chk.bad("version", "missing (this loader reads version = 1)")
    elif not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        chk.bad("version", f"unsupported version {version!r} (this loader reads {SUPPORTED_VERSIONS})")
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        chk.bad("name", f"expected a string, got {name!r}")
        name = path.stem
    description = data.get("description", "")
    if not isinstance(description, str):
        chk.bad("description", f"expected a string, got {description!r}")
        description = ""
    assemble = data.get("assemble", {})
    if not isinstance(assemble, dict):
        chk.bad("assemble", "expected a table")
        assemble = {}

    patient = _parse_patient(data.get("Patient"), chk)
    resources: dict[str, ResourceMapping] = {}
    for key, table in data.items():
        if key in _TOP_KEYS:
            continue
        if not isinstance(table, dict):
            chk.bad(key, "unknown top-level key (expected version, name, description, Patient, assemble or a "
                         "resource table such as [Observation])")
            continue
        if not key[:1].isupper() or not key.isalnum():
            chk.bad(f"[{key}]", "a resource table must be named after a FHIR resource type, e.g. [Observation]")
            continue
        rm = _parse_resource(key, table, chk)
        if rm is not None:
            resources[key] = rm
    if not resources and not any(isinstance(v, dict) for k, v in data.items() if k not in _TOP_KEYS):
        chk.bad("(file)", "no resource tables: add at least one, e.g. [Condition]")
    if chk.problems:
        raise MappingError(chk.problems, where=str(path))
    return Mapping(
        name=name, version=int(version), path=path, description=description, patient=patient,
        resources=resources, assemble=dict(assemble),
    )


def _parse_patient(table: Any, chk: _Checker) -> PatientMapping:
    if table is None:
        chk.bad("[Patient]", "missing table (patients give every event its person)")
        return PatientMapping()
    if not isinstance(table, dict):
        chk.bad("Patient", "expected a table")
        return PatientMapping()
    kwargs: dict[str, Any] = {}
    for key, raw in table.items():
        kind = _PATIENT_KEYS.get(key)
        if kind is None:
            chk.bad(f"[Patient].{key}", f"unknown key (known: {', '.join(sorted(_PATIENT_KEYS))})")
            continue
        val = chk.value(f"[Patient].{key}", kind, raw)
        if val is not None:
            kwargs[key] = val
    return PatientMapping(**kwargs)


def _parse_resource(rtype: str, table: dict[str, Any], chk: _Checker) -> ResourceMapping | None:
    kwargs: dict[str, Any] = {}
    before = len(chk.problems)
    for key, raw in table.items():
        spec = _RESOURCE_KEYS.get(key)
        if spec is None:
            chk.bad(f"[{rtype}].{key}", f"unknown key (known: {', '.join(sorted(_RESOURCE_KEYS))})")
            continue
        val = chk.value(f"[{rtype}].{key}", spec[0], raw)
        if val is not None:
            kwargs[key] = val
    for key, (_, required) in _RESOURCE_KEYS.items():
        if required and key not in table:
            chk.bad(f"[{rtype}].{key}", "missing (required)")
    if kwargs.get("components") == "expand" and kwargs.get("kind", "observation") != "observation":
        chk.bad(f"[{rtype}].components", "component expansion is only defined for observations")
    if "value_code_system" in kwargs and "value_code" not in kwargs:
        chk.bad(f"[{rtype}].value_code_system", "needs value_code (the element whose code it qualifies)")
    # both fill value_*: the extractor reads value_code / the reason instead of the measured value, never both
    extra = [k for k in ("value_code", "reason_code", "reason_reference") if k in kwargs]
    measured = [k for k in ("value_quantity", "value_concept", "value_string") if k in kwargs]
    if extra and measured:
        chk.bad(f"[{rtype}].{extra[0]}", f"cannot be combined with {', '.join(measured)} (both would fill value_*)")
    if len(chk.problems) != before:
        return None
    for key in ("skip_status", "skip_verification"):
        if key in kwargs:
            kwargs[key] = frozenset(kwargs[key])
    return ResourceMapping(resource_type=rtype, **kwargs)
