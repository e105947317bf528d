"""NDJSON (Bulk Data layout) as transactions to load: one resource type after another, in dependency order.

A Bulk Data export holds one resource type per file and references as `Type/id`. Loading it type by type, each
type after the types its resources refer to (read from the data; Patient first and Provenance last in fhirsynth's
own exports), means every reference points at something stored by an earlier stage: each stage is chunked into
transactions of at most max_entries resources, streamed from the files (memory does not grow with the export).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from fhirsynth.errors import LoadError
from fhirsynth.export.bundles import iter_references, reference_parts

# stage of a type: referenced types before the types that reference them; Provenance points at everything
_STAGE = {"Patient": 0, "Practitioner": 1, "Organization": 1, "Location": 1, "Device": 1, "Medication": 1,
          "Encounter": 2, "Provenance": 9,
          # after Conditions (the default stage): they name the Condition they treat in reasonReference
          "MedicationRequest": 6, "MedicationStatement": 6, "Procedure": 6}


def dependency_rank(rtype: str | None) -> int:
    """Loading order of a resource type: what is referenced comes before what references it."""
    return _STAGE.get(rtype or "", 5)


@dataclass(frozen=True)
class NdjsonFile:
    path: Path
    rtype: str

    @property
    def stage(self) -> int:
        return dependency_rank(self.rtype)


def is_ndjson(path: Path) -> bool:
    return path.name.endswith((".ndjson", ".ndjson.gz"))


def _open(path: Path):  # noqa: ANN202 - a binary file object
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _first_type(path: Path) -> str:
    with _open(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    return str(orjson.loads(line).get("resourceType"))
                except (orjson.JSONDecodeError, AttributeError):
                    raise LoadError("not NDJSON of FHIR resources (line 1)", where=str(path)) from None
    return ""


def ndjson_files(paths: list[Path], types: dict[Path, str] | None = None) -> list[NdjsonFile]:
    """The files with their resource type (from the manifest when known, else their first line), in stage order."""
    found = [NdjsonFile(p, (types or {}).get(p) or _first_type(p)) for p in paths]
    return sorted((f for f in found if f.rtype), key=lambda f: f.stage)


def referenced_types(path: Path) -> set[str]:
    """Resource types that the resources of one NDJSON file refer to by `Type/id` (a base URL or version dropped)."""
    return {parts[0] for _, r in _resources(path) for ref in iter_references(r)
            if (parts := reference_parts(ref)) is not None}


def stages_by_references(files: list[NdjsonFile]) -> list[list[NdjsonFile]]:
    """The files grouped so that every type loads after the types its resources refer to, read from the data
    (server-assigned ids need the referenced resource stored first). A cycle between types is broken by the
    static dependency rank; references within one type stay in one stage."""
    types = {f.rtype for f in files}
    needs = {t: set() for t in types}
    for f in files:
        needs[f.rtype] |= (referenced_types(f.path) & types) - {f.rtype}
    layers: list[set[str]] = []
    left = set(types)
    while left:
        ready = {t for t in left if not (needs[t] & left)}
        if not ready:  # a cycle: the lowest static rank goes first
            low = min(dependency_rank(t) for t in left)
            ready = {t for t in left if dependency_rank(t) == low}
        layers.append(ready)
        left -= ready
    return [[f for f in files if f.rtype in layer] for layer in layers]


def _resources(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, resource) of every non-blank line; LoadError naming the line for anything else."""
    with _open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                r = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise LoadError(f"invalid JSON: {exc.msg}", where=f"{path}:{lineno}") from None
            if not isinstance(r, dict) or not r.get("resourceType") or not r.get("id"):
                raise LoadError("not a FHIR resource with an id", where=f"{path}:{lineno}")
            yield lineno, r


def transactions(files: list[NdjsonFile], max_entries: int) -> Iterator[tuple[str, list[dict]]]:
    """(label, at most max_entries resources) streamed from the files of one stage."""
    for f in files:
        resources: list[dict] = []
        first = 1
        for lineno, r in _resources(f.path):
            resources.append(r)
            if len(resources) == max_entries:
                yield f"{f.path.name}:{first}-{lineno}", resources
                resources, first = [], lineno + 1
        if resources:
            yield f"{f.path.name}:{first}-end", resources
