#!/usr/bin/env bash
# Set everything up and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FHIRSYNTH_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
