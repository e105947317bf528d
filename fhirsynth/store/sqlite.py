"""The SQLite store: resources kept as pre-serialized JSON bytes plus search-parameter index tables.

Reads never parse or re-serialize a resource: the bytes written at load time are the bytes served. One writer
connection (guarded by a lock) and one reader connection per thread; WAL lets readers run during writes.
Resource rows get an increasing `rid`, and nothing is ever deleted, so "rid <= snapshot" gives every paged search
and export a stable view even while $synthesize adds patients.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

from fhirsynth.errors import StoreError
from fhirsynth.store.dates import NEG_INF, format_instant
from fhirsynth.store.params import (
    PARAMS,
    RESOURCE_TYPES,
    SYNTHETIC_CODE,
    SYNTHETIC_SYSTEM,
    is_synthetic,
    patient_of,
    registry_signature,
    sort_date_of,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

_TABLES_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    rid INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    patient TEXT,
    last_updated REAL NOT NULL,
    sort_date REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS idx_token (pid INTEGER NOT NULL, code TEXT, system TEXT, text TEXT, rid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idx_date (pid INTEGER NOT NULL, lo REAL NOT NULL, hi REAL NOT NULL, rid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idx_quantity (pid INTEGER NOT NULL, value REAL NOT NULL, system TEXT, code TEXT,
    unit TEXT, rid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idx_reference (pid INTEGER NOT NULL, ref_id TEXT NOT NULL, ref_type TEXT,
    rid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idx_string (pid INTEGER NOT NULL, norm TEXT NOT NULL, raw TEXT NOT NULL,
    rid INTEGER NOT NULL);
"""

# The unique (type, id) index stays during a bulk load: it is what refuses a duplicate at its file:line.
_UNIQUE_INDEX_SQL = "CREATE UNIQUE INDEX IF NOT EXISTS resources_type_id ON resources (type, id)"

# Secondary indexes, name -> DDL. A bulk load into an empty store drops them and builds each once at the end (one
# sort per index) instead of inserting into B-trees that outgrow the page cache in random key order (UUID ids).
_SECONDARY_INDEXES = {
    # (type) carries rowid: "type = ? ORDER BY rid" pages without sorting the whole type
    "resources_type": "CREATE INDEX IF NOT EXISTS resources_type ON resources (type)",
    "resources_patient": "CREATE INDEX IF NOT EXISTS resources_patient ON resources (patient, type)",
    "resources_type_sort": "CREATE INDEX IF NOT EXISTS resources_type_sort ON resources (type, sort_date)",
    "resources_type_updated": "CREATE INDEX IF NOT EXISTS resources_type_updated ON resources (type, last_updated)",
    "idx_token_code": "CREATE INDEX IF NOT EXISTS idx_token_code ON idx_token (pid, code, rid)",
    "idx_date_lo": "CREATE INDEX IF NOT EXISTS idx_date_lo ON idx_date (pid, lo)",
    "idx_date_hi": "CREATE INDEX IF NOT EXISTS idx_date_hi ON idx_date (pid, hi)",
    "idx_quantity_value": "CREATE INDEX IF NOT EXISTS idx_quantity_value ON idx_quantity (pid, value)",
    "idx_reference_ref": "CREATE INDEX IF NOT EXISTS idx_reference_ref ON idx_reference (pid, ref_id, rid)",
    "idx_string_norm": "CREATE INDEX IF NOT EXISTS idx_string_norm ON idx_string (pid, norm)",
    "idx_string_raw": "CREATE INDEX IF NOT EXISTS idx_string_raw ON idx_string (pid, raw)",
}

_SCHEMA = _TABLES_SQL + ";\n".join([_UNIQUE_INDEX_SQL, *_SECONDARY_INDEXES.values()]) + ";\n"

