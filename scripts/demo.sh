#!/usr/bin/env bash
# Set everything up and run the main job on the bundled sample: ingest -> DP train -> generate -> serve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FHIRSYNTH_VENV:-.venv}"
exec "$VENV/bin/fhirsynth" demo "$@"
