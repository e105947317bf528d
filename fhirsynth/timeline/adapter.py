"""FHIR -> timelines: `ingest(inputs, out_dir)` writes events.parquet, patients.parquet and ingest-report.json.

Memory stays bounded by design, not by input size:
  pass 1  stream every resource once; Patients go to a dict (one small row each); events are mapped at once into
          row tuples keyed by the *unresolved* patient reference and spilled to Arrow IPC files every
          `SPILL_ROWS` rows, so references to a Patient in a later file cost nothing to keep.
  pass 2  once all Patients are known, each spill file is read back, deduplicated (Type/id), joined to patient
          ids with a vectorised lookup, and appended to the output parquet as one row group.
Peak RSS is one spill batch (~50 MB of row tuples) + the Patient rows + 8 bytes per event resource for
duplicate detection.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time as _time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from fhirsynth import __version__
from fhirsynth.errors import InputError, StrictModeError
from fhirsynth.fhir.readers import ResourceReader, discover_inputs
from fhirsynth.logs import progress
from fhirsynth.mapping import Mapping, load_mapping
from fhirsynth.timeline.extract import (
    HEAD_FIELDS,
    MEDICATION_REF,
    REASON_REF,
    EventExtractor,
    extract_patient,
    patient_aliases,
)
from fhirsynth.timeline.io import (
    EVENT_SCHEMA,
    EVENTS_FILE,
    PATIENT_SCHEMA,
    PATIENTS_FILE,
    REPORT_FILE,
    atomic_write_table,
)
from fhirsynth.testpoint import pause_point
from fhirsynth.timeline.report import IngestReport

log = logging.getLogger(__name__)

SPILL_ROWS = 50_000
_TS = pa.timestamp("us", tz="UTC")
TAIL_FIELDS = ("source_id", "rtype", "res_hash", "res_seq", "file_idx", "line", "entry")
SPILL_SCHEMA = pa.schema(
    [("patient_key", pa.string())]
    # times stay int64 microseconds (UTC) until pass 2: Python ints batch into Arrow far faster than datetimes
    + [pa.field(n, pa.int64()) if n in ("time", "end_time") else EVENT_SCHEMA.field(n) for n in HEAD_FIELDS[1:]]
    + [
        ("source_id", pa.string()),
        ("rtype", pa.string()),
        ("res_hash", pa.int64()),
        ("res_seq", pa.int64()),
        ("file_idx", pa.int32()),
        ("line", pa.int32()),
        ("entry", pa.int32()),
    ]
)

_SPILL_STRUCT = pa.struct(list(SPILL_SCHEMA))


class _Spill:
    """Row tuples -> Arrow IPC files of at most SPILL_ROWS rows (a resource's rows never straddle two)."""

    def __init__(self, directory: Path, rows: int | None = None) -> None:
        self.directory = directory
        self.rows_per_file = rows or SPILL_ROWS
        self.buf: list[tuple] = []
        self.files: list[Path] = []

    def flush(self) -> None:
        if not self.buf:
            return
        # tuples -> one struct array is Arrow's fastest row-to-column path (about 2x a Python transpose)
        rows = pa.array(self.buf, type=_SPILL_STRUCT)
        self.buf.clear()
        table = pa.Table.from_batches([pa.RecordBatch.from_struct_array(rows)], schema=SPILL_SCHEMA)
        path = self.directory / f"spill-{len(self.files):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, SPILL_SCHEMA) as writer:
            writer.write_table(table)
        self.files.append(path)

    def read(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        with pa.memory_map(str(path), "r") as source:
            table = ipc.open_file(source).read_all()
        return table.select(columns) if columns else table


def ingest(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    mapping: str | os.PathLike | Mapping = "us-core",
    strict: bool = False,
    max_examples: int = 5,
) -> dict[str, Any]:
    """Read FHIR `inputs` (files/dirs/manifests), write a timelines directory, return the report dict.

    Raises InputError for unusable input, MappingError for a bad mapping, StrictModeError when `strict` and any
    resource was skipped (the report is still written; the parquet files are not).
    """
    started = _time.monotonic()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path, not a sequence of characters
    m = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    files = discover_inputs(list(inputs))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_spills(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".ingest-{os.getpid()}-", dir=out))  # spill files live beside the output
    except OSError as exc:
        raise InputError(f"cannot write the output directory: {exc.strerror}", where=str(out)) from None
    report = IngestReport(max_examples)
    total_bytes = sum(f.path.stat().st_size for f in files)
    try:
        with progress(total=total_bytes, unit="B", unit_scale=True, desc="ingest") as bar:
            reader = ResourceReader(files, report.problem, on_bytes=bar.update)
            extractors = {rt: EventExtractor(rm) for rt, rm in m.resources.items()}
            # Parsed FHIR is acyclic: the cycle collector would only rescan the live spill rows, again and again.
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                patients, aliases, spill, medications = _pass_one(reader, m, extractors, report, tmp)
            finally:
                if gc_was_enabled:
                    gc.enable()
        pass_one_s = _time.monotonic() - started
        if not sum(report.read.values()):
            # Only input with no resource at all is an error; an empty file beside real input is just empty.
            where = str(files[0].path) if len(files) == 1 else ", ".join(str(p) for p in inputs)
            raise InputError("no FHIR resource found (empty file, Bundle without entries, or nothing readable)",
                             where=where)
        pause_point("ingest-between-passes")  # spill files written, nothing final yet
        refs = _References(spill, aliases, medications, extractors, report, reader)
        summary = _pass_two(spill, patients, aliases, report, reader, tmp, refs)
        refs.report_unused_medications()
        components_dropped = sum(ex.components_dropped for ex in extractors.values())
        result = report.to_dict(
            fhirsynth_version=__version__,
            mapping={"name": m.name, "version": m.version, "path": str(m.path)},
            inputs=[str(p) for p in inputs],
            files=len(files),
            bundles=reader.bundles,
            bundle_entries_without_resource=reader.entries_without_resource,
            components_dropped=components_dropped,
            values_dropped=sum(ex.values_dropped for ex in extractors.values()),
            reasons_unresolved=refs.reasons_unresolved,
            events=summary["events"],
            patients=summary["patients"],
            strict=strict,
            elapsed_s=round(_time.monotonic() - started, 3),
            read_and_map_s=round(pass_one_s, 3),
        )
        unusable = _unusable(result)
        failed = unusable is not None or (strict and report.n_skipped > 0)
        result["outputs_written"] = not failed
        if not failed:
            os.replace(tmp / EVENTS_FILE, out / EVENTS_FILE)
            atomic_write_table(summary["patients_table"], out / PATIENTS_FILE)
        _write_json(result, out / REPORT_FILE)
        log.debug("ingest: %.1fs read+map, %.1fs join+write", pass_one_s, result["elapsed_s"] - pass_one_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if unusable is not None:
        # without --strict too: timelines without a patient only make the next command fail, far from the cause
        raise InputError(f"{unusable}; see {out / REPORT_FILE}",
                         where=str(files[0].path) if len(files) == 1 else ", ".join(str(p) for p in inputs))
    if failed:
        reasons = ", ".join(f"{k}={v['count']}" for k, v in result["skipped"].items())
        raise StrictModeError(
            f"--strict: {report.n_skipped} resource(s) skipped ({reasons}); see {out / REPORT_FILE}",
            where=str(files[0].path) if len(files) == 1 else None,
        )
    return result


def _unusable(result: dict[str, Any]) -> str | None:
    """Why the input gave no patient at all (every resource skipped), with each skip reason's first example, or
    None when it gave at least one."""
    if result["totals"]["used"] > 0 and result["patients"]["kept"] > 0:
        return None
    reasons = []
    for reason, info in result["skipped"].items():
        first = info["examples"][0] if info["examples"] else {}
        example = ": ".join(x for x in (first.get("where"), first.get("detail", "")[:120]) if x)
        reasons.append(f"{reason} x{info['count']}" + (f" (e.g. {example})" if example else ""))
    message = (f"no usable FHIR resource: {result['totals']['read']} read, {result['patients']['kept']} patients "
               f"kept" + (f"; skipped: {'; '.join(reasons)}" if reasons else ""))
    return " ".join(message.split())  # one line, whatever the details hold


def _remove_stale_spills(out: Path) -> None:
    """Spill dirs of a killed ingest (named .ingest-PID-*) would otherwise stay forever; live ones are kept."""
    for stale in out.glob(".ingest-*"):
        pid = stale.name.split("-")[1] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed the spill directory of an interrupted ingest: %s", stale)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pass_one(
    reader: ResourceReader,
    m: Mapping,
    extractors: dict[str, EventExtractor],
    report: IngestReport,
    tmp: Path,
) -> tuple[dict[str, tuple], dict[str, str], _Spill, dict[str, tuple]]:
    patients: dict[str, tuple] = {}
    # Medication resources, when a table reads medicationReference: "Medication/id" -> (code, where); each is
    # counted used once an event takes its code, else skipped as medication_not_referenced (after pass 2)
    medications: dict[str, tuple] = {}
    want_medications = any(rm.medication_reference is not None for rm in m.resources.values())
    aliases: dict[str, str] = {}
    spill = _Spill(tmp)
    buf = spill.buf
    read = report.read
    pm = m.patient
    limit = spill.rows_per_file
    seq = 0
    fns = {rt: ex.extract for rt, ex in extractors.items()}
    for fidx, line, entry, res, refs in reader:
        rtype = res["resourceType"]
        read[rtype] += 1
        ex = fns.get(rtype)
        if ex is None:
            if rtype == "Patient":
                _add_patient(reader.where(fidx, line, entry), res, pm, patients, aliases, report)
            elif rtype == "Medication" and want_medications:
                _add_medication(reader.where(fidx, line, entry), res, medications, report)
            else:
                report.skip(rtype, "unmapped_type", reader.where(fidx, line, entry),
                            _rid(res), "no table for this type in the mapping")
            continue
        rid = res.get("id")
        sid = f"{rtype}/{rid}" if type(rid) is str and rid else None
        # 0 marks "no id" (never a duplicate); a real hash of 0 is bumped to 1
        try:
            rows = ex(res, refs, (sid, rtype, (hash(sid) or 1) if sid is not None else 0, seq, fidx, line, entry))
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
            # an element of the wrong JSON type (e.g. an object where FHIR has a string): skip, never crash
            rows = ("malformed_resource", f"{type(exc).__name__}: {exc}")
        if type(rows) is tuple:
            report.skip(rtype, rows[0], reader.where(fidx, line, entry), sid, rows[1])
            continue
        buf += rows
        seq += 1
        if len(buf) >= limit:
            spill.flush()
            buf = spill.buf
    spill.flush()
    return patients, aliases, spill, medications


def _rid(res: dict) -> str | None:
    rid = res.get("id")
    return f"{res['resourceType']}/{rid}" if type(rid) is str and rid else None


def _add_patient(where, res, pm, patients, aliases, report) -> None:  # noqa: ANN001 - hot-path helper
    pid = res.get("id")
    if type(pid) is not str or not pid:
        report.skip("Patient", "no_id", where, None, "Patient without id or fullUrl")
        return
    if pid in patients:
        report.skip("Patient", "duplicate_id", where, f"Patient/{pid}", "first occurrence kept")
        return
    try:
        row = extract_patient(res, pm)
        keys = patient_aliases(res, pid, (f"urn:uuid:{pid}",), identifiers=pm.identifier_match)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
        report.skip("Patient", "malformed_resource", where, f"Patient/{pid}", f"{type(exc).__name__}: {exc}")
        return
    patients[pid] = row
    for key in keys:
        aliases.setdefault(key, pid)


def _add_medication(where: str, res: dict, medications: dict[str, tuple], report: IngestReport) -> None:
    mid = res.get("id")
    if type(mid) is not str or not mid:
        report.skip("Medication", "no_id", where, None, "Medication without id or fullUrl")
        return
    key = f"Medication/{mid}"
    if key in medications:
        report.skip("Medication", "duplicate_id", where, key, "first occurrence kept")
        return
    medications[key] = (res.get("code"), where)


class _References:
    """Resolves, in pass 2, what pass 1 could only note: the Medication of a medicationReference and the
    Condition of a reasonReference (the latter within the same patient's data only)."""

    def __init__(self, spill: _Spill, aliases: dict[str, str], medications: dict[str, tuple],
                 extractors: dict[str, EventExtractor], report: IngestReport, reader: ResourceReader) -> None:
        self.medications = medications
        self.used_medications: set[str] = set()
        self.extractors = extractors
        self.report = report
        self.reader = reader
        self.reasons_unresolved = 0
        self.conditions = self._conditions(spill, aliases) if any(
            ex.g_reason_ref is not None for ex in extractors.values()) else {}

    @staticmethod
    def _conditions(spill: _Spill, aliases: dict[str, str]) -> dict[str, tuple]:
        """"Condition/id" -> (patient id, system, code, display) of every condition event (first one wins)."""
        out: dict[str, tuple] = {}
        for path in spill.files:
            t = spill.read(path, ["rtype", "source_id", "patient_key", "system", "code", "display"])
            t = t.filter(pc.equal(t.column("rtype"), "Condition"))
            for sid, pkey, system, code, display in zip(*(t.column(c).to_pylist() for c in t.column_names[1:]),
                                                       strict=True):
                if sid is not None and sid not in out:
                    out[sid] = (aliases.get(pkey), system, code, display)
        return out

    def resolve(self, t: pa.Table, pid: pa.Array) -> pa.Table:
        """`t` (spill rows with their patient ids) with every marker replaced; unresolvable medications skipped."""
        med = pc.fill_null(pc.equal(t.column("system"), MEDICATION_REF), False)
        rsn = pc.fill_null(pc.equal(t.column("value_system"), REASON_REF), False)
        if not (pc.any(med).as_py() or pc.any(rsn).as_py()):
            return t
        cols = {n: t.column(n).to_pylist() for n in ("system", "code", "display", "value_system", "value_code",
                                                     "value_display", "rtype")}
        pids = pid.to_pylist()
        keep = [True] * len(t)
        for i in np.flatnonzero(med.to_numpy(zero_copy_only=False)):
            key = cols["code"][i]
            hit = self.medications.get(key)
            if hit is None:
                keep[i] = False
                self._skip(t, i, "medication_not_found", f"{key} is not among the input Medications")
                continue
            coding = self.extractors[cols["rtype"][i]].medication_coding(hit[0])
            if type(coding) is tuple:
                keep[i] = False
                self._skip(t, i, coding[0], f"{key}: {coding[1]}")
                continue
            self.used_medications.add(key)
            cols["system"][i], cols["code"][i] = coding.get("system"), coding["code"]
            cols["display"][i] = coding.get("display") or (hit[0].get("text") if type(hit[0]) is dict else None)
        for i in np.flatnonzero(rsn.to_numpy(zero_copy_only=False)):
            hit = self.conditions.get(cols["value_code"][i])
            if hit is None or hit[0] != pids[i]:
                # an unresolved reason is no reason, not a skip (the event itself is complete)
                self.reasons_unresolved += 1
                hit = (None, None, None, None)
            cols["value_system"][i], cols["value_code"][i], cols["value_display"][i] = hit[1:]
        for name, values in cols.items():
            if name != "rtype":
                t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, type=pa.string()))
        if not all(keep):
            t = t.filter(pa.array(keep))
        return t

    def _skip(self, t: pa.Table, i: int, reason: str, detail: str) -> None:
        row = {c: t.column(c)[i].as_py() for c in ("rtype", "source_id", "file_idx", "line", "entry")}
        self.report.skip(row["rtype"], reason, self.reader.where(row["file_idx"], row["line"], row["entry"]),
                         row["source_id"], detail)

    def report_unused_medications(self) -> None:
        for key, (_, where) in self.medications.items():
            if key not in self.used_medications:
                self.report.skip("Medication", "medication_not_referenced", where, key,
                                 "no mapped resource takes its code")


