#!/usr/bin/env bash
# Create .venv (if missing) and install fhirsynth with its dev extra. Idempotent.
# torch is installed first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fhirsynth needs Python 3.11+")'
VENV="${FHIRSYNTH_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
# A real FHIR server for the load tests: Medplum's FHIR router on Node 22 (npm packages, into .cache/medplum).
bash scripts/setup_medplum.sh || echo "warning: could not install the Medplum test server (the load tests against it will skip)" >&2
# The official IPS profile package the profile validation test checks emitted resources against.
bash scripts/fetch_fhir_packages.sh || echo "warning: could not fetch the FHIR IG packages (the profile validation test will skip)" >&2
