"""Bundles assembled from pre-serialized resource bytes (no parse, no re-dump of the resources)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import orjson

from fhirsynth.store.dates import format_instant


def bundle_bytes(*, btype: str, total: int | None, links: list[tuple[str, str]],
                 entries: Iterable[tuple[str | None, bytes, str | None]]) -> bytes:
    """entries: (fullUrl or None, resource JSON bytes, search mode or None)."""
    bundle: dict = {"resourceType": "Bundle", "id": uuid.uuid4().hex,
                  "meta": {"lastUpdated": format_instant(time.time())}, "type": btype}
    if total is not None:
        bundle["total"] = total
    if links:
        bundle["link"] = [{"relation": rel, "url": url} for rel, url in links]
    parts: list[bytes] = []
    for full_url, body, mode in entries:
        # fullUrls are base + "Type/id" (the store only holds FHIR ids), so plain concatenation is several times
        # faster than dumping an entry object; anything needing escapes (an odd Host header) goes through orjson.
        if full_url and ('"' in full_url or "\\" in full_url or not full_url.isprintable()):
            full_url = orjson.dumps(full_url).decode()[1:-1]
        head = f'{{"fullUrl":"{full_url}","resource":' if full_url else '{"resource":'
        tail = f',"search":{{"mode":"{mode}"}}}}' if mode else "}"
        parts += (b"," if parts else b"", head.encode(), body, tail.encode())
    head_bytes = orjson.dumps(bundle)
    if not parts:
        return head_bytes
    return b"".join((head_bytes[:-1], b',"entry":[', *parts, b"]}"))