_INSERT = {
    "token": "INSERT INTO idx_token (pid, system, code, text, rid) VALUES (?, ?, ?, ?, ?)",
    "date": "INSERT INTO idx_date (pid, lo, hi, rid) VALUES (?, ?, ?, ?)",
    "quantity": "INSERT INTO idx_quantity (pid, value, system, code, unit, rid) VALUES (?, ?, ?, ?, ?, ?)",
    "reference": "INSERT INTO idx_reference (pid, ref_type, ref_id, rid) VALUES (?, ?, ?, ?)",
    "string": "INSERT INTO idx_string (pid, norm, raw, rid) VALUES (?, ?, ?, ?)",
}
_TABLES = {"token": "idx_token", "date": "idx_date", "quantity": "idx_quantity", "reference": "idx_reference",
           "string": "idx_string"}

ALL_GROUP_ID = "all"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass
class Row:
    rid: int
    key: object  # the sort key value (for cursors)
    type: str
    id: str
    body: bytes


@dataclass
class Page:
    rows: list[Row]
    has_next: bool
    has_prev: bool


def _now() -> float:
    return time.time()


class Store:
    """A FHIR resource store in one SQLite file. Thread-safe; create with Store(path)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._count_cache: OrderedDict[tuple, int] = OrderedDict()
        self._count_lock = threading.Lock()
        self._pending: dict[str, list[tuple]] = {t: [] for t in _INSERT}  # guarded by _write_lock
        self._pending_rows = 0
        self._deferred = False  # secondary indexes dropped by defer_indexes(), rebuilt before COMMIT
        try:
            conn = self._conn()
            if not readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            self._check_meta(conn)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store database: {exc}", where=str(self.path)) from None

    # ------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"file:{self.path}{'?mode=ro' if self.readonly else ''}"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None,
                                   cached_statements=256)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("PRAGMA mmap_size=1073741824")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.ProgrammingError:  # closed from its own thread already
                    pass
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_meta(self, conn: sqlite3.Connection) -> None:
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        expected = {"schema_version": SCHEMA_VERSION, "params": registry_signature()}
        if not rows:
            if not self.readonly:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(expected.items()))
            return
        for k, v in expected.items():
            if rows.get(k) != v:
                raise StoreError(f"database was built by another fhirsynth version ({k} differs); delete it "
                                 "and load again", where=str(self.path))

    # ------------------------------------------------------------ writing

    @contextmanager
    def transaction(self, *, bulk: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error so a refused load leaves nothing behind."""
        if self.readonly:
            raise StoreError("store is read-only", where=str(self.path))
        with self._write_lock:
            conn = self._conn()
            if bulk:
                conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                self._flush_index(conn)
                self.build_deferred_indexes(conn)
                conn.execute("COMMIT")
            except BaseException:
                for rows in self._pending.values():
                    rows.clear()
                self._pending_rows = 0
                self._deferred = False  # the rollback brings the dropped indexes back
                conn.execute("ROLLBACK")
                raise
            finally:
                if bulk:
                    conn.execute("PRAGMA synchronous=NORMAL")
                with self._count_lock:
                    self._count_cache.clear()

    def defer_indexes(self, conn: sqlite3.Connection) -> bool:
        """Inside `transaction()` on an empty store: drop the secondary indexes until the transaction commits.

        The drop is part of the transaction, so a rollback or a kill leaves the indexes exactly as they were, and
        no reader ever sees the store without them. Returns False (and changes nothing) on a non-empty store,
        where rebuilding every index would cost more than the rows being added.
        """
        if self._deferred:
            return True
        if conn.execute("SELECT 1 FROM resources LIMIT 1").fetchone() is not None:
            return False
        for name in _SECONDARY_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        self._deferred = True
        return True

    def build_deferred_indexes(self, conn: sqlite3.Connection) -> None:
        """Create the indexes defer_indexes() dropped (a no-op otherwise); index rows still buffered go in first."""
        if not self._deferred:
            return
        self._flush_index(conn)
        # The sorter behind CREATE INDEX holds up to cache_size of keys in memory and spills the rest to temp files,
        # but with temp_store=MEMORY it never spills: peak memory would grow with the store. 16 MiB runs keep the
        # peak the same at 1x and 10x.
        cache = conn.execute("PRAGMA cache_size").fetchone()[0]
        conn.execute("PRAGMA temp_store=FILE")
        conn.execute("PRAGMA cache_size=-16384")
        try:
            for sql in _SECONDARY_INDEXES.values():
                conn.execute(sql)
        finally:
            conn.execute(f"PRAGMA cache_size={int(cache)}")
            conn.execute("PRAGMA temp_store=MEMORY")
        self._deferred = False

    def insert(self, conn: sqlite3.Connection, resource: dict, *, where: str = "") -> bytes:
        """Index and insert one resource inside `transaction()`; returns the stored bytes.

        Refuses resources without the HTEST synthetic marker: this store must never hold real patient data.
        """
        rtype, rid_str = resource.get("resourceType"), resource.get("id")
        label = f"{rtype}/{rid_str}"
        if rtype not in PARAMS:
            raise StoreError(f"resource type {rtype!r} is not served", where=where or label)
        if not isinstance(rid_str, str) or not _FHIR_ID.fullmatch(rid_str):
            raise StoreError(f"{rtype} id {rid_str!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})", where=where or label)
        if not is_synthetic(resource):
            raise StoreError(f"{label} lacks the synthetic marker (meta.security or meta.tag "
                             f"{SYNTHETIC_SYSTEM}|{SYNTHETIC_CODE}); refusing to store it", where=where or label)
        meta = resource.setdefault("meta", {})
        if "lastUpdated" not in meta:
            meta["lastUpdated"] = format_instant(_now())
        meta.setdefault("versionId", "1")
        body = orjson.dumps(resource)
        params = PARAMS[rtype]
        values = {name: p.extract(resource) for name, p in params.items()}
        updated = values["_lastUpdated"]
        sort = sort_date_of(resource, values)
        try:
            cur = conn.execute(
                "INSERT INTO resources (type, id, patient, last_updated, sort_date, body) VALUES (?,?,?,?,?,?)",
                (rtype, rid_str, patient_of(resource), updated[0][0] if updated else _now(),
                 NEG_INF if sort is None else sort, body),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"duplicate resource {label}", where=where or label) from None
        self._queue_index(cur.lastrowid, params, values)
        if self._pending_rows > 50_000:
            self._flush_index(conn)
        return body

    def _queue_index(self, rid: int, params: dict, values: dict[str, list[tuple]]) -> None:
        # Index rows are buffered and written with one executemany per table: per-row calls dominated load time.
        for name, vals in values.items():
            if vals:
                p = params[name]
                self._pending[p.type].extend((p.pid, *v, rid) for v in vals)
                self._pending_rows += len(vals)

    def _flush_index(self, conn: sqlite3.Connection) -> None:
        for ptype, rows in self._pending.items():
            if rows:
                conn.executemany(_INSERT[ptype], rows)
                rows.clear()
        self._pending_rows = 0

    def _index(self, conn: sqlite3.Connection, rid: int, resource: dict, params: dict) -> None:
        self._queue_index(rid, params, {name: p.extract(resource) for name, p in params.items()})
        self._flush_index(conn)

    def add(self, resources: Iterable[dict]) -> list[bytes]:
        """Insert resources in one transaction (all or nothing) and keep Group/all current."""
        with self.transaction() as conn:
            bodies = [self.insert(conn, r) for r in resources]
            self.refresh_all_group(conn)
        return bodies

    def refresh_all_group(self, conn: sqlite3.Connection) -> None:
        """(Re)write Group/all listing every patient, for Group/all/$export. Updated in place (same rid)."""
        ids = [r[0] for r in conn.execute("SELECT id FROM resources WHERE type='Patient' ORDER BY rid")]
        now = _now()
        group = {
            "resourceType": "Group", "id": ALL_GROUP_ID,
            "meta": {"versionId": "1", "lastUpdated": format_instant(now),
                     "security": [{"system": SYNTHETIC_SYSTEM, "code": SYNTHETIC_CODE,
                                   "display": "test health data"}]},
            "type": "person", "actual": True, "name": "All patients", "quantity": len(ids),
            "member": [{"entity": {"reference": f"Patient/{i}"}} for i in ids],
        }
        row = conn.execute("SELECT rid FROM resources WHERE type='Group' AND id=?", (ALL_GROUP_ID,)).fetchone()
        if row is None:
            self.insert(conn, group)
            return
        rid = row[0]
        conn.execute("UPDATE resources SET body=?, last_updated=? WHERE rid=?", (orjson.dumps(group), now, rid))
        for p in PARAMS["Group"].values():  # only Group rows share these pids, so the deletes stay small
            conn.execute(f"DELETE FROM {_TABLES[p.type]} WHERE pid=? AND rid=?", (p.pid, rid))
        self._index(conn, rid, group, PARAMS["Group"])

    def next_counter(self, conn: sqlite3.Connection, key: str, n: int) -> int:
        """Reserve n consecutive integers under `key` (persisted), returning the first."""
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        start = int(row[0]) if row else 0
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(start + n)))
        return start

    # ------------------------------------------------------------ reading

    def read(self, rtype: str, rid: str) -> bytes | None:
        row = self._conn().execute("SELECT body FROM resources WHERE type=? AND id=?", (rtype, rid)).fetchone()
        return row[0] if row else None

    def snapshot(self) -> int:
        return self._conn().execute("SELECT coalesce(max(rid), 0) FROM resources").fetchone()[0]

    def counts(self) -> dict[str, int]:
        return dict(self._conn().execute("SELECT type, count(*) FROM resources GROUP BY type").fetchall())

    def query(self, sql: str, args: Iterable = ()) -> list[tuple]:
        return self._conn().execute(sql, tuple(args)).fetchall()

    def count(self, where: str, args: list, *, join: tuple[str, list] | None = None) -> int:
        """Cached COUNT(*) for a WHERE over `resources r`; keyed by the snapshot in args so it never goes stale."""
        source = "resources r"
        if join is not None:
            source = "idx_reference x JOIN resources r ON r.rid = x.rid"
            where, args = f"{join[0]} AND {where}", [*join[1], *args]
        key = (where, tuple(args))
        with self._count_lock:
            if key in self._count_cache:
                self._count_cache.move_to_end(key)
                return self._count_cache[key]
        n = self._conn().execute(f"SELECT count(*) FROM {source} WHERE {where}", args).fetchone()[0]
        with self._count_lock:
            self._count_cache[key] = n
            while len(self._count_cache) > 2048:
                self._count_cache.popitem(last=False)
        return n

    def page(self, where: str, args: list, *, key: str | list[tuple[str, bool]], desc: bool, limit: int,
             after: tuple | None = None, before: tuple | None = None,
             join: tuple[str, list] | None = None) -> Page:
        """Keyset paging over `resources r`: rows ordered by (key, rid), strictly after or before a (key, rid).

        join = (condition on idx_reference x, args): drive the query from that index (see query.compile_join).
        key = [(expr, desc), ...]: several sort keys (desc is then ignored), see _page_multi.
        """
        if isinstance(key, list):
            return self._page_multi(where, args, keys=key, limit=limit, after=after, before=before, join=join)
        backwards = before is not None
        source, cond, cargs = _page_source(where, args, join)
        if join is not None:
            if key == "r.rid":
                key = "x.rid"  # same value; ordering by the index column lets SQLite walk the index in order
        anchor = before if backwards else after
        if anchor is not None:
            # Going forward in a descending order (or backward in an ascending one) means smaller keys.
            smaller = desc != backwards
            op = "<" if smaller else ">"
            cond += f" AND ({key} {op} ? OR ({key} = ? AND r.rid {op} ?))"
            cargs += [anchor[0], anchor[0], anchor[1]]
        reverse = desc != backwards
        order = "DESC" if reverse else "ASC"
        order_sql = f"ORDER BY {key} {order}, r.rid {order}" if key not in ("r.rid", "x.rid") else \
            f"ORDER BY {key} {order}"
        sql = f"SELECT r.rid, {key}, r.type, r.id, r.body FROM {source} WHERE {cond} {order_sql} LIMIT ?"
        rows = [Row(*t) for t in self._conn().execute(sql, cargs + [limit + 1])]
        return _page_of(rows, limit, backwards, after is not None)

    def _page_multi(self, where: str, args: list, *, keys: list[tuple[str, bool]], limit: int,
                    after: tuple | None, before: tuple | None, join: tuple[str, list] | None) -> Page:
        """page() for several sort keys, each with its own direction: Row.key is the list of key values.

        Ties on every key are broken by rid in the direction of the last key. The keyset condition for "after
        (a1, a2, .., rid)" is the usual expansion: k1 > a1 OR (k1 = a1 AND k2 > a2) OR ... with > or < per key.
        """
        backwards = before is not None
        source, cond, cargs = _page_source(where, args, join)
        order = [*keys, ("r.rid", keys[-1][1])]
        anchor = before if backwards else after
        if anchor is not None:
            values = [*anchor[0], anchor[1]]
            alternatives = []
            for i, (expr, desc) in enumerate(order):
                op = "<" if desc != backwards else ">"
                eqs = [f"{e} = ?" for e, _ in order[:i]]
                alternatives.append("(" + " AND ".join([*eqs, f"{expr} {op} ?"]) + ")")
                cargs += [*values[:i], values[i]]
            cond += " AND (" + " OR ".join(alternatives) + ")"
        order_sql = ", ".join(f"{e} {'DESC' if desc != backwards else 'ASC'}" for e, desc in order)
        cols = ", ".join(e for e, _ in keys)
        sql = f"SELECT r.rid, {cols}, r.type, r.id, r.body FROM {source} WHERE {cond} ORDER BY {order_sql} LIMIT ?"
        n = len(keys)
        rows = [Row(t[0], list(t[1:1 + n]), *t[1 + n:]) for t in self._conn().execute(sql, cargs + [limit + 1])]
        return _page_of(rows, limit, backwards, after is not None)

    def query_once(self, sql: str, args: Iterable = ()) -> list[tuple]:
        """A query on a short-lived connection, for one-off threads (a thread-local one would outlive them)."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, tuple(args)).fetchall()
        finally:
            conn.close()

    def iter_bodies(self, where: str, args: list, *, batch: int = 2000) -> Iterator[list[bytes]]:
        """Stream bodies in rid order in batches (flat memory for $export).

        Uses its own connection: a streaming response resumes this generator on whichever worker thread is free,
        and a thread-local connection could be in use there.
        """
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            conn.execute("PRAGMA mmap_size=1073741824")
            cur = conn.execute(f"SELECT r.body FROM resources r WHERE {where} ORDER BY r.rid", args)
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    return
                yield [r[0] for r in rows]
        finally:
            conn.close()

def served_types() -> tuple[str, ...]:
    return RESOURCE_TYPES


def _page_source(where: str, args: list, join: tuple[str, list] | None) -> tuple[str, str, list]:
    """FROM clause, WHERE condition and arguments of a page query, driven by idx_reference when `join` is given."""
    if join is None:
        return "resources r", where, list(args)
    return "idx_reference x JOIN resources r ON r.rid = x.rid", f"{join[0]} AND {where}", [*join[1], *args]


def _page_of(rows: list, limit: int, backwards: bool, has_anchor: bool) -> Page:
    """rows were fetched with LIMIT limit + 1: the extra row says whether there is more in the fetch direction."""
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
        return Page(rows, has_next=True, has_prev=more)
    return Page(rows, has_next=more, has_prev=has_anchor)
