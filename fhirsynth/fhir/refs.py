"""FHIR references: Bundle fullUrl maps and normalisation to one key form.

Keys are "Type/id" for literal references (relative, absolute URL or a Bundle-local `urn:uuid:` resolved through
the Bundle's fullUrls), the unchanged "urn:uuid:..." when no entry of the Bundle carries it, and
"Type?param=value" (url-decoded) for conditional references such as Synthea's `Patient?identifier=system|value`.
"""

from __future__ import annotations

from urllib.parse import unquote


def ref_key(ref: str, refs: dict[str, str] | None) -> str:
    if refs is not None:
        hit = refs.get(ref)
        if hit is not None:
            return hit
    if ref.startswith("urn:"):
        return ref
    if "?" in ref:
        head, _, query = ref.partition("?")
        return f"{head.rsplit('/', 1)[-1]}?{unquote(query)}"
    parts = ref.split("/")
    if len(parts) == 2:
        return ref
    if "_history" in parts:  # Type/id/_history/vid
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return ref


def id_from_full_url(full_url: str) -> str | None:
    """The id a fullUrl implies: urn:uuid:X -> X, http://server/fhir/Type/X -> X."""
    if full_url.startswith("urn:uuid:") or full_url.startswith("urn:oid:"):
        return full_url[9:] or None
    tail = full_url.rstrip("/").rsplit("/", 1)[-1]
    return tail or None


def ref_id(key: str) -> str:
    """The id part of a normalised key ("Encounter/abc" -> "abc", "urn:uuid:abc" -> "abc")."""
    if key.startswith("urn:uuid:"):
        return key[9:]
    return key.rsplit("/", 1)[-1]
