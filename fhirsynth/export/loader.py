"""POST an export's transaction Bundles to a FHIR server: bounded concurrency, retries, honest report.

Files come from the export's manifest.json (or, without one, every *.json / *.json.gz in the directory).
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
from fhirsynth.export.bundles import rewrite_refs
from fhirsynth.export.ndjson_source import dependency_rank, is_ndjson, ndjson_files, stages, transactions
from fhirsynth.export.writer import MANIFEST
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

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (rtype, outcome), n in sorted(self.entries.items()):
            out.setdefault(rtype, {})[outcome] = n
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "failed": self.failed, "not_attempted": self.not_attempted,
                "retries": self.retries,
                "failures": self.failures, "entries": self.by_type(), "seconds": round(self.seconds, 3)}


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
    """The transaction Bundles of an export, in manifest order."""
    kind, files = load_sources(export_dir)
    if kind != "bundles":
        raise LoadError("not a transaction export (it holds NDJSON)", where=str(export_dir))
    return files


def load_sources(export_dir: Path) -> tuple[str, list]:
    """("bundles", [transaction Bundle files]) or ("ndjson", [NdjsonFile in stage order]) for an export dir: a
    `generate --format transaction` or `--format ndjson` export, a Bulk Data export (manifest.json with NDJSON
    outputs), or a directory of *.json(.gz) transaction Bundles or *.ndjson(.gz) files."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UsageError("export directory does not exist", where=str(export_dir))
    doc = _manifest(export_dir)
    if doc is not None:
        fmt = ((doc.get("extension") or {}).get("fhirsynth") or {}).get("format")
        outputs = [o for o in doc.get("output") or [] if isinstance(o, dict) and o.get("url")]
        if fmt is not None and fmt not in ("transaction", "ndjson"):
            raise LoadError(f"export format is {fmt!r}; `fhirsynth load` posts transaction Bundles or NDJSON "
                            "(generate with --format transaction or ndjson)", where=str(export_dir / MANIFEST))
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


