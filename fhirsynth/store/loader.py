"""Fill a Store from an export dir (NDJSON + Bulk Data style manifest.json), all or nothing."""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from fhirsynth.errors import StoreError
from fhirsynth.logs import progress
from fhirsynth.store.params import PARAMS
from fhirsynth.store.sqlite import Store
from fhirsynth.testpoint import pause_point

log = logging.getLogger(__name__)


def export_files(export_dir: Path) -> list[Path]:
    """The NDJSON files of an export dir: manifest.json output[] when present, else *.ndjson(.gz)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise StoreError("export dir does not exist or is not a directory", where=str(export_dir))
    manifest = export_dir / "manifest.json"
    if manifest.is_file():
        try:
            doc = orjson.loads(manifest.read_bytes())
            outputs = doc["output"]
            files = [export_dir / o["url"] for o in outputs]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise StoreError(f"not a Bulk Data manifest (needs output[].url): {exc}", where=str(manifest)) from None
        for f in files:
            if export_dir.resolve() not in f.resolve().parents:
                raise StoreError(f"manifest url {f.name!r} points outside the export dir", where=str(manifest))
            if not f.is_file():
                raise StoreError(f"manifest lists {f.name} but the file is missing", where=str(manifest))
        return files
    files = sorted(export_dir.glob("*.ndjson")) + sorted(export_dir.glob("*.ndjson.gz"))
    if not files:
        raise StoreError("no manifest.json and no *.ndjson(.gz) files", where=str(export_dir))
    return files


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError) as exc:
        raise StoreError(f"cannot read: {exc}", where=str(path)) from None


def load_export_dir(store: Store, export_dir: str | Path) -> dict:
    """Load every resource of an export dir in one transaction. Returns {"loaded": {type: n}, "skipped": {...}}.

    Resource types the server does not serve are skipped and counted with the reason; anything without the
    synthetic marker, malformed JSON or a duplicate id aborts the whole load (StoreError naming file:line).
    """
    files = export_files(Path(export_dir))
    loaded: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    with store.transaction(bulk=True) as conn:
        store.defer_indexes(conn)  # a fresh store gets its secondary indexes built once, after the rows
        bar = progress(desc="loading store", unit=" resources")
        for path in files:
            for lineno, line in _lines(path):
                where = f"{path}:{lineno}"
                try:
                    resource = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise StoreError(f"invalid JSON: {exc}", where=where) from None
                if not isinstance(resource, dict) or "resourceType" not in resource:
                    raise StoreError("not a FHIR resource (no resourceType)", where=where)
                rtype = resource["resourceType"]
                if rtype not in PARAMS:
                    skipped[f"{rtype}: type not served"] += 1
                    continue
                store.insert(conn, resource, where=where)
                loaded[rtype] += 1
                bar.update(1)
        bar.close()
        store.build_deferred_indexes(conn)  # before Group/all, whose refresh looks rows up by type
        store.refresh_all_group(conn)
    for reason, n in skipped.items():
        log.warning("skipped %d resources (%s)", n, reason)
    log.info("store loaded: %s", dict(loaded))
    return {"loaded": dict(loaded), "skipped": dict(skipped)}


_TEMP_SUFFIXES = ("", "-journal", "-wal", "-shm")


def _remove_dead_temps(db_path: Path) -> None:
    """Delete `.NAME.PID.tmp` databases (and -journal/-wal/-shm) left by a killed build: each is a full store."""
    pattern = re.compile(rf"^\.{re.escape(db_path.name)}\.(\d+)\.tmp(-journal|-wal|-shm)?$")
    for p in db_path.parent.iterdir():
        m = pattern.match(p.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that build is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        p.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_store(export_dir: str | Path, db_path: str | Path) -> tuple[Store, dict]:
    """Build a fresh database at db_path from an export dir atomically (temp file + os.replace)."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.{os.getpid()}.tmp")
    _remove_dead_temps(db_path)
    for suffix in _TEMP_SUFFIXES:
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    store = Store(tmp)
    try:
        conn = store._conn()
        # The temp file is private until os.replace, so the load needs none of WAL's reader concurrency, and one
        # transaction the size of the whole store made the WAL (and the frame lookups of every page read) grow with
        # it: ~1.2x the CPU per resource at 10x. A rollback journal records nothing for the pages a fresh file adds,
        # and a failed load still rolls back. No mmap while building: the store would be mapped into the RSS.
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA mmap_size=0")
        summary = load_export_dir(store, export_dir)
        pause_point("store-before-rename")  # a full temp store exists, --db does not yet
        conn.execute("PRAGMA journal_mode=WAL")  # what the server's readers need; persistent in the file
        store.close()
        _fsync(tmp)  # the bulk transaction ran with synchronous=OFF: the bytes are on disk before the rename
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, db_path)
    except BaseException:
        store.close()
        for suffix in _TEMP_SUFFIXES:
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    return Store(db_path), summary