def _duplicate_seqs(spill: _Spill) -> np.ndarray:
    """res_seq of every event resource whose Type/id was already seen (first occurrence wins).

    Only one int64 hash per resource is held (sorted in place), so this costs 8 bytes per event resource.
    """
    if not spill.files:
        return np.empty(0, dtype=np.int64)
    parts = []
    for path in spill.files:
        t = spill.read(path, ["res_hash", "res_seq"])
        seq = t.column("res_seq").to_numpy()
        first = np.ones(len(seq), dtype=bool)
        first[1:] = seq[1:] != seq[:-1]  # a resource's rows are contiguous: one hash per resource
        parts.append(t.column("res_hash").to_numpy()[first])
    h = np.concatenate(parts)
    del parts
    h.sort()
    same = h[1:] == h[:-1]
    cand = np.unique(h[1:][same & (h[1:] != 0)])  # 0 = no id, never a duplicate
    del h, same
    if not len(cand):
        return np.empty(0, dtype=np.int64)
    # verify candidates by their exact Type/id (a 64-bit hash collision must not drop a resource)
    cand_hashes = pa.array(cand)
    seen: set[str] = set()
    dups: list[int] = []
    for path in spill.files:
        t = spill.read(path, ["res_hash", "res_seq", "source_id"])
        t = t.filter(pc.is_in(t.column("res_hash"), value_set=cand_hashes))
        last = None
        for sq, sid in zip(t.column("res_seq").to_pylist(), t.column("source_id").to_pylist(), strict=True):
            if sq == last:
                continue
            last = sq
            if sid in seen:
                dups.append(sq)
            else:
                seen.add(sid)
    return np.asarray(dups, dtype=np.int64)


