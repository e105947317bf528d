"""fhirsynth: differentially private synthetic FHIR R4 patients, served over a FHIR REST API."""

__version__ = "0.1.0"
