#!/usr/bin/env bash
# Fetch the official FHIR implementation guide packages that the profile validation test checks emitted resources
# against (tests/test_profile_validation.py, tests/medplum/validate_profiles.mjs), from the npm registry, pinned by
# version and SHA-1, into .cache/fhir-packages/NAME#VERSION (git-ignored). `npm pack` only: these packages declare
# FHIR package dependencies (hl7.fhir.r4.core, ...) that are not npm packages, so `npm install` cannot take them.
# US Core (hl7.fhir.us.core) is not on the npm registry, so it cannot be fetched here.
# Idempotent; exits non-zero with a message when npm or the registry is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${FHIRSYNTH_FHIR_PACKAGES:-.cache/fhir-packages}"
PACKAGES=(
  "hl7.fhir.uv.ips 2.0.0 72d5e3ed146a509212e90a4bba4613f36c501d8e"
)
fail() { echo "fetch_fhir_packages: $*" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || fail "npm is not installed"
mkdir -p "$DEST"
for spec in "${PACKAGES[@]}"; do
  read -r name version sha1 <<<"$spec"
  target="$DEST/$name#$version"
  if [ -f "$target/package/package.json" ]; then
    echo "fetch_fhir_packages: $name#$version already in $target"
    continue
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack "$name@$version" --loglevel=error >/dev/null) || fail "npm pack $name@$version failed"
  tarball="$tmp/$name-$version.tgz"
  got="$(sha1sum "$tarball" | cut -d' ' -f1)"
  [ "$got" = "$sha1" ] || fail "$name@$version: SHA-1 $got, expected $sha1"
  mkdir -p "$tmp/x" && tar -xzf "$tarball" -C "$tmp/x"
  rm -rf "$target" && mv "$tmp/x" "$target"
  echo "fetch_fhir_packages: $name#$version into $target"
done
