"""write_export: stream timelines -> FHIR resources -> an export directory, one patient at a time.

Layout (every format): data files plus `manifest.json`, shaped like a Bulk Data $export manifest (urls relative
to the directory) and written last, so a directory without a manifest is an unfinished export.
  ndjson:       <Type>.ndjson or <Type>.<k>.ndjson when split (.gz with gzip), Type/id references
  transaction / collection / document: one Bundle per patient, <patient id>.json (.gz), listed as type Bundle
Memory stays constant in the number of patients: nothing but counters is kept between patients.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from fhirsynth.errors import ExportError, UsageError
from fhirsynth.export.atomic import AtomicWriter, write_atomic
from fhirsynth.export.bundles import collection_bundle, document_bundle, transaction_bundle
from fhirsynth.export.ndjson import DEFAULT_MAX_FILE_BYTES, NdjsonWriter
from fhirsynth.logs import progress
from fhirsynth.testpoint import pause_point
from fhirsynth.timeline.assembler import GeneratorInfo, assemble_patient
from fhirsynth.timeline.profiles import load_profile
from fhirsynth.timeline.types import Timeline

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("ndjson", "transaction", "collection", "document")
MANIFEST = "manifest.json"


def _check_out_dir(out_dir: Path, overwrite: bool) -> list[str]:
    """Create out_dir and return the files of a previous fhirsynth export in it (replaced by this one).

    A directory holding anything else (or an unfinished export: files but no manifest) is refused unless
    overwrite, so a typo in --out never mixes exports or deletes unrelated files.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError("export path exists and is not a directory", where=str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    visible = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
    manifest = out_dir / MANIFEST
    old: list[str] | None = None
    if manifest.is_file():
        try:
            doc = orjson.loads(manifest.read_bytes())
            if "fhirsynth" in (doc.get("extension") or {}):
                old = [o["url"] for o in doc.get("output", [])]
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            old = None
    if old is not None:
        unknown = set(visible) - set(old) - {MANIFEST}
        if unknown and not overwrite:
            raise ExportError(
                f"export directory holds files that are not part of the previous export (e.g. {sorted(unknown)[0]}); "
                "choose an empty directory or overwrite it (--force)",
                where=str(out_dir),
            )
    elif visible and not overwrite:
        raise ExportError(
            f"export directory is not empty and holds no finished fhirsynth export (e.g. {sorted(visible)[0]}); "
            "choose an empty directory or overwrite it (--force)",
            where=str(out_dir),
        )
    if manifest.is_file():
        # Drop the old manifest first: an interrupted overwrite must not look like a finished export.
        manifest.unlink()
    _remove_dead_parts(out_dir)
    return old or []


_PART = re.compile(r"^\..+\.(\d+)\.part$")


def _remove_dead_parts(out_dir: Path) -> None:
    """Delete temp parts (`.NAME.PID.part`) left by a writer that was killed (its PID is gone).

    Without this, every kill -9 during an export leaves up to a full export's worth of hidden bytes behind.
    A live PID is left alone (it may be another export writing here right now).
    """
    for p in out_dir.iterdir():
        m = _PART.match(p.name)
        if m is None or not p.is_file() or _pid_alive(int(m.group(1))):
            continue
        p.unlink(missing_ok=True)
        log.debug("removed stale temp file %s", p)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an absurd number): leave the file alone
    return True


def _remove_stale(out_dir: Path, old: list[str], new: set[str]) -> int:
    removed = 0
    root = out_dir.resolve()
    for url in old:
        if url in new:
            continue
        path = (out_dir / url).resolve()
        if path.parent == root and path.is_file():  # never follow a manifest outside the directory
            path.unlink()
            removed += 1
    return removed


