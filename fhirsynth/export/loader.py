"""POST an export to a FHIR server: bounded concurrency, retries, honest report.

What it loads: a fhirsynth export (any --format), a Bulk Data NDJSON directory, or a directory (or one file) of
FHIR Bundles of any data-holding type (transaction, batch, collection, searchset, document), from the manifest.json
when there is one, else every *.json / *.json.gz / *.ndjson(.gz). Each Bundle becomes transactions of at most
--max-entries entries in dependency order, with ids as `--ids` says (see loadplan).
429 and 5xx answers and connection errors are retried with exponential backoff (Retry-After honoured);
other 4xx answers fail the Bundle at once with the server's OperationOutcome text. A 2xx answer counts only
when it is a transaction-response Bundle with one entry per request entry, each with a 2xx status: a server
that processes entries one by one may answer 200 while rejecting some, and then nothing may be stored.
Bundles are read lazily by the workers, so memory does not grow with the export.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from fhirsynth.errors import LoadError, UsageError
from fhirsynth.export.loadplan import (
    CONDITIONAL_MAX_ENTRIES,
    ID_MODES,
    Entry,
    IdMode,
    Located,
    NotLoadable,
    batch_steps,
    bundle_entries,
    chunks,
    entry_for,
    prepare,
    record_locations,
)
from fhirsynth.export.ndjson_source import (
    is_ndjson,
    ndjson_files,
    stages_by_references,
    transactions,
)
from fhirsynth.export.writer import FORMATS, MANIFEST
from fhirsynth.logs import progress

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Entries per transaction: the strictest common server limit (some servers refuse more than 50 updates at once)
DEFAULT_MAX_ENTRIES = 50
MAX_BACKOFF_S = 60.0
FHIR_JSON = "application/fhir+json"


@dataclass
class LoadReport:
    loaded: int = 0
    failed: int = 0
    retries: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    # per resource type: created / updated / failed entries, as the server's transaction-response says
    entries: Counter = field(default_factory=Counter)
    not_attempted: int = 0  # NDJSON transactions not sent after an earlier stage failed
    unconditional: int = 0  # --ids conditional: entries POSTed without If-None-Exist (no identifier to match on)

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (rtype, outcome), n in sorted(self.entries.items()):
            out.setdefault(rtype, {})[outcome] = n
        return out


def _manifest(export_dir: Path) -> dict | None:
    manifest = export_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        doc = orjson.loads(manifest.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise LoadError(f"invalid manifest.json: {exc.msg}", where=str(manifest)) from exc
    if not isinstance(doc, dict):
        raise LoadError("manifest.json is not a JSON object", where=str(manifest))
    return doc


def bundle_files(export_dir: Path) -> list[Path]:
    """The Bundle files of an export, in manifest order."""
    kind, files = load_sources(export_dir)
    if kind != "bundles":
        raise LoadError("not a Bundle export (it holds NDJSON)", where=str(export_dir))
    return files


def load_sources(export_dir: Path) -> tuple[str, list]:
    """("bundles", [transaction Bundle files]) or ("ndjson", [NdjsonFile in stage order]) for an export dir: a
    `generate --format transaction` or `--format ndjson` export, a Bulk Data export (manifest.json with NDJSON
    outputs), or a directory of *.json(.gz) transaction Bundles or *.ndjson(.gz) files."""
    export_dir = Path(export_dir)
    if export_dir.is_file():  # one Bundle or one NDJSON file
        if is_ndjson(export_dir):
            return "ndjson", ndjson_files([export_dir])
        return "bundles", [export_dir]
    if not export_dir.is_dir():
        raise UsageError("no such file or directory", where=str(export_dir))
    doc = _manifest(export_dir)
    if doc is not None:
        fmt = ((doc.get("extension") or {}).get("fhirsynth") or {}).get("format")
        outputs = [o for o in doc.get("output") or [] if isinstance(o, dict) and o.get("url")]
        if fmt is not None and fmt not in FORMATS:
            raise LoadError(f"unknown export format {fmt!r} (a fhirsynth export is one of {', '.join(FORMATS)})",
                            where=str(export_dir / MANIFEST))
        paths = {export_dir / o["url"]: str(o.get("type") or "") for o in outputs}
        if paths and all(is_ndjson(p) for p in paths):
            return "ndjson", ndjson_files(list(paths), {p: t for p, t in paths.items() if t})
        files = [p for p, t in paths.items() if t == "Bundle"]
    else:
        visible = sorted(p for p in export_dir.iterdir() if not p.name.startswith("."))
        files = [p for p in visible if p.name.endswith((".json", ".json.gz"))]
        if not files and any(is_ndjson(p) for p in visible):
            return "ndjson", ndjson_files([p for p in visible if is_ndjson(p)])
    if not files:
        raise LoadError("no transaction Bundles or NDJSON files found", where=str(export_dir))
    return "bundles", files


def _read_bundle(path: Path) -> Any:
    """The JSON document of a Bundle file (what it holds is checked by loadplan.bundle_entries)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise NotLoadable(f"invalid JSON: {exc.msg} (line {exc.lineno})") from None


