"""Declarative FHIR <-> event rules loaded from mappings/*.toml."""

from fhirsynth.mapping.loader import (
    BUILTIN,
    MAPPINGS_DIR,
    builtin_dir,
    load_mapping,
    parse_mapping,
    resolve_mapping_path,
)
from fhirsynth.mapping.model import ElementPath, Mapping, PatientMapping, ResourceMapping

__all__ = [
    "BUILTIN",
    "MAPPINGS_DIR",
    "builtin_dir",
    "ElementPath",
    "Mapping",
    "PatientMapping",
    "ResourceMapping",
    "load_mapping",
    "parse_mapping",
    "resolve_mapping_path",
]
