#!/usr/bin/env bash
# Set everything up and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FHIRSYNTH_VENV:-.venv}"
# pytest-randomly shuffles the tests; -q hides its header, so the seed is chosen and printed here, and
# FHIRSYNTH_TEST_SEED=N replays an order (-p no:randomly among the arguments: file order, no seed)
if [[ " $* " == *"no:randomly"* ]]; then
  exec "$VENV/bin/python" -m pytest -q "$@"
fi
SEED="${FHIRSYNTH_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
echo "test order: --randomly-seed=$SEED (replay: FHIRSYNTH_TEST_SEED=$SEED scripts/test.sh)"
exec "$VENV/bin/python" -m pytest -q -p randomly --randomly-seed="$SEED" "$@"
