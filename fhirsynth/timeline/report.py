"""The ingest report: per resource type read = used + skipped, skip reasons with examples.

Pseudo resource types keep the books balanced for input that never became a resource:
"(invalid json)" for unparseable lines/files, "(not a resource)" for JSON without a resourceType and
"(unreadable file)" for files that failed mid-read.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

INVALID_JSON = "(invalid json)"
NOT_A_RESOURCE = "(not a resource)"
UNREADABLE = "(unreadable file)"
_PSEUDO_TYPE = {"invalid_json": INVALID_JSON, "not_fhir_resource": NOT_A_RESOURCE, "unreadable_file": UNREADABLE,
                "truncated_gzip": UNREADABLE, "corrupt_gzip": UNREADABLE}

# One line per reason, copied into the report so it explains itself.
REASONS: dict[str, str] = {
    "invalid_json": "a line or file that is not valid JSON (file:line)",
    "not_fhir_resource": "JSON without a resourceType",
    "unreadable_file": "a file that could not be read to the end (I/O error)",
    "truncated_gzip": "a .gz cut short: every complete line before the cut is used; the cut-off line (file:line) "
                      "and anything after it are missing",
    "corrupt_gzip": "a .gz whose compressed data is damaged: the lines before the damage are used; the rest "
                    "(from file:line) is missing",
    "unmapped_type": "a resource type the mapping has no table for",
    "malformed_resource": "a mapped element has the wrong JSON type (e.g. an object where FHIR has a string)",
    "no_id": "a Patient without id (and without a fullUrl to derive one)",
    "duplicate_id": "the same Type/id seen before (the first one is kept)",
    "no_subject": "no patient reference in the mapped elements",
    "subject_not_patient": "the subject references something other than a Patient",
    "subject_not_found": "the referenced Patient is not among the input Patients",
    "no_code": "no coding with a code",
    "code_system_not_accepted": "no coding from the mapping's accepted systems",
    "no_usable_time": "no parseable time in the mapped time elements",
    "entered_in_error": "status or verificationStatus entered-in-error",
    "status_excluded": "a status the mapping filters out (e.g. refuted, cancelled)",
    "category_not_accepted": "a category outside the mapping's accepted categories",
    "medication_not_found": "the medicationReference names a Medication that is neither contained nor among the "
                            "input resources",
    "medication_not_referenced": "a Medication no mapped resource references (its code is used only through a "
                                 "MedicationRequest / MedicationStatement)",
}


class IngestReport:
    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.read: Counter[str] = Counter()
        self.skipped: dict[str, Counter[str]] = defaultdict(Counter)
        self.examples: dict[str, list[dict[str, str]]] = defaultdict(list)

    def count_read(self, rtype: str, n: int = 1) -> None:
        self.read[rtype] += n

    def skip(self, rtype: str, reason: str, where: str, resource: str | None = None, detail: str = "") -> None:
        self.skipped[rtype][reason] += 1
        ex = self.examples[reason]
        if len(ex) < self.max_examples:
            item = {"where": where}
            if resource:
                item["resource"] = resource
            if detail:
                item["detail"] = detail
            ex.append(item)

    def problem(self, reason: str, where: str, detail: str) -> None:
        """A read-level problem: counted as one read and skipped pseudo-resource."""
        rtype = _PSEUDO_TYPE.get(reason, NOT_A_RESOURCE)
        self.read[rtype] += 1
        self.skip(rtype, reason, where, None, detail)

    @property
    def n_skipped(self) -> int:
        return sum(sum(c.values()) for c in self.skipped.values())

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        types: dict[str, Any] = {}
        for rtype in sorted(self.read):
            skipped = self.skipped.get(rtype, Counter())
            n_skip = sum(skipped.values())
            types[rtype] = {
                "read": self.read[rtype],
                "used": self.read[rtype] - n_skip,
                "skipped": n_skip,
                "skipped_by_reason": dict(sorted(skipped.items())),
            }
        by_reason: Counter[str] = Counter()
        for c in self.skipped.values():
            by_reason.update(c)
        total_read = sum(self.read.values())
        total_skipped = sum(by_reason.values())
        return {
            **extra,
            "totals": {"read": total_read, "used": total_read - total_skipped, "skipped": total_skipped},
            "resource_types": types,
            "skipped": {
                reason: {"count": n, "meaning": REASONS.get(reason, ""), "examples": self.examples.get(reason, [])}
                for reason, n in sorted(by_reason.items())
            },
        }
