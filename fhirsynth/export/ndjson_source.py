"""NDJSON (Bulk Data layout) as transactions to load: one resource type after another, in dependency order.

A Bulk Data export holds one resource type per file and references as `Type/id`. Loading it type by type, Patient
first and Provenance last, with every resource PUT under its own id, means every reference points at something
stored by an earlier stage: each stage is chunked into transactions of at most max_entries resources, streamed
from the files (memory does not grow with the export).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from fhirsynth.errors import LoadError

# stage of a type: referenced types before the types that reference them; Provenance points at everything
_STAGE = {"Patient": 0, "Practitioner": 1, "Organization": 1, "Location": 1, "Device": 1, "Medication": 1,
          "Encounter": 2, "Provenance": 9}


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


def stages(files: list[NdjsonFile]) -> list[list[NdjsonFile]]:
    out: dict[int, list[NdjsonFile]] = {}
    for f in files:
        out.setdefault(f.stage, []).append(f)
    return [out[k] for k in sorted(out)]


def transactions(files: list[NdjsonFile], max_entries: int, *, batch: bool = False) -> Iterator[tuple[str, dict]]:
    """(label, transaction Bundle) of at most max_entries PUT entries, streamed from the files of one stage."""
    for f in files:
        entries: list[dict] = []
        first = 1
        with _open(f.path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    r = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise LoadError(f"invalid JSON: {exc.msg}", where=f"{f.path}:{lineno}") from None
                if not isinstance(r, dict) or not r.get("resourceType") or not r.get("id"):
                    raise LoadError("not a FHIR resource with an id", where=f"{f.path}:{lineno}")
                entries.append({"resource": r,
                                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}})
                if len(entries) == max_entries:
                    yield f"{f.path.name}:{first}-{lineno}", _bundle(entries, batch)
                    entries, first = [], lineno + 1
        if entries:
            yield f"{f.path.name}:{first}-end", _bundle(entries, batch)


def _bundle(entries: list[dict], batch: bool) -> dict:
    return {"resourceType": "Bundle", "type": "batch" if batch else "transaction", "entry": entries}