def write_export(
    timelines: Iterable[Timeline],
    out_dir: Path,
    *,
    fmt: str = "ndjson",
    profile: str = "us-core",
    seed: int = 1,
    generator: GeneratorInfo,
    gzip: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    validate: bool = False,
    overwrite: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Assemble every timeline and write the export; returns a summary (counts, files, bytes).

    validate=True runs both validators on every emitted resource or Bundle (slow: ~1 ms per resource) and
    stops at the first invalid one with a ValidationError naming it.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})", where="--format")
    prof = load_profile(profile)
    out_dir = Path(out_dir)
    old_files = _check_out_dir(out_dir, overwrite)
    check = None
    if validate:
        from fhirsynth.fhir.validate import check_resource

        check = check_resource

    counts: Counter[str] = Counter()
    ndjson = NdjsonWriter(out_dir, gzip_output=gzip, max_file_bytes=max_file_bytes) if fmt == "ndjson" else None
    # Bundle file names are spooled to a hidden file, not kept in a list: memory stays flat for any -n.
    spool = None if ndjson is not None else AtomicWriter(out_dir / ".bundle-outputs")
    suffix = ".json.gz" if gzip else ".json"
    n_patients = 0
    size = 0
    try:
        with progress(total=total, unit="patient", desc=f"generate {fmt}") as bar:
            for index, timeline in enumerate(timelines):
                resources = assemble_patient(timeline, profile=profile, seed=seed, index=index, generator=generator)
                for r in resources:
                    counts[r["resourceType"]] += 1
                n_patients += 1
                if ndjson is not None:
                    if check:
                        for r in resources:
                            check(r)
                    ndjson.write_resources(resources)
                else:
                    bundle = _bundle(fmt, resources, prof, generator)
                    if check:
                        check(bundle)
                    name = f"{resources[0]['id']}{suffix}"
                    size += write_atomic(out_dir / name, orjson.dumps(bundle), gzip_output=gzip).stat().st_size
                    spool.write(name.encode() + b"\n")
                bar.update(1)
                if n_patients == 2:
                    pause_point("generate-mid-export")  # some patients written, the manifest not yet
        extension = {
            "fhirsynth": {
                "version": generator.fhirsynth_version,
                "format": fmt,
                "profile": profile,
                "seed": seed,
                "gzip": gzip,
                "patients": n_patients,
                "resources": dict(counts),
                "model_hash": generator.model_hash,
                "epsilon": generator.epsilon,
                "delta": generator.delta,
            }
        }
        head = {
            "transactionTime": generator.recorded,
            "request": f"urn:fhirsynth:generate?format={fmt}&profile={profile}&seed={seed}",
            "requiresAccessToken": False,
        }
        if ndjson is not None:
            outputs = ndjson.finish()
            size = sum((out_dir / o["url"]).stat().st_size for o in outputs)
            new_names = {o["url"] for o in outputs}
            manifest = {**head, "output": outputs, "error": [], "extension": extension}
            write_atomic(out_dir / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
            n_files = len(outputs)
        else:
            n_files, new_names = _write_bundle_manifest(out_dir, spool, head, extension, want_names=bool(old_files))
    except OSError as exc:
        raise ExportError(f"cannot write export: {exc.strerror}", where=str(exc.filename or out_dir)) from exc
    finally:
        if ndjson is not None:
            ndjson.abort()  # no-op after finish(); removes temp parts after a failure
        if spool is not None:
            spool.abort()
    stale = _remove_stale(out_dir, old_files, new_names) if old_files else 0
    summary = {
        "out_dir": str(out_dir),
        "format": fmt,
        "profile": profile,
        "patients": n_patients,
        "resources": dict(counts),
        "files": n_files,
        "bytes": size,
        "stale_removed": stale,
        "manifest": str(out_dir / MANIFEST),
    }
    log.info("wrote %d patients (%d resources, %d files, %.1f MB) to %s",
             n_patients, sum(counts.values()), n_files, size / 1e6, out_dir)
    return summary


def _write_bundle_manifest(
    out_dir: Path, spool: AtomicWriter, head: dict[str, Any], extension: dict[str, Any], *, want_names: bool
) -> tuple[int, set[str]]:
    """Stream the manifest of a Bundle export from the spooled file names (one output item per Bundle)."""
    names: set[str] = set()
    n = 0
    manifest = AtomicWriter(out_dir / MANIFEST)
    try:
        manifest.write(orjson.dumps(head)[:-1] + b',\n"output":[')
        with open(spool.finish(), "rb") as fh:
            for line in fh:
                name = line.rstrip(b"\n").decode()
                manifest.write((b",\n" if n else b"\n") + orjson.dumps({"type": "Bundle", "url": name, "count": 1}))
                n += 1
                if want_names:
                    names.add(name)
        manifest.write(b'\n],\n"error":[],\n"extension":' + orjson.dumps(extension) + b"}\n")
        manifest.commit()
    except BaseException:
        manifest.abort()
        raise
    return n, names


def _bundle(fmt: str, resources: list[dict[str, Any]], prof, generator: GeneratorInfo) -> dict[str, Any]:
    if fmt == "transaction":
        return transaction_bundle(resources)
    puuid = uuid.UUID(resources[0]["id"])
    if fmt == "collection":
        return collection_bundle(resources, bundle_id=str(uuid.uuid5(puuid, "Bundle/collection")),
                                 timestamp=generator.recorded)
    return document_bundle(
        resources,
        profile=prof,
        generator=generator,
        composition_id=str(uuid.uuid5(puuid, "Composition")),
        device_id=str(uuid.uuid5(puuid, "Device")),
        bundle_id=str(uuid.uuid5(puuid, "Bundle/document")),
    )


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """The export's manifest.json (ExportError when missing: the export never finished)."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ExportError("no manifest.json: not a finished fhirsynth export", where=str(export_dir))
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ExportError(f"invalid manifest.json: {exc.msg}", where=str(path)) from exc


__all__ = ["FORMATS", "MANIFEST", "read_manifest", "write_export"]
