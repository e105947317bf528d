"""Search: HTTP parameters -> a SearchRequest, and running it against the store into a searchset Bundle.

Strictness: unknown parameters and unsupported modifiers are a 400 unless `Prefer: handling=lenient`, which
ignores them (and leaves them out of the self link). Malformed values are always a 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlencode

import orjson

from fhirsynth.api.bundle import bundle_bytes
from fhirsynth.api.errors import outcome
from fhirsynth.api.paging import Cursor
from fhirsynth.api.settings import ServerSettings
from fhirsynth.store.params import INCLUDES, PARAMS, REVINCLUDES, SORT_DATE_PARAM
from fhirsynth.store.query import Clause, SearchError, check_modifier, compile_clause, compile_join
from fhirsynth.store.sqlite import Row, Store

# Parameters that steer the result rather than select resources.
# _totalMethod is Aidbox's name for _total; fhirpy sends it from SearchSet.count().
CONTROL = frozenset({"_count", "_sort", "_summary", "_elements", "_include", "_revinclude", "_total", "_format",
                     "_cursor", "_pretty", "_totalMethod"})
_MANDATORY_ELEMENTS = ("resourceType", "id", "meta")
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


@dataclass
class SearchRequest:
    rtype: str
    clauses: list[Clause] = field(default_factory=list)
    sort_key: str = "r.rid"  # SQL expression
    sort_desc: bool = False
    sort_keys: list[tuple[str, bool]] | None = None  # several _sort keys: [(SQL expression, descending)]
    count: int = 50
    summary_count: bool = False
    elements: list[str] | None = None
    includes: list[tuple[str, str, str]] = field(default_factory=list)  # (source type, param, target type)
    revincludes: list[tuple[str, str]] = field(default_factory=list)  # (source type, param)
    total: bool = True
    cursor: Cursor | None = None
    canonical: list[tuple[str, str]] = field(default_factory=list)  # accepted params, for links
    warnings: list[str] = field(default_factory=list)


def split_or(value: str) -> list[str]:
    """Comma = OR; "\\," is a literal comma (FHIR R4 3.1.1.3)."""
    if "\\" not in value:
        return value.split(",")
    out, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] in ",|$\\":
            cur.append(value[i + 1] if value[i + 1] == "," else value[i:i + 2])
            i += 2
            continue
        if ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _int(value: str, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise SearchError(f"{name} must be an integer, got {value!r}", param=name) from None
    if n < 0:
        raise SearchError(f"{name} must not be negative", param=name)
    return n


def _sort(req: SearchRequest, value: str) -> None:
    """`_sort=birthdate,-_id`: keys in priority order, '-' for descending (FHIR R4 3.1.1.5.3)."""
    keys = [k.strip() for k in value.split(",")]
    if not value.strip() or any(not k for k in keys):
        raise SearchError(f"_sort={value!r} has an empty sort key", param="_sort")
    columns = {"_id": "r.id", "_lastUpdated": "r.last_updated"}
    if req.rtype in SORT_DATE_PARAM:
        columns[SORT_DATE_PARAM[req.rtype]] = "r.sort_date"
    sort: list[tuple[str, bool]] = []
    for key in keys:
        name = key[1:] if key.startswith("-") else key
        if name not in columns:
            raise SearchError(f"cannot sort {req.rtype} by {name!r} (supported: {', '.join(columns)}, each "
                              "optionally with '-', several separated by commas)", param="_sort")
        if any(col == columns[name] for col, _ in sort):
            raise SearchError(f"_sort names {name!r} twice", param="_sort")
        sort.append((columns[name], key.startswith("-")))
    req.sort_key, req.sort_desc = sort[0]
    req.sort_keys = sort if len(sort) > 1 else None


def parse_search(rtype: str, items: list[tuple[str, str]], *, settings: ServerSettings,
                 lenient: bool) -> SearchRequest:
    req = SearchRequest(rtype, count=settings.default_count)
    params = PARAMS[rtype]
    if len(items) > settings.max_params:
        raise SearchError(f"too many parameters ({len(items)} > {settings.max_params})", param="*")
    for raw_key, value in items:
        name, _, modifier = raw_key.partition(":")
        mod = modifier or None
        if name in CONTROL:
            if name in ("_format", "_pretty"):
                continue  # content negotiation happened already
            if name == "_cursor":
                req.cursor = Cursor.decode(value)
                continue
            _control(req, name, mod, value, settings, lenient)
            req.canonical.append((raw_key, value))
            continue
        if name == "_id":
            param = None
        elif name in params:
            param = params[name]
        else:
            if lenient:
                req.warnings.append(f"ignored unknown search parameter {raw_key!r} (Prefer: handling=lenient)")
                continue
            known = ", ".join(["_id", *params])
            raise SearchError(f"unknown search parameter {name!r} for {rtype} (supported: {known})", param=raw_key)
        try:
            check_modifier(param, name, mod)
        except SearchError:
            if lenient:
                req.warnings.append(f"ignored {raw_key!r}: unsupported modifier (Prefer: handling=lenient)")
                continue
            raise
        clause = Clause(name, param, mod, split_or(value))
        compile_clause(clause)  # validate values now: a malformed value is a 400 even on page 2
        req.clauses.append(clause)
        req.canonical.append((raw_key, value))
    return req


def _control(req: SearchRequest, name: str, mod: str | None, value: str, settings: ServerSettings,
             lenient: bool) -> None:
    if mod and not (name in ("_include", "_revinclude") and mod == "iterate"):
        raise SearchError(f"{name} takes no modifier", param=f"{name}:{mod}")
    if name == "_count":
        n = _int(value, "_count")
        if n > settings.max_count:
            req.warnings.append(f"_count={n} exceeds the maximum; clamped to {settings.max_count}")
            n = settings.max_count
        req.count = n
    elif name == "_sort":
        _sort(req, value)
    elif name == "_summary":
        if value == "count":
            req.summary_count = True
        elif value != "false":
            raise SearchError(f"_summary={value} is not supported (supported: count, false)", param="_summary")
    elif name in ("_total", "_totalMethod"):
        if value == "count":
            value = "accurate"
        if value not in ("none", "estimate", "accurate"):
            raise SearchError("_total must be none, estimate or accurate", param="_total")
        req.total = value != "none"
    elif name == "_elements":
        req.elements = [e.strip() for e in value.split(",") if e.strip()]
    elif name == "_include":
        if mod == "iterate":
            raise SearchError("_include:iterate is not supported", param="_include:iterate")
        src, _, pname = value.partition(":")
        pname, _, target = pname.partition(":")
        if src != req.rtype or (src, pname) not in INCLUDES or (target and target != INCLUDES[(src, pname)]):
            supported = ", ".join(f"{s}:{p}" for s, p in INCLUDES if s == req.rtype) or "none"
            raise SearchError(f"_include={value} is not supported for {req.rtype} (supported: {supported})",
                              param="_include")
        req.includes.append((src, pname, INCLUDES[(src, pname)]))
    elif name == "_revinclude":
        if mod == "iterate":
            raise SearchError("_revinclude:iterate is not supported", param="_revinclude:iterate")
        src, _, pname = value.partition(":")
        pname = pname.partition(":")[0]
        if (src, pname) not in REVINCLUDES.get(req.rtype, []):
            supported = ", ".join(f"{s}:{p}" for s, p in REVINCLUDES.get(req.rtype, [])) or "none"
            raise SearchError(f"_revinclude={value} is not supported for {req.rtype} (supported: {supported})",
                              param="_revinclude")
        req.revincludes.append((src, pname))


def _where(req: SearchRequest, snapshot: int) -> tuple[str, list, tuple[str, list] | None]:
    """WHERE over resources r, plus an optional index join that drives the page query (store.page(join=...))."""
    compiled = [compile_clause(c) for c in req.clauses]
    join, join_at = None, -1
    if req.sort_key == "r.rid":
        for i, clause in enumerate(req.clauses):
            if (join := compile_join(clause)) is not None:
                join_at = i
                break
    # When an index subquery can drive the search ("r.rid IN (...)"), the unary + keeps SQLite from scanning
    # the type index instead and probing the subquery per row (measured: 40 ms -> 0.3 ms for patient=X).
    driven = join is not None or (any(c.startswith("r.rid IN") for c, _ in compiled)
                                  and not any(c.startswith("r.id IN") for c, _ in compiled))
    conds = ["+r.type = ?", "+r.rid <= ?"] if driven else ["r.type = ?", "r.rid <= ?"]
    args: list = [req.rtype, snapshot]
    for i, (c, a) in enumerate(compiled):
        if i != join_at:
            conds.append(c)
            args.extend(a)
    return " AND ".join(conds), args, join


def _subset(body: bytes, elements: list[str]) -> bytes:
    res = orjson.loads(body)
    keep = {k: v for k, v in res.items() if k in elements or k in _MANDATORY_ELEMENTS}
    meta = dict(keep.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
    keep["meta"] = meta
    return orjson.dumps(keep)


def _link(base: str, rtype: str, query: str, cursor: Cursor | None = None) -> str:
    """query = the urlencoded canonical parameters (encoded once per request); the cursor is URL-safe base64."""
    if cursor:
        query = f"{query}&_cursor={cursor.encode()}" if query else f"_cursor={cursor.encode()}"
    return f"{base}/{rtype}?{query}" if query else f"{base}/{rtype}"


def _row_ref(row: Row) -> str:
    return f"{row.type}/{row.id}"


def run_search(store: Store, req: SearchRequest, base: str, settings: ServerSettings) -> bytes:
    snapshot = req.cursor.snapshot if req.cursor else store.snapshot()
    where, args, join = _where(req, snapshot)
    total = store.count(where, args, join=join) if (req.total or req.summary_count or req.count == 0) else None
    warnings = list(req.warnings)
    query = urlencode(req.canonical)
    links = [("self", _link(base, req.rtype, query, req.cursor))]
    if req.summary_count or req.count == 0:
        return _bundle(total, links, [], warnings)
    after = before = None
    if req.cursor:
        _check_cursor_key(req.cursor.key, len(req.sort_keys) if req.sort_keys else None)
        anchor = (req.cursor.key, req.cursor.rid)
        after, before = (anchor, None) if req.cursor.direction == "next" else (None, anchor)
    page = store.page(where, args, key=req.sort_keys or req.sort_key, desc=req.sort_desc, limit=req.count,
                      after=after, before=before, join=join)
    rows = page.rows
    links.insert(0, ("first", _link(base, req.rtype, query)))
    if rows and page.has_prev:
        links.append(("previous", _link(base, req.rtype, query, Cursor("prev", rows[0].key, rows[0].rid, snapshot))))
    if rows and page.has_next:
        links.append(("next", _link(base, req.rtype, query, Cursor("next", rows[-1].key, rows[-1].rid, snapshot))))
    entries: list[tuple[str | None, bytes, str | None]] = []
    for row in rows:
        body = _subset(row.body, req.elements) if req.elements else row.body
        entries.append((f"{base}/{_row_ref(row)}", body, "match"))
    if rows and (req.includes or req.revincludes):
        included, capped = _included(store, req, rows, snapshot, settings.max_includes)
        entries.extend((f"{base}/{t}/{i}", b, "include") for t, i, b in included)
        if capped:
            warnings.append(f"more than {settings.max_includes} included resources; the rest were left out")
    return _bundle(total, links, entries, warnings)


def _check_cursor_key(key: object, n_keys: int | None) -> None:
    """A cursor from another _sort (or a forged one) must not reach SQLite as a wrong-shaped parameter (-> 500)."""
    scalar = (str, int, float, type(None))
    ok = (isinstance(key, list) and len(key) == n_keys and all(isinstance(k, scalar) for k in key)) \
        if n_keys else isinstance(key, scalar)
    if not ok:
        raise SearchError("invalid or expired paging cursor (it belongs to another _sort)", param="_cursor")


def _bundle(total: int | None, links: list, entries: list, warnings: list[str]) -> bytes:
    if warnings:
        oo = outcome("; ".join(warnings), severity="warning", code="informational")
        entries = [*entries, (None, orjson.dumps(oo), "outcome")]
    return bundle_bytes(btype="searchset", total=total, links=links, entries=entries)


def _included(store: Store, req: SearchRequest, rows: list[Row], snapshot: int,
              cap: int) -> tuple[list[tuple[str, str, bytes]], bool]:
    seen = {(r.type, r.id) for r in rows}
    out: list[tuple[str, str, bytes]] = []
    wanted: dict[str, set[str]] = {}
    if req.includes:
        resources = [orjson.loads(r.body) for r in rows]
        for src, pname, target in req.includes:
            param = PARAMS[src][pname]
            for res in resources:
                for ref_type, ref_id in param.extract(res):
                    if ref_type == target:
                        wanted.setdefault(target, set()).add(ref_id)
    for target, ids in wanted.items():
        ids_list = sorted(i for i in ids if (target, i) not in seen)
        for start in range(0, len(ids_list), 500):
            chunk = ids_list[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for rtype, rid, body in store.query(
                    f"SELECT type, id, body FROM resources WHERE type = ? AND rid <= ? AND id IN ({marks})",
                    [target, snapshot, *chunk]):
                seen.add((rtype, rid))
                out.append((rtype, rid, body))
    ids = [r.id for r in rows]
    marks = ",".join("?" * len(ids))
    for src, pname in req.revincludes:
        pid = PARAMS[src][pname].pid
        for rtype, rid, body in store.query(
                f"SELECT r.type, r.id, r.body FROM resources r WHERE r.rid <= ? AND r.rid IN "
                f"(SELECT rid FROM idx_reference WHERE pid = ? AND ref_id IN ({marks})) ORDER BY r.rid LIMIT ?",
                [snapshot, pid, *ids, cap + 1]):
            if (rtype, rid) not in seen:
                seen.add((rtype, rid))
                out.append((rtype, rid, body))
    capped = len(out) > cap
    return out[:cap], capped