def _report_rows(t: pa.Table, reason: str, detail: str, report: IngestReport, reader: ResourceReader) -> None:
    """Count each resource (not each component row) of `t` as skipped for `reason`."""
    cols = [t.column(c).to_pylist() for c in ("res_seq", "rtype", "source_id", "file_idx", "line", "entry",
                                               "patient_key")]
    last = None
    for seq, rtype, sid, fidx, line, entry, pkey in zip(*cols, strict=True):
        if seq == last:
            continue
        last = seq
        report.skip(rtype, reason, reader.where(fidx, line, entry), sid, detail.format(patient=pkey))


def _pass_two(spill, patients, aliases, report, reader, tmp: Path, refs: _References) -> dict[str, Any]:  # noqa: ANN001
    dup = pa.array(_duplicate_seqs(spill), type=pa.int64())
    keys = pa.array(list(aliases.keys()), type=pa.string())
    vals = pa.array(list(aliases.values()), type=pa.string())
    by_kind: dict[str, int] = {}
    with_events: set[str] = set()
    n_events = 0
    writer = pq.ParquetWriter(tmp / EVENTS_FILE, EVENT_SCHEMA, compression="zstd")
    try:
        for path in spill.files:
            t = spill.read(path)
            if len(dup):
                is_dup = pc.is_in(t.column("res_seq"), value_set=dup)
                if pc.any(is_dup).as_py():
                    _report_rows(t.filter(is_dup), "duplicate_id", "first occurrence kept", report, reader)
                    t = t.filter(pc.invert(is_dup))
            pid = pc.take(vals, pc.index_in(t.column("patient_key"), value_set=keys))
            missing = pc.is_null(pid)
            if pc.any(missing).as_py():
                _report_rows(t.filter(missing), "subject_not_found", "{patient} is not among the input Patients",
                             report, reader)
                keep = pc.invert(missing)
                t, pid = t.filter(keep), pid.filter(keep)
            if not len(t):
                continue
            n = len(t)
            t = refs.resolve(t, pid)
            if len(t) != n:  # unresolvable medications were dropped (and reported)
                if not len(t):
                    continue
                pid = pc.take(vals, pc.index_in(t.column("patient_key"), value_set=keys))
            t = t.drop_columns(["patient_key"]).add_column(0, "patient_id", pid)
            for name in ("time", "end_time"):
                t = t.set_column(t.schema.get_field_index(name), name, t.column(name).cast(_TS))
            t = t.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
            writer.write_table(t)
            n_events += len(t)
            for row in pc.value_counts(t.column("kind")).to_pylist():
                by_kind[row["values"]] = by_kind.get(row["values"], 0) + row["counts"]
            with_events.update(pc.unique(t.column("patient_id")).to_pylist())
            path.unlink()
    finally:
        writer.close()
    cols = list(zip(*patients.values(), strict=True)) if patients else [[] for _ in PATIENT_SCHEMA.names]
    ptable = pa.Table.from_arrays(
        [pa.array(col, type=field.type) for col, field in zip(cols, PATIENT_SCHEMA, strict=True)],
        schema=PATIENT_SCHEMA,
    )
    return {
        "events": {"total": n_events, "by_kind": dict(sorted(by_kind.items()))},
        "patients": {
            "kept": len(patients),
            "duplicates": report.skipped.get("Patient", {}).get("duplicate_id", 0),
            "with_events": len(with_events),
            "without_events": len(patients) - len(with_events),
        },
        "patients_table": ptable,
    }


def _write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    os.replace(tmp, path)
