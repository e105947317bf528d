"""Timelines: the FHIR-free, per-patient event representation every stage after ingest works on."""

from fhirsynth.timeline.types import Event, EventKind, PatientInfo, Timeline

__all__ = ["Event", "EventKind", "PatientInfo", "Timeline"]