def outcome_text(response: httpx.Response) -> str:
    """The OperationOutcome's issue texts, else the start of the body."""
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        texts = []
        for issue in doc.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
            if text:
                loc = ", ".join(issue.get("expression") or issue.get("location") or [])
                texts.append(f"{text} ({loc})" if loc else str(text))
        if texts:
            return "; ".join(texts)
    body = response.text.strip().replace("\n", " ")
    return body[:300] or response.reason_phrase


ENTRY_OUTCOMES = {200: "updated", 201: "created", 304: "unchanged"}
# a POST answered 200 found a match for its If-None-Exist: nothing was written
POST_OUTCOMES = {200: "existing", 201: "created"}


def _entry_outcome_text(entry: dict) -> str:
    outcome = (entry.get("response") or {}).get("outcome") or {}
    texts = [i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code")
             for i in outcome.get("issue") or [] if isinstance(i, dict)]
    return "; ".join(str(t) for t in texts if t) or "no OperationOutcome"


def check_transaction_response(request: dict, body: Any, names: list[str] | None = None) -> tuple[list[str], Counter]:
    """Failed entries (messages naming the resource, the status and the server's OperationOutcome) and outcome
    counts per (resource type, created|updated|unchanged|existing|failed) of a 2xx answer to a transaction or
    batch Bundle. `names`: how to name each entry (default: Type/id of its resource)."""
    req_entries = request.get("entry") or []
    if names is None:
        names = [f"{(e.get('resource') or {}).get('resourceType')}/{(e.get('resource') or {}).get('id')}"
                 for e in req_entries]
    methods = [str((e.get("request") or {}).get("method") or "").upper() for e in req_entries]
    counts: Counter = Counter()
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle" \
            or body.get("type") not in ("transaction-response", "batch-response"):
        counts.update((n.split("/")[0], "unconfirmed") for n in names)
        what = body.get("resourceType") if isinstance(body, dict) else "not JSON" if body is None \
            else type(body).__name__
        return [f"2xx answer is not a transaction-response Bundle ({what}): nothing is confirmed stored"], counts
    entries = body.get("entry") or []
    if len(entries) != len(req_entries):
        counts.update((n.split("/")[0], "unconfirmed") for n in names)
        return [f"transaction-response has {len(entries)} entries for {len(req_entries)} sent"], counts
    failures = []
    for name, method, entry in zip(names, methods, entries):
        status = str((entry.get("response") or {}).get("status") or "")
        try:
            code = int(status.split()[0])
        except (ValueError, IndexError):
            code = 0
        if 200 <= code < 300 or code == 304:
            outcomes = POST_OUTCOMES if method == "POST" else ENTRY_OUTCOMES
            counts[(name.split("/")[0], outcomes.get(code, "stored"))] += 1
        else:
            counts[(name.split("/")[0], "failed")] += 1
            failures.append(f"{name}: HTTP {status or '(no status)'}: {_entry_outcome_text(entry)}")
    return failures, counts


def _retry_after(response: httpx.Response | None, attempt: int, base: float) -> float:
    header = response.headers.get("Retry-After") if response is not None else None
    if header:
        try:
            return min(max(float(header), 0.0), MAX_BACKOFF_S)
        except ValueError:
            try:
                return min(max(parsedate_to_datetime(header).timestamp() - time.time(), 0.0), MAX_BACKOFF_S)
            except (TypeError, ValueError):
                pass
    return min(base * (2**attempt) * (0.5 + random.random()), MAX_BACKOFF_S)


