"""Read and write timeline directories: events.parquet + patients.parquet (+ ingest-report.json).

Columns are fixed here so every stage agrees. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fhirsynth.errors import InputError
from fhirsynth.timeline.types import Event, PatientInfo, Timeline

EVENTS_FILE = "events.parquet"
PATIENTS_FILE = "patients.parquet"
REPORT_FILE = "ingest-report.json"

_TS = pa.timestamp("us", tz="UTC")

EVENT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("time", _TS),
        ("kind", pa.string()),
        ("system", pa.string()),
        ("code", pa.string()),
        ("display", pa.string()),
        ("value", pa.float64()),
        ("unit", pa.string()),
        ("value_system", pa.string()),
        ("value_code", pa.string()),
        ("value_display", pa.string()),
        ("category", pa.string()),
        ("encounter_id", pa.string()),
        ("end_time", _TS),
        ("status", pa.string()),
        ("panel_system", pa.string()),
        ("panel_code", pa.string()),
        ("panel_display", pa.string()),
        ("time_precision", pa.string()),
        ("source_id", pa.string()),
    ]
)
EVENT_FIELDS: tuple[str, ...] = tuple(f for f in EVENT_SCHEMA.names if f != "patient_id")

PATIENT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("sex", pa.string()),
        ("birth_date", pa.date32()),
        ("death_date", _TS),
        ("deceased", pa.bool_()),
        ("race_code", pa.string()),
        ("race_display", pa.string()),
        ("ethnicity_code", pa.string()),
        ("ethnicity_display", pa.string()),
        ("country", pa.string()),
        ("nationality", pa.string()),
        ("language", pa.string()),
    ]
)
PATIENT_FIELDS: tuple[str, ...] = tuple(PATIENT_SCHEMA.names)


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def events_to_table(rows: Iterable[tuple[str, Event]]) -> pa.Table:
    """(patient_id, Event) pairs -> an Arrow table with EVENT_SCHEMA."""
    cols: dict[str, list] = {name: [] for name in EVENT_SCHEMA.names}
    for pid, ev in rows:
        cols["patient_id"].append(pid)
        for name in EVENT_FIELDS:
            val = getattr(ev, name)
            if name in ("time", "end_time"):
                val = _utc(val)
            cols[name].append(val)
    return pa.Table.from_pydict(cols, schema=EVENT_SCHEMA)


def patients_to_table(patients: Iterable[PatientInfo]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in PATIENT_FIELDS}
    for p in patients:
        for name in PATIENT_FIELDS:
            val = getattr(p, name)
            if name == "death_date":
                val = _utc(val)
            cols[name].append(val)
    return pa.Table.from_pydict(cols, schema=PATIENT_SCHEMA)


def atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_timelines(timelines: Iterable[Timeline], out_dir: str | os.PathLike) -> tuple[int, int]:
    """Write timelines to out_dir; returns (patients, events). For large outputs use TimelineWriter."""
    with TimelineWriter(out_dir) as writer:
        for tl in timelines:
            writer.add(tl)
    return writer.n_patients, writer.n_events


class TimelineWriter:
    """Streams timelines into the two parquet files in row groups, then renames them into place."""

    def __init__(self, out_dir: str | os.PathLike, batch_events: int = 200_000) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.batch_events = batch_events
        self._ev_tmp = self.out_dir / f".{EVENTS_FILE}.{os.getpid()}.tmp"
        self._pt_tmp = self.out_dir / f".{PATIENTS_FILE}.{os.getpid()}.tmp"
        self._ev_writer = pq.ParquetWriter(self._ev_tmp, EVENT_SCHEMA, compression="zstd")
        self._pt_writer = pq.ParquetWriter(self._pt_tmp, PATIENT_SCHEMA, compression="zstd")
        self._ev_buf: list[tuple[str, Event]] = []
        self._pt_buf: list[PatientInfo] = []
        self.n_patients = 0
        self.n_events = 0

    def add(self, timeline: Timeline) -> None:
        pid = timeline.patient.patient_id
        self._pt_buf.append(timeline.patient)
        self._ev_buf.extend((pid, ev) for ev in timeline.events)
        self.n_patients += 1
        self.n_events += len(timeline.events)
        if len(self._ev_buf) >= self.batch_events:
            self._flush()

    def _flush(self) -> None:
        if self._ev_buf:
            self._ev_writer.write_table(events_to_table(self._ev_buf))
            self._ev_buf = []
        if self._pt_buf:
            self._pt_writer.write_table(patients_to_table(self._pt_buf))
            self._pt_buf = []

    def close(self) -> None:
        self._flush()
        self._ev_writer.close()
        self._pt_writer.close()
        os.replace(self._ev_tmp, self.out_dir / EVENTS_FILE)
        os.replace(self._pt_tmp, self.out_dir / PATIENTS_FILE)

    def abort(self) -> None:
        for w in (self._ev_writer, self._pt_writer):
            try:
                w.close()
            except Exception:  # noqa: BLE001 - best effort cleanup on failure
                pass
        for tmp in (self._ev_tmp, self._pt_tmp):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> TimelineWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_dir(path: Path) -> None:
    for name in (EVENTS_FILE, PATIENTS_FILE):
        if not (path / name).is_file():
            raise InputError(f"not a timelines directory: {name} is missing (run `fhirsynth ingest` first)", where=str(path))


def read_patients_table(timelines_dir: str | os.PathLike) -> pa.Table:
    path = Path(timelines_dir)
    _check_dir(path)
    return pq.read_table(path / PATIENTS_FILE, schema=PATIENT_SCHEMA)


def read_events_table(timelines_dir: str | os.PathLike) -> pa.Table:
    path = Path(timelines_dir)
    _check_dir(path)
    return pq.read_table(path / EVENTS_FILE, schema=EVENT_SCHEMA)


def _patient_from_row(row: dict) -> PatientInfo:
    return PatientInfo(**{k: row[k] for k in PATIENT_FIELDS})


def read_timelines(timelines_dir: str | os.PathLike) -> Iterator[Timeline]:
    """Yield every patient's timeline (events time-sorted), patients in file order.

    Events are grouped in memory per read; the events table is read once (columnar, compact).
    """
    patients = read_patients_table(timelines_dir).to_pylist()
    events = read_events_table(timelines_dir)
    by_patient: dict[str, list[Event]] = {}
    if events.num_rows:
        pids = events.column("patient_id").to_pylist()
        cols = {name: events.column(name).to_pylist() for name in EVENT_FIELDS}
        for i, pid in enumerate(pids):
            by_patient.setdefault(pid, []).append(Event(**{name: cols[name][i] for name in EVENT_FIELDS}))
    for row in patients:
        p = _patient_from_row(row)
        yield Timeline(patient=p, events=by_patient.pop(p.patient_id, [])).sorted()


def as_date(value: date | datetime | None) -> date | None:
    if value is None:
        return None
    return value.date() if isinstance(value, datetime) else value
