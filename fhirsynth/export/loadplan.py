"""What `load` sends: any Bundle or NDJSON resource as an entry with a `urn:uuid` fullUrl, chunks of at most N
entries in dependency order, and each entry's request for the id mode the server allows.

Id modes (`--ids`):
- client: PUT Type/id, our ids (idempotent; needs the right to choose ids; an entry without an id is POSTed).
- server: POST, the server assigns ids; references inside a transaction use the entries' urn:uuid fullUrls, which
  the server resolves, and references to earlier chunks are rewritten to the ids the server returned.
- conditional: POST with If-None-Exist on the resource's identifier (fhirsynth gives every resource one), so a
  reload finds what the first load stored instead of duplicating it.

References are resolved at send time: `Located` maps every name a resource is known by (its fullUrl, `Type/id`,
an absolute URL ending in `Type/id`) to its urn:uuid, and every stored urn:uuid to the `Type/id` the server gave it.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fhirsynth.export.bundles import iter_references, reference_parts, rewrite_refs
from fhirsynth.export.ndjson_source import dependency_rank
from fhirsynth.timeline.assembler import RESOURCE_ID_SYSTEM

IdMode = Literal["client", "server", "conditional"]
ID_MODES: tuple[IdMode, ...] = ("client", "server", "conditional")
URN = "urn:uuid:"
# a transaction of conditional creates needs serializable isolation, which servers cap lower than other
# transactions (Medplum refuses more than 8 entries: "Transaction requires strict isolation but has too many entries")
CONDITIONAL_MAX_ENTRIES = 8
# Bundle types whose entries are data to store; message and history Bundles are not.
LOADABLE_TYPES = ("transaction", "batch", "collection", "searchset", "document")
PROVENANCE_AGENT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type|assembler"


class NotLoadable(ValueError):
    """A Bundle or entry `load` cannot send, with the reason."""


@dataclass
class Entry:
    """One resource to store: its urn:uuid fullUrl (what references inside a transaction point at) and the other
    names references may use for it."""

    full_url: str
    resource: dict[str, Any]
    aliases: tuple[str, ...] = ()
    if_none_exist: str | None = None  # the source transaction's own conditional create, kept with server ids

    @property
    def rtype(self) -> str:
        return str(self.resource.get("resourceType"))

    @property
    def name(self) -> str:
        return f"{self.rtype}/{self.resource.get('id') or '(new)'}"


def local_name(ref: str) -> str:
    """`Type/id` of a reference or location: drops a base URL and a `/_history/v` suffix; others unchanged."""
    parts = reference_parts(ref)
    return f"{parts[0]}/{parts[1]}" if parts else ref


def entry_for(resource: dict[str, Any], full_url: str | None = None) -> Entry:
    """An Entry for a resource: its urn:uuid fullUrl kept, else a new one; `Type/id` and the fullUrl as aliases."""
    aliases = []
    if resource.get("id"):
        aliases.append(f"{resource['resourceType']}/{resource['id']}")
    if full_url and not full_url.startswith(URN):
        aliases.append(full_url)
        full_url = None
    return Entry(full_url or f"{URN}{uuid.uuid4()}", resource, tuple(aliases))


def bundle_entries(doc: Any) -> list[Entry]:
    """The resources of any Bundle to store (transaction, batch, collection, searchset, document) as entries whose
    references to each other point at their urn:uuid fullUrls. NotLoadable names what cannot be loaded."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        found = doc.get("resourceType") if isinstance(doc, dict) else type(doc).__name__
        raise NotLoadable(f"not a FHIR Bundle (resourceType {found!r})")
    btype = doc.get("type")
    if btype not in LOADABLE_TYPES:
        raise NotLoadable(f"a {btype!r} Bundle holds no data to store; `load` takes "
                          f"{', '.join(LOADABLE_TYPES)} Bundles or NDJSON")
    entries: list[Entry] = []
    for i, raw in enumerate(doc.get("entry") or []):
        if not isinstance(raw, dict):
            raise NotLoadable(f"Bundle.entry[{i}] is not an object")
        method = ((raw.get("request") or {}).get("method") or "").upper()
        if btype in ("transaction", "batch") and method not in ("PUT", "POST"):
            raise NotLoadable(f"Bundle.entry[{i}] is a {method or 'request without a method'}: `load` only stores "
                              "resources (PUT or POST entries)")
        if btype == "searchset" and (raw.get("search") or {}).get("mode") == "outcome":
            continue  # the search's own OperationOutcome, not data
        resource = raw.get("resource")
        if not isinstance(resource, dict) or not resource.get("resourceType"):
            raise NotLoadable(f"Bundle.entry[{i}] has no resource")
        entry = entry_for(resource, raw.get("fullUrl"))
        entry.if_none_exist = (raw.get("request") or {}).get("ifNoneExist") or None
        entries.append(entry)
    names = {alias: e.full_url for e in entries for alias in e.aliases}
    if names:
        for e in entries:
            e.resource = _rewrite_local(e.resource, names)
    return entries