def _read_bundle(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle" or doc.get("type") != "transaction":
        raise ValueError("not a transaction Bundle")
    return data


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


def _entry_outcome_text(entry: dict) -> str:
    outcome = (entry.get("response") or {}).get("outcome") or {}
    texts = [i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code")
             for i in outcome.get("issue") or [] if isinstance(i, dict)]
    return "; ".join(str(t) for t in texts if t) or "no OperationOutcome"


def check_transaction_response(request: dict, body: Any) -> tuple[list[str], Counter]:
    """Failed entries (messages naming the resource, the status and the server's OperationOutcome) and outcome
    counts per (resource type, created|updated|unchanged|failed) of a 2xx answer to a transaction Bundle."""
    req_entries = request.get("entry") or []
    names = [f"{(e.get('resource') or {}).get('resourceType')}/{(e.get('resource') or {}).get('id')}"
             for e in req_entries]
    counts: Counter = Counter()
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle" \
            or body.get("type") not in ("transaction-response", "batch-response"):
        counts.update((n.split("/")[0], "unconfirmed") for n in names)
        return [f"2xx answer is not a transaction-response Bundle "
                f"({body.get('resourceType') if isinstance(body, dict) else type(body).__name__}): "
                "nothing is confirmed stored"], counts
    entries = body.get("entry") or []
    if len(entries) != len(req_entries):
        counts.update((n.split("/")[0], "unconfirmed") for n in names)
        return [f"transaction-response has {len(entries)} entries for {len(req_entries)} sent"], counts
    failures = []
    for name, entry in zip(names, entries):
        status = str((entry.get("response") or {}).get("status") or "")
        try:
            code = int(status.split()[0])
        except (ValueError, IndexError):
            code = 0
        if 200 <= code < 300 or code == 304:
            counts[(name.split("/")[0], ENTRY_OUTCOMES.get(code, "stored"))] += 1
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


def _entry_rank(entry: dict) -> int:
    """Order inside a split transaction: Patient, then Encounters, then the rest, Provenance last (it points at
    everything else), so every reference points at something already stored or in the same chunk."""
    return dependency_rank((entry.get("resource") or {}).get("resourceType"))


def _as_batch(doc: dict) -> dict:
    """The transaction as a batch: a batch resolves no fullUrl between its entries, so every reference to an
    entry (its urn:uuid) becomes the `Type/id` its PUT stores it under; entries stay in dependency order."""
    entries = sorted(doc.get("entry") or [], key=_entry_rank)
    urls = {e["fullUrl"]: e["request"]["url"] for e in entries
            if e.get("fullUrl") and (e.get("request") or {}).get("method") == "PUT" and e["request"].get("url")}
    return {**doc, "type": "batch", "entry": [{**e, "resource": rewrite_refs(e.get("resource"), urls)}
                                             for e in entries]}


def split_transaction(doc: dict, max_entries: int, *, batch: bool = False) -> list[dict]:
    """A transaction Bundle as consecutive transactions of at most max_entries entries. A reference to an entry of
    an earlier chunk (its urn:uuid fullUrl) is rewritten to that entry's `Type/id`, where the earlier PUT stored
    it; references inside a chunk keep their fullUrl, which the server resolves within the transaction.
    batch=True: batches instead (for servers without transactions), every reference as `Type/id`."""
    if batch:
        doc = _as_batch(doc)
    entries = sorted(doc.get("entry") or [], key=_entry_rank)  # stable: the writer's order within a rank
    if len(entries) <= max_entries:
        return [doc]
    stored: dict[str, str] = {}
    chunks = []
    for i in range(0, len(entries), max_entries):
        chunk = entries[i: i + max_entries]
        chunks.append({**doc, "entry": [{**e, "resource": rewrite_refs(e.get("resource"), stored)} for e in chunk]})
        for e in chunk:
            req = e.get("request") or {}
            if e.get("fullUrl") and req.get("method") == "PUT" and req.get("url"):
                stored[e["fullUrl"]] = req["url"]
    return chunks


async def _post_chunk(client: httpx.AsyncClient, url: str, chunk: dict, retries: int, backoff: float,
                      report: LoadReport) -> dict | None:
    """POST one transaction, retrying 429 / 5xx / network errors; None on success, else the failure record."""
    body = orjson.dumps(chunk)
    attempt = 0
    while True:
        response: httpx.Response | None = None
        try:
            response = await client.post(url, content=body)
            if response.status_code < 300:
                try:
                    answer = response.json()
                except ValueError:
                    answer = None
                entry_failures, counts = check_transaction_response(chunk, answer)
                report.entries.update(counts)
                if not entry_failures:
                    return None
                message = (f"HTTP {response.status_code} but {len(entry_failures)} entr"
                           f"{'y' if len(entry_failures) == 1 else 'ies'} failed: " + "; ".join(entry_failures[:5]))
                return {"status": response.status_code, "message": message, "attempts": attempt + 1,
                        "entries": entry_failures}
            retryable = response.status_code in RETRY_STATUS
            message = f"HTTP {response.status_code}: {outcome_text(response)}"
        except httpx.TransportError as exc:
            retryable = True
            message = f"{type(exc).__name__}: {exc}"
        if not retryable or attempt >= retries:
            return {"status": response.status_code if response is not None else None, "message": message,
                    "attempts": attempt + 1}
        delay = _retry_after(response, attempt, backoff)
        log.debug("%s; retry %d in %.2fs", message, attempt + 1, delay)
        report.retries += 1
        attempt += 1
        await asyncio.sleep(delay)


async def _post_one(client: httpx.AsyncClient, url: str, path: Path, retries: int, backoff: float,
                    report: LoadReport, max_entries: int, batch: bool) -> None:
    """Load one Bundle file: its transactions in order (one, or the chunks of a split); a failed chunk stops the
    file (later chunks would point at what it did not store), after its own retries."""
    try:
        doc = orjson.loads(await asyncio.to_thread(_read_bundle, path))
    except (OSError, ValueError) as exc:
        report.failed += 1
        report.failures.append({"file": path.name, "status": None, "message": str(exc)})
        log.error("%s: %s", path.name, exc)
        return
    chunks = split_transaction(doc, max_entries, batch=batch)
    for k, chunk in enumerate(chunks):
        failure = await _post_chunk(client, url, chunk, retries, backoff, report)
        if failure is not None:
            if len(chunks) > 1:
                failure["message"] = (f"transaction {k + 1} of {len(chunks)} ({len(chunk['entry'])} entries): "
                                      + failure["message"])
            report.failed += 1
            report.failures.append({"file": path.name, **failure})
            log.error("%s: failed after %d attempt(s): %s", path.name, failure["attempts"], failure["message"])
            return
    report.loaded += 1


async def _load(kind: str, sources: list, url: str, *, concurrency: int, retries: int, token: str | None,
                timeout: float, backoff: float, max_entries: int, batch: bool) -> LoadReport:
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
        plan = [transactions(stage, max_entries, batch=batch) for stage in stages(sources)]
        total, unit = None, "transaction"
    with progress(total=total, unit=unit, desc="load") as bar:
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:

            async def worker(units) -> None:  # noqa: ANN001 - an iterator shared by the stage's workers
                for item in units:  # one event loop thread: next() is never called concurrently
                    if isinstance(item, Path):
                        await _post_one(client, url, item, retries, backoff, report, max_entries, batch)
                    else:
                        label, chunk = item
                        failure = await _post_chunk(client, url, chunk, retries, backoff, report)
                        if failure is None:
                            report.loaded += 1
                        else:
                            report.failed += 1
                            report.failures.append({"file": label, **failure})
                            log.error("%s: failed after %d attempt(s): %s", label, failure["attempts"],
                                      failure["message"])
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
    max_entries: int = DEFAULT_MAX_ENTRIES,
    batch: bool = False,
) -> LoadReport:
    """POST every transaction Bundle of export_dir to the FHIR base `url`; returns the report (never raises for
    per-Bundle failures: the caller decides)."""
    if concurrency < 1:
        raise UsageError(f"must be at least 1, got {concurrency}", where="--concurrency")
    if retries < 0:
        raise UsageError(f"must be 0 or more, got {retries}", where="--retries")
    if max_entries < 1:
        raise UsageError(f"must be at least 1, got {max_entries}", where="--max-entries")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"expected an http(s) FHIR base URL, got {url!r}", where="--url")
    kind, sources = load_sources(export_dir)
    started = time.perf_counter()
    report = asyncio.run(_load(kind, sources, url.rstrip("/"), concurrency=concurrency, retries=retries, token=token,
                               timeout=timeout, backoff=backoff, max_entries=max_entries, batch=batch))
    report.seconds = time.perf_counter() - started
    return report
