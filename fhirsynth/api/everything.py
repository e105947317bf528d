"""GET /Patient/{id}/$everything: the patient's compartment, paged like a search."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response

from fhirsynth.api.bundle import bundle_bytes
from fhirsynth.api.context import ServerContext, base_url, fhir_response, require
from fhirsynth.api.errors import ApiError
from fhirsynth.api.paging import Cursor
from fhirsynth.store.dates import DateFormatError, parse_instant
from fhirsynth.store.params import COMPARTMENT_TYPES
from fhirsynth.store.query import SearchError

_KEY = "(r.type != 'Patient')"  # the Patient first, then everything else in load order


def add_routes(router: APIRouter, ctx: ServerContext) -> None:
    settings = ctx.settings

    @router.get("/Patient/{pid}/$everything", summary="Patient $everything")
    async def everything(pid: str, request: Request) -> Response:
        require(request, "Patient")
        store = ctx.store
        if store.read("Patient", pid) is None:
            raise ApiError(404, f"Patient/{pid} not found", code="not-found")
        count, cursor, types, since = settings.default_count, None, list(COMPARTMENT_TYPES), None
        canonical: list[tuple[str, str]] = []
        for k, v in request.query_params.multi_items():
            if k in ("_format", "_pretty"):
                continue
            if k == "_cursor":
                cursor = Cursor.decode(v)
                continue
            if k == "_count":
                if not v.isdigit():
                    raise SearchError("_count must be a non-negative integer", param="_count")
                count = min(int(v), settings.max_count)
            elif k == "_type":
                types = [t.strip() for t in v.split(",") if t.strip()]
                bad = [t for t in types if t not in COMPARTMENT_TYPES]
                if bad:
                    raise SearchError(f"not in the Patient compartment: {', '.join(bad)}", param="_type")
            elif k == "_since":
                try:
                    since = parse_instant(v)
                except DateFormatError as exc:
                    raise SearchError(str(exc), param="_since") from None
            else:
                raise SearchError(f"$everything does not support {k!r} (supported: _count, _type, _since)", param=k)
            canonical.append((k, v))
        for t in types:
            require(request, t)
        snapshot = cursor.snapshot if cursor else store.snapshot()
        marks = ",".join("?" * len(types))
        where = f"r.patient = ? AND r.type IN ({marks}) AND r.rid <= ?"
        args: list = [pid, *types, snapshot]
        if since is not None:
            where += " AND r.last_updated > ?"
            args.append(since)
        total = store.count(where, args)
        after = before = None
        if cursor:
            anchor = (cursor.key, cursor.rid)
            after, before = (anchor, None) if cursor.direction == "next" else (None, anchor)
        base = base_url(request, f"/Patient/{pid}/$everything")
        op = f"{base}/Patient/{pid}/$everything"

        def link(c: Cursor | None) -> str:
            items = canonical + ([("_cursor", c.encode())] if c else [])
            return op + (f"?{urlencode(items)}" if items else "")

        links = [("self", link(cursor)), ("first", link(None))]
        entries = []
        if count:
            page = store.page(where, args, key=_KEY, desc=False, limit=count, after=after, before=before)
            rows = page.rows
            if rows and page.has_prev:
                links.append(("previous", link(Cursor("prev", rows[0].key, rows[0].rid, snapshot))))
            if rows and page.has_next:
                links.append(("next", link(Cursor("next", rows[-1].key, rows[-1].rid, snapshot))))
            entries = [(f"{base}/{r.type}/{r.id}", r.body, "match") for r in rows]
        return fhir_response(bundle_bytes(btype="searchset", total=total, links=links, entries=entries))