def split_transaction(doc: dict, max_entries: int, *, batch: bool = False) -> list[dict]:
    """A Bundle as the transactions (or batches) `load --ids client` posts: at most max_entries entries each,
    Patient first and Provenance last; a reference to an entry of an earlier chunk points at the `Type/id` its PUT
    stored it under, one inside the chunk at the entry's urn:uuid fullUrl (in a batch: at its `Type/id` too)."""
    entries = bundle_entries(doc)
    located = Located()
    located.add(entries)
    return [prepare(step, located, "client", batch=batch).bundle
            for chunk in chunks(entries, max_entries) for step in (batch_steps(chunk, "client") if batch else [chunk])]


@dataclass
class Sender:
    """Posts prepared chunks with retries and records where the server stored each entry."""

    client: httpx.AsyncClient
    url: str
    retries: int
    backoff: float
    report: LoadReport
    located: Located  # NDJSON with server-assigned ids: where every resource of the export went
    mode: IdMode
    batch: bool
    max_entries: int

    async def post(self, bundle: dict, names: list[str]) -> tuple[dict | None, Any]:
        """POST one transaction or batch, retrying 429 / 5xx / network errors: (None, answer) on success, else
        (the failure record, None)."""
        body = orjson.dumps(bundle)
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = await self.client.post(self.url, content=body)
                if response.status_code < 300:
                    try:
                        answer = response.json()
                    except ValueError:
                        answer = None  # said as "not JSON"
                    entry_failures, counts = check_transaction_response(bundle, answer, names)
                    self.report.entries.update(counts)
                    if not entry_failures:
                        return None, answer
                    message = (f"HTTP {response.status_code} but {len(entry_failures)} entr"
                               f"{'y' if len(entry_failures) == 1 else 'ies'} failed: "
                               + "; ".join(entry_failures[:5]))
                    return {"status": response.status_code, "message": message, "attempts": attempt + 1,
                            "entries": entry_failures}, None
                retryable = response.status_code in RETRY_STATUS
                message = f"HTTP {response.status_code}: {outcome_text(response)}"
            except httpx.TransportError as exc:
                retryable = True
                message = f"{type(exc).__name__}: {exc}"
            if not retryable or attempt >= self.retries:
                return {"status": response.status_code if response is not None else None, "message": message,
                        "attempts": attempt + 1}, None
            delay = _retry_after(response, attempt, self.backoff)
            log.debug("%s; retry %d in %.2fs", message, attempt + 1, delay)
            self.report.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    async def send_chunk(self, chunk: list[Entry], located: Located) -> dict | None:
        """Store one chunk (as one transaction, or as batches in dependency order): None, or the failure."""
        for step in batch_steps(chunk, self.mode) if self.batch else [chunk]:
            try:
                prepared = prepare(step, located, self.mode, batch=self.batch)
            except NotLoadable as exc:
                return {"status": None, "message": str(exc), "attempts": 0}
            if prepared.unconditional:
                self.report.unconditional += prepared.unconditional
            failure, answer = await self.post(prepared.bundle, [e.name for e in step])
            if failure is not None:
                return failure
            missing = record_locations(prepared, answer, located)
            if missing and self.mode != "client":
                return {"status": None, "attempts": 1,
                        "message": f"stored, but {len(missing)} location(s) unknown, so later references cannot "
                                   f"be resolved: " + "; ".join(missing[:3])}
        return None

    async def send_file(self, path: Path) -> None:
        """Load one Bundle file: its chunks in order; a failed chunk stops the file (later chunks would point at
        what it did not store), after its own retries."""
        try:
            entries = bundle_entries(await asyncio.to_thread(_read_bundle, path))
        except (OSError, NotLoadable) as exc:
            self.report.failed += 1
            self.report.failures.append({"file": path.name, "status": None, "message": str(exc)})
            log.error("%s: %s", path.name, exc)
            return
        located = Located()  # per file: a file is one patient, what it refers to is in it or already on the server
        located.add(entries)
        parts = chunks(entries, self.max_entries, self.mode)
        for k, chunk in enumerate(parts):
            failure = await self.send_chunk(chunk, located)
            if failure is not None:
                if len(parts) > 1:
                    failure["message"] = (f"transaction {k + 1} of {len(parts)} ({len(chunk)} entries): "
                                          + failure["message"])
                    failure["not_sent"] = sum(len(c) for c in parts[k + 1:])  # later chunks of the file
                    if failure["not_sent"]:
                        failure["message"] += f"; {failure['not_sent']} later entries of the file not sent"
                self.fail(path.name, failure)
                return
        self.report.loaded += 1

    async def send_ndjson(self, label: str, resources: list[dict]) -> None:
        entries = [entry_for(r) for r in resources]
        # client ids: a `Type/id` reference is right as it is, so nothing is remembered across transactions and
        # memory does not grow with the export; server-assigned ids: every stored id is remembered for later types
        located = self.located if self.mode != "client" else Located()
        located.add(entries)
        failure = await self.send_chunk(entries, located)
        if failure is None:
            self.report.loaded += 1
        else:
            self.fail(label, failure)

    def fail(self, label: str, failure: dict) -> None:
        self.report.failed += 1
        self.report.failures.append({"file": label, **failure})
        log.error("%s: failed after %d attempt(s): %s", label, failure["attempts"], failure["message"])


