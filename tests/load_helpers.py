"""Shared pieces of the `load` tests: what a FHIR server answers when it refuses something."""

from __future__ import annotations


def operation_outcome(text: str) -> dict:
    """An OperationOutcome with one error issue whose diagnostics is `text` (what `load` reports first)."""
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": text}]}
