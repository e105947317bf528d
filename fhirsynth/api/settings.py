"""Server settings (plain dataclass so create_app() can be called from tests, the CLI or a host application)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerSettings:
    db_path: Path  # an existing store database (build it with fhirsynth.store.loader.build_store)
    model_dir: Path | None = None  # enables POST /Patient/$synthesize; its privacy.json feeds /$privacy-report
    report_dir: Path | None = None  # a `fhirsynth evaluate` output dir (report.json) for /$privacy-report
    token: str | None = None  # bearer token with full access (scopes system/*.*)
    # Further bearer tokens with SMART Backend Services style scopes, e.g. {"t1": "system/Patient.read"}.
    scoped_tokens: dict[str, str] = field(default_factory=dict)
    cors_origins: list[str] = field(default_factory=list)
    default_count: int = 50
    max_count: int = 1000  # larger _count values are clamped, with an OperationOutcome warning entry
    max_includes: int = 5000  # _include/_revinclude resources per page; beyond: warning entry
    max_params: int = 64  # search parameters per request
    max_body_bytes: int = 1_000_000  # POST _search / $synthesize bodies
    max_synthesize: int = 1000  # patients per $synthesize call
    # Export jobs kept at once: queued, running and finished ones until DELETEd or expired. When full, a finished
    # job whose manifest and files were all downloaded is reclaimed; if none is, kick-off answers 429.
    export_jobs: int = 64
    export_pending: int = 8  # jobs queued or running at once; more kick-offs get 429 + Retry-After
    export_workers: int = 2  # jobs preparing (counting) at the same time; the rest wait as "queued"
    synthesize_queue: int = 4  # $synthesize calls waiting behind the running one; more get 429 + Retry-After
    export_expiry_s: float = 3600.0
    default_handling: str = "strict"  # Prefer: handling=strict|lenient when the client sends none
    profile: str = "us-core"  # profile for $synthesize output