async def _load(kind: str, sources: list, url: str, *, concurrency: int, retries: int, token: str | None,
                timeout: float, backoff: float, max_entries: int, batch: bool, mode: IdMode) -> LoadReport:
    """Post every unit: Bundle files (each split as needed), or NDJSON stage by stage (a stage starts once the
    one before it is stored, so references always point at stored resources)."""
    report = LoadReport()
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if kind == "bundles":
        plan = [iter(sources)]
        total, unit = len(sources), "bundle"
    else:
        # a type loads after every type it refers to, as the data says: with server-assigned ids the loader needs
        # the referenced ids, and with client ids a server that checks references on write needs the targets stored
        plan = [transactions(stage, max_entries) for stage in stages_by_references(sources)]
        total, unit = None, "transaction"
    with progress(total=total, unit=unit, desc="load") as bar:
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            located = Located(export_types=frozenset(f.rtype for f in sources)
                              if kind == "ndjson" and mode != "client" else frozenset())
            sender = Sender(client, url, retries, backoff, report, located, mode, batch, max_entries)

            async def worker(units) -> None:  # noqa: ANN001 - an iterator shared by the stage's workers
                for item in units:  # one event loop thread: next() is never called concurrently
                    if isinstance(item, Path):
                        await sender.send_file(item)
                    else:
                        await sender.send_ndjson(*item)
                    bar.update(1)

            for k, units in enumerate(plan):
                failed_before = report.failed
                await asyncio.gather(*(worker(units) for _ in range(concurrency)))
                if report.failed > failed_before and k + 1 < len(plan):
                    # later stages would point at what this one did not store: stop rather than pile up failures
                    report.not_attempted = sum(1 for later in plan[k + 1:] for _ in later)
                    log.error("stopped after a failed stage: %d later transaction(s) not sent", report.not_attempted)
                    break
    return report


def load_export(
    export_dir: Path,
    url: str,
    *,
    concurrency: int = 4,
    retries: int = 5,
    token: str | None = None,
    timeout: float = 120.0,
    backoff: float = 0.5,
    max_entries: int | None = None,
    batch: bool = False,
    ids: IdMode = "client",
) -> LoadReport:
    """POST every transaction Bundle of export_dir to the FHIR base `url`; returns the report (never raises for
    per-Bundle failures: the caller decides)."""
    if concurrency < 1:
        raise UsageError(f"must be at least 1, got {concurrency}", where="--concurrency")
    if retries < 0:
        raise UsageError(f"must be 0 or more, got {retries}", where="--retries")
    if max_entries is None:
        max_entries = CONDITIONAL_MAX_ENTRIES if ids == "conditional" and not batch else DEFAULT_MAX_ENTRIES
    if max_entries < 1:
        raise UsageError(f"must be at least 1, got {max_entries}", where="--max-entries")
    if ids not in ID_MODES:
        raise UsageError(f"unknown id mode {ids!r} (choose from {', '.join(ID_MODES)})", where="--ids")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"expected an http(s) FHIR base URL, got {url!r}", where="--url")
    kind, sources = load_sources(export_dir)
    started = time.perf_counter()
    report = asyncio.run(_load(kind, sources, url.rstrip("/"), concurrency=concurrency, retries=retries, token=token,
                               timeout=timeout, backoff=backoff, max_entries=max_entries, batch=batch,
                               mode=ids))
    report.seconds = time.perf_counter() - started
    return report
