"""Bulk Data export jobs: a job fixes a snapshot of the store (rid <= snapshot), counts what each output will
hold in a background thread, and its NDJSON files are streamed straight from SQLite when downloaded, so memory
stays flat whatever the size and nothing is written to disk.

Admission (`admit`) bounds the work a burst of kick-offs can cause: at most `export_pending` jobs queued or
running (counting happens on `export_workers` threads at a time), at most `export_jobs` jobs kept. Beyond either
bound the kick-off gets 429 + Retry-After (Bulk Data IG: the client retries later), never an unbounded queue.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson

from fhirsynth.api.errors import ApiError
from fhirsynth.store.dates import format_instant
from fhirsynth.store.sqlite import Store

log = logging.getLogger(__name__)

PENDING = ("queued", "running")


@dataclass
class ExportJob:
    store: Store
    request_url: str
    types: list[str]
    since: float | None
    members: list[str] | None  # patient ids (Group export, POST patient=); None = no restriction
    patient_only: bool  # Patient/$export and Group export: only resources in a patient compartment
    requires_token: bool
    # _typeFilter per type: OR of (SQL condition on resources r, args), each an AND of compiled search clauses
    filters: dict[str, list[tuple[str, list]]] = field(default_factory=dict)
    slots: threading.Semaphore | None = None  # shared by the jobs of one server: bounds concurrent counting
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    snapshot: int = 0
    status: str = "queued"  # queued | running | done | error | cancelled
    progress: str = "queued"
    outputs: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None
    manifest_served: bool = False
    downloaded: set[str] = field(default_factory=set)  # types whose file was streamed to the end at least once
    _cancel: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        # The snapshot is taken at kick-off, not when a worker picks the job up: transactionTime is the kick-off.
        self.snapshot = self.store.snapshot()
        self.created = time.time()
        threading.Thread(target=self._run, name=f"export-{self.id[:8]}", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()
        self.status = "cancelled"

    @property
    def retrieved(self) -> bool:
        """The client has had everything: the manifest (or the error) and every file to its end."""
        if self.status == "error":
            return self.manifest_served
        return self.status == "done" and self.manifest_served and self.downloaded >= {t for t, _ in self.outputs}

    def where(self, rtype: str) -> tuple[str, list]:
        conds, args = ["r.type = ?", "r.rid <= ?"], [rtype, self.snapshot]
        if self.since is not None:
            conds.append("r.last_updated > ?")
            args.append(self.since)
        if self.members is not None:
            conds.append("r.patient IN (SELECT value FROM json_each(?))")
            args.append(orjson.dumps(self.members).decode())
        elif self.patient_only:
            conds.append("r.patient IS NOT NULL")
        if rtype in self.filters:
            alternatives = self.filters[rtype]
            conds.append("(" + " OR ".join(f"({cond})" for cond, _ in alternatives) + ")")
            for _, a in alternatives:
                args.extend(a)
        return " AND ".join(conds), args

    def _run(self) -> None:
        if self.slots is not None:
            self.slots.acquire()
        try:
            if self._cancel.is_set():
                return
            self.status = "running"
            for i, rtype in enumerate(self.types, start=1):
                if self._cancel.is_set():
                    return
                self.progress = f"counting {rtype} ({i}/{len(self.types)})"
                where, args = self.where(rtype)
                n = self.store.query_once(f"SELECT count(*) FROM resources r WHERE {where}", args)[0][0]
                if n:
                    self.outputs.append((rtype, n))
            if not self._cancel.is_set():
                self.progress = "complete"
                self.status = "done"
        except Exception as exc:  # noqa: BLE001 - reported to the client through the status endpoint
            log.exception("export job %s failed", self.id)
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "error"
        finally:
            if self.slots is not None:
                self.slots.release()

    def manifest(self, file_url: str) -> bytes:
        self.manifest_served = True
        return orjson.dumps({
            "transactionTime": format_instant(self.created),
            "request": self.request_url,
            "requiresAccessToken": self.requires_token,
            "output": [{"type": t, "url": f"{file_url}/{t}.ndjson", "count": n} for t, n in self.outputs],
            "error": [],
        })

    def stream(self, rtype: str):
        where, args = self.where(rtype)
        for batch in self.store.iter_bodies(where, args):
            if self._cancel.is_set():
                return
            yield b"\n".join(batch) + b"\n"
        self.downloaded.add(rtype)


def admit(jobs: dict[str, ExportJob], job: ExportJob, *, max_kept: int, max_pending: int,
          expiry_s: float) -> None:
    """Add `job` to `jobs` (caller holds the jobs lock) or raise 429 with Retry-After.

    Expired jobs are dropped first. When the table is full, the oldest job whose client already retrieved
    everything is reclaimed (a client that never DELETEs must not lock others out for the whole expiry time);
    jobs with files still to fetch are never taken away.
    """
    now = time.time()
    for jid, old in list(jobs.items()):
        if now - old.created > expiry_s:
            old.cancel()
            del jobs[jid]
    pending = sum(1 for j in jobs.values() if j.status in PENDING)
    if pending >= max_pending:
        raise ApiError(429, f"{pending} export jobs are already queued or running (limit {max_pending}); "
                       "retry after the Retry-After delay", code="throttled", headers={"Retry-After": "2"})
    if len(jobs) >= max_kept:
        done = sorted((j for j in jobs.values() if j.retrieved), key=lambda j: j.created)
        if not done:
            oldest = min(j.created for j in jobs.values())
            wait = max(1, min(60, int(oldest + expiry_s - now) + 1))
            raise ApiError(429, f"{len(jobs)} export jobs are kept (limit {max_kept}) and none has been fully "
                           "downloaded yet; DELETE finished jobs or retry later", code="throttled",
                           headers={"Retry-After": str(wait)})
        del jobs[done[0].id]  # not cancelled: a re-download of its files already streaming may finish
    jobs[job.id] = job
