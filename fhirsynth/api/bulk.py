"""Bulk Data export jobs: a job fixes a snapshot of the store (rid <= snapshot), counts what each output will
hold in a background thread, and its NDJSON files are streamed straight from SQLite when downloaded, so memory
stays flat whatever the size and nothing is written to disk."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson

from fhirsynth.store.dates import format_instant
from fhirsynth.store.sqlite import Store

log = logging.getLogger(__name__)


@dataclass
class ExportJob:
    store: Store
    request_url: str
    types: list[str]
    since: float | None
    members: list[str] | None  # patient ids (Group export); None = no restriction
    patient_only: bool  # Patient/$export and Group export: only resources in a patient compartment
    requires_token: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    snapshot: int = 0
    status: str = "running"  # running | done | error | cancelled
    progress: str = "queued"
    outputs: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.snapshot = self.store.snapshot()
        self.created = time.time()
        threading.Thread(target=self._run, name=f"export-{self.id[:8]}", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()
        self.status = "cancelled"

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
        return " AND ".join(conds), args

    def _run(self) -> None:
        try:
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

    def manifest(self, file_url: str) -> bytes:
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