def _rewrite_local(resource: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """References by alias (absolute, relative or versioned) to entries of the same Bundle -> their fullUrl."""
    found = {ref for ref in iter_references(resource) if ref not in names and local_name(ref) in names}
    mapping = {**names, **{ref: names[local_name(ref)] for ref in found}}
    return rewrite_refs(resource, mapping)


def dependency_order(entries: list[Entry]) -> list[Entry]:
    """Entries so that each comes after the entries it refers to (a document's Composition after its sections'
    resources, Provenance after its targets), else by type rank (Patient first) and Bundle order. A reference
    cycle is broken at its lowest (rank, position)."""
    index = {e.full_url: i for i, e in enumerate(entries)}
    needs = [{index[r] for r in iter_references(e.resource) if r in index} - {i} for i, e in enumerate(entries)]
    users: list[list[int]] = [[] for _ in entries]
    for i, deps in enumerate(needs):
        for d in deps:
            users[d].append(i)
    key = [(dependency_rank(e.rtype), i) for i, e in enumerate(entries)]
    waiting = [len(d) for d in needs]
    ready = [key[i] for i in range(len(entries)) if not waiting[i]]
    heapq.heapify(ready)
    done = [False] * len(entries)
    out: list[Entry] = []
    while len(out) < len(entries):
        if not ready:  # a cycle: release its first entry
            heapq.heappush(ready, min(key[i] for i in range(len(entries)) if not done[i]))
        _, i = heapq.heappop(ready)
        if done[i]:
            continue
        done[i] = True
        out.append(entries[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0 and not done[u]:
                heapq.heappush(ready, key[u])
    return out


def chunks(entries: list[Entry], max_entries: int, mode: IdMode = "client") -> list[list[Entry]]:
    """Entries in dependency order (see dependency_order), at most max_entries each. Conditional mode sends
    Provenance in a chunk of its own: its If-None-Exist names the Patient by the id the server gave it, which is
    known only once the Patient is stored. With server ids, a source's own conditional creates go in chunks of at
    most CONDITIONAL_MAX_ENTRIES: servers cap transactions that need serializable isolation lower."""
    ordered = dependency_order(entries)
    tail: list[Entry] = []
    if mode == "conditional":
        tail = [e for e in ordered if e.rtype == "Provenance"]
        ordered = [e for e in ordered if e.rtype != "Provenance"]
    out: list[list[Entry]] = []
    strict = False  # the open chunk holds a conditional create
    for e in ordered:
        e_strict = mode == "server" and e.if_none_exist is not None
        limit = min(max_entries, CONDITIONAL_MAX_ENTRIES) if (strict or e_strict) else max_entries
        if not out or len(out[-1]) >= limit:
            out.append([])
            strict = False
        out[-1].append(e)
        strict = strict or e_strict
    out += [tail[i: i + max_entries] for i in range(0, len(tail), max_entries)]
    return out or [[]]


@dataclass
class Located:
    """Where each resource of the load is: alias -> urn:uuid of its entry, urn:uuid -> `Type/id` once stored."""

    names: dict[str, str] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)
    urns: set[str] = field(default_factory=set)  # the fullUrls of every entry of the load
    # resource types of an NDJSON export: a `Type/id` reference to one of them that is not stored yet would point
    # at the wrong resource once the server assigns ids, so it is refused rather than sent
    export_types: frozenset[str] = frozenset()

    def add(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self.urns.add(e.full_url)
            for alias in e.aliases:
                self.names[alias] = e.full_url

    def resolve(self, ref: str, in_chunk: set[str], *, batch: bool) -> str:
        """What to send for a reference: the urn of an entry of the same transaction, else where it was stored."""
        urn = ref if ref.startswith(URN) else self.names.get(ref) or self.names.get(local_name(ref))
        if urn is None:
            return ref
        if urn in in_chunk and not batch:
            return urn
        return self.stored.get(urn, ref)  # a urn reference: urn is ref itself


def conditional_query(resource: dict[str, Any], provenance_target: str | None = None) -> str | None:
    """If-None-Exist search for a resource: fhirsynth's resource identifier, else the first identifier with a system
    and value; a fhirsynth Provenance (no identifier element) by its Patient target and assembler agent."""
    ids = resource.get("identifier")
    ids = [ids] if isinstance(ids, dict) else ids or []
    usable = [i for i in ids if isinstance(i, dict) and i.get("system") and i.get("value")]
    usable.sort(key=lambda i: i["system"] != RESOURCE_ID_SYSTEM)
    if usable:
        return f"identifier={usable[0]['system']}|{usable[0]['value']}"
    if resource.get("resourceType") == "Provenance" and provenance_target:
        agent_types = {f"{c.get('system')}|{c.get('code')}" for a in resource.get("agent") or []
                       for c in (a.get("type") or {}).get("coding") or []}
        if PROVENANCE_AGENT_TYPE in agent_types:
            return f"target={provenance_target}&agent-type={PROVENANCE_AGENT_TYPE}"
    return None


@dataclass
class Prepared:
    """A Bundle ready to POST and, per entry, the Entry it stores (to read back where the server put it)."""

    bundle: dict[str, Any]
    entries: list[Entry]
    unconditional: int = 0  # conditional mode: entries POSTed without If-None-Exist (no identifier to match)


def prepare(chunk: list[Entry], located: Located, mode: IdMode, *, batch: bool) -> Prepared:
    """The transaction (or batch) for a chunk: references resolved against what is stored, requests per id mode.
    NotLoadable when a reference would have to point at something not stored yet (server-assigned ids)."""
    in_chunk = {e.full_url for e in chunk}
    # client mode: a PUT's location is known before it is sent, so a batch may point at it in the same request
    if mode == "client":
        for e in chunk:
            if e.resource.get("id") and e.full_url not in located.stored:
                located.stored[e.full_url] = f"{e.rtype}/{e.resource['id']}"
    out, unconditional = [], 0
    for e in chunk:
        refs = set(iter_references(e.resource))
        mapping = {ref: located.resolve(ref, in_chunk, batch=batch) for ref in refs}
        for ref, sent in mapping.items():
            # an entry of the load not stored yet (a urn:uuid nothing in the load has is the server's to judge)
            if sent in located.urns and (batch or sent not in in_chunk):
                raise NotLoadable(f"{e.name} refers to {ref}, which is not stored yet"
                                  + (" (a batch resolves no reference between its entries, so with server-assigned "
                                     "ids it must be stored by an earlier batch)" if batch else
                                     " (a reference cycle between transactions?)"))
            if mode != "client" and sent == ref and (reference_parts(ref) or ("",))[0] in located.export_types:
                raise NotLoadable(f"{e.name} refers to {ref}, which this export holds but has not stored yet; "
                                  "with server-assigned ids the referenced type must load first (or use --ids client)")
        resource = rewrite_refs(e.resource, {k: v for k, v in mapping.items() if k != v})
        entry: dict[str, Any] = {"fullUrl": e.full_url}
        if mode == "client" and resource.get("id"):
            entry["request"] = {"method": "PUT", "url": f"{e.rtype}/{resource['id']}"}
        else:
            resource = {k: v for k, v in resource.items() if k != "id"}
            entry["request"] = {"method": "POST", "url": e.rtype}
            if mode == "server" and e.if_none_exist:
                entry["request"]["ifNoneExist"] = e.if_none_exist
            if mode == "conditional":
                # the resource's references are rewritten already: a stored Patient is `Patient/<server id>`
                target = next((t["reference"] for t in resource.get("target") or []
                               if isinstance(t, dict) and str(t.get("reference")).startswith("Patient/")), None)
                query = conditional_query(resource, target) or e.if_none_exist
                if query:
                    entry["request"]["ifNoneExist"] = query
                else:
                    unconditional += 1
        entry["resource"] = resource
        out.append(entry)
    bundle = {"resourceType": "Bundle", "type": "batch" if batch else "transaction", "entry": out}
    return Prepared(bundle, list(chunk), unconditional)


def batch_steps(chunk: list[Entry], mode: IdMode) -> list[list[Entry]]:
    """A chunk as batches a server can process entry by entry: one batch in client mode (every id is known),
    else one per dependency rank, so what an entry points at is stored by an earlier batch."""
    if mode == "client":
        return [chunk]
    steps: dict[int, list[Entry]] = {}
    for e in chunk:
        steps.setdefault(dependency_rank(e.rtype), []).append(e)
    return [steps[k] for k in sorted(steps)]


def record_locations(prepared: Prepared, answer: dict[str, Any], located: Located) -> list[str]:
    """Note where the server stored each entry (response.location, else the returned resource, else the PUT url);
    returns a message for each entry whose location the answer does not give."""
    missing = []
    for e, sent, got in zip(prepared.entries, prepared.bundle["entry"], answer.get("entry") or []):
        response = got.get("response") or {}
        where = response.get("location")
        if not where and isinstance(got.get("resource"), dict) and got["resource"].get("id"):
            where = f"{got['resource']['resourceType']}/{got['resource']['id']}"
        if not where and sent["request"]["method"] == "PUT":
            where = sent["request"]["url"]
        if where:
            located.stored[e.full_url] = local_name(where)
        else:
            missing.append(f"{e.name}: the server's answer says neither its location nor its id")
    return missing
